"""The custom ops the torch.compile backend puts into ATen graphs, besides fxforge::rmsnorm and
fxforge::swiglu (ir/ops.py), which it reuses as they are.

  fxforge::rotary(x, cos, sin, impl)
      Hugging Face's RoPE form, x * cos + rotate_half(x) * sin with pairs (i, i + D/2), given the cos
      and sin tables the model computed (broadcastable to x). The canonical decoder's fxforge::rope
      computes its tables from positions instead; an HF graph hands over the tables.
  fxforge::sdpa(q, k, v, attn_mask, is_causal, scale, k_format, v_format, k_perm, v_perm, impl)
      torch's scaled_dot_product_attention (same mask and causal semantics, GQA when k has fewer heads
      than q), reading K and V as a KV cache in k_format / v_format would hand them back: each row of
      head_dim values is quantized in blocks and dequantized (kernels/bfp.py rules; "native" leaves a
      side as it is). With k_perm (the [Hkv, D] channel orders, flat), the channels of KV head h are
      first put in the order k_perm[h] (KSort), quantized in that order and put back, which is exactly
      what the ksort + bfp-kv passes compute: they permute W_k and W_q, so q.k is unchanged and only the
      block grouping moves. The orders are int lists, not tensors, so they live in the graph's code.

Both take the kernel binding `impl` last, as every fxforge op does (ir/ops.py). "reference" runs float32
torch everywhere. "triton" runs, on CUDA, the BFP round trip through the Triton quantize/dequantize
kernels of kernels/bfp.py (real packed bytes) and the attention itself through torch's fused SDPA
kernels; fxforge has no dense-masked attention kernel, and RoPE from tables has no Triton kernel yet, so
fxforge::rotary runs its reference on every device. Outputs keep the strides their fake
implementations promise (Inductor checks them).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from fxforge.kernels.bfp import dequantize, parse_kv_format, quantize, simulate_quantize
from fxforge.kernels.triton_support import can_launch

NATIVE = "native"
IMPLS = ("reference", "triton")


def _check_impl(op: str, impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"fxforge::{op}: impl={impl!r} is not one of {IMPLS}")


def _like(ref: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value in a tensor with ref's strides (what the fake implementation promised)."""
    if value.stride() == ref.stride():
        return value
    return torch.empty_like(ref, dtype=value.dtype).copy_(value)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float32 x * cos + rotate_half(x) * sin, returned in x's dtype."""
    xf = x.float()
    return (xf * cos.float() + rotate_half(xf) * sin.float()).to(x.dtype)


@torch.library.custom_op("fxforge::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str) -> torch.Tensor:
    _check_impl("rotary", impl)
    return _like(x, rotary_ref(x, cos, sin))


@rotary.register_fake
def _rotary_fake(x, cos, sin, impl):
    return torch.empty_like(x)


@functools.lru_cache(maxsize=256)
def _head_perm(perm: tuple[int, ...], head_dim: int, heads: int, device: torch.device) -> torch.Tensor:
    """The flat order of [Hkv * D] channels as [heads, D] on device (GQA-repeated copies of a KV head use
    its order); cached, so a compiled step does not copy it to the device again."""
    order = torch.tensor(perm, dtype=torch.int64).view(-1, head_dim)
    if heads % order.shape[0]:
        raise ValueError(f"a channel permutation of {order.shape[0]} KV heads cannot serve {heads} heads")
    return order.repeat_interleave(heads // order.shape[0], dim=0).to(device)


def fake_quantize_rows(x: torch.Tensor, fmt: str, perm: Optional[list[int]], kernels: bool) -> torch.Tensor:
    """x [B, H, T, D] as a cache in `fmt` returns it: blocks along D, in perm's channel order if given.

    kernels=True packs and unpacks through kernels/bfp.py's Triton kernels where they can run (real
    bytes); otherwise simulate_quantize, which gives the same values without packing."""
    if fmt == NATIVE:
        return x
    if perm is not None:
        index = _head_perm(tuple(perm), x.shape[-1], x.shape[1], x.device)[None, :, None, :].expand_as(x)
        x = x.gather(-1, index)
    if kernels and can_launch(x):
        data, scale = quantize(x.contiguous(), fmt, check_finite=False)
        values = dequantize(data, scale, fmt, x.shape[-1], torch.float32)
    else:
        values = simulate_quantize(x, fmt)
    if perm is not None:
        values = torch.empty_like(values).scatter_(-1, index, values)
    return values.to(x.dtype)


def _attention(q, k, v, attn_mask, is_causal: bool, scale: float, float32: bool) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if float32:
        mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask, is_causal=is_causal,
                                             scale=scale, enable_gqa=gqa)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)


@torch.library.custom_op("fxforge::sdpa", mutates_args=())
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
         scale: float, k_format: str, v_format: str, k_perm: Optional[list[int]], v_perm: Optional[list[int]],
         impl: str) -> torch.Tensor:
    _check_impl("sdpa", impl)
    kernels = impl == "triton" and q.is_cuda
    k = fake_quantize_rows(k, k_format, k_perm, kernels)
    v = fake_quantize_rows(v, v_format, v_perm, kernels)
    return _like(q, _attention(q, k, v, attn_mask, is_causal, scale, float32=not kernels))


@sdpa.register_fake
def _sdpa_fake(q, k, v, attn_mask, is_causal, scale, k_format, v_format, k_perm, v_perm, impl):
    return torch.empty_like(q)


def check_format(name: str, value: str, block: int) -> str:
    """The canonical name of a KV format option ("native" stays), or ValueError naming it."""
    if value == NATIVE:
        return value
    try:
        return parse_kv_format(value, None if "_" in value else block).name
    except ValueError as exc:
        raise ValueError(f"{name}={value!r} with block={block}: {exc}") from None


ROTARY = torch.ops.fxforge.rotary.default
SDPA = torch.ops.fxforge.sdpa.default
