"""The fxforge ops in export form: torch code built only from ops ONNX has, exported to become the
bodies of the `fxforge` domain's ONNX functions (fxforge/onnx_export.py).

Each form computes what its op's reference computes (kernels/), vectorised and without bit casts,
which ONNX lacks: the shared exponent floor(log2(amax)) is found from Log and corrected by exact
powers of two, codes are packed and unpacked byte by byte with small products and remainders.
Quantized bytes equal the references' bit for bit (tests/fxforge/test_onnx_export.py).

  rope / rmsnorm / swiglu   the references themselves (already plain torch)
  kv_write                  functional: returns the updated k_data, k_scale, v_data, v_scale
  attention                 paged causal attention over every sequence at once: each query token
                            gathers its sequence's pages, dequantizes them and masks by position
"""

from __future__ import annotations

import torch

from fxforge.kernels.bfp import FP32_MAX, FP32_MIN_NORMAL, parse_kv_format

# formats whose ONNX form exists (mxfp4's E2M1 rounding has no form yet)
ONNX_KINDS = ("dense", "bfp")


def _floor_log2(amax: torch.Tensor) -> torch.Tensor:
    """floor(log2(amax)) exactly, for amax > 0 normal (float32); int64."""
    guess = torch.floor(torch.log2(amax))
    guess = torch.where(torch.pow(2.0, guess) > amax, guess - 1, guess)
    guess = torch.where(torch.pow(2.0, guess + 1) <= amax, guess + 1, guess)
    return guess.to(torch.int64)


def _div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _pack(codes: torch.Tensor, m: int) -> torch.Tensor:
    """m-bit codes [..., D] -> bytes [..., D * m / 8] (kernels/bfp.py layout). Every intermediate stays
    below 256, so no exporter lowering of integer division through float32 can round it."""
    if m == 8:
        return codes
    if m == 4:
        pairs = codes.reshape(*codes.shape[:-1], -1, 2)
        return pairs[..., 0] + pairs[..., 1] * 16
    c = codes.reshape(*codes.shape[:-1], -1, 4)  # m == 6: 4 codes in 3 bytes
    b0 = c[..., 0] + torch.remainder(c[..., 1], 4) * 64
    b1 = _div(c[..., 1], 4) + torch.remainder(c[..., 2], 16) * 16
    b2 = _div(c[..., 2], 16) + c[..., 3] * 4
    return torch.stack((b0, b1, b2), dim=-1).reshape(*codes.shape[:-1], -1)


def _unpack(data: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of _pack: bytes [..., D * m / 8] (int64) -> unsigned codes [..., D]."""
    if m == 8:
        return data
    if m == 4:
        return torch.stack((torch.remainder(data, 16), _div(data, 16)), dim=-1).reshape(*data.shape[:-1], -1)
    b = data.reshape(*data.shape[:-1], -1, 3)
    c0 = torch.remainder(b[..., 0], 64)
    c1 = _div(b[..., 0], 64) + torch.remainder(b[..., 1], 16) * 4
    c2 = _div(b[..., 1], 16) + torch.remainder(b[..., 2], 4) * 16
    c3 = _div(b[..., 2], 4)
    return torch.stack((c0, c1, c2, c3), dim=-1).reshape(*data.shape[:-1], -1)


def quantize(x: torch.Tensor, fmt_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/bfp.py quantize_ref for dense and BFP formats: (data, scale)."""
    fmt = parse_kv_format(fmt_name)
    if fmt.is_dense:
        return x.to(fmt.storage_dtype()), x.new_zeros((*x.shape[:-1], 0), dtype=torch.uint8)
    m, block, head_dim = fmt.mantissa_bits, fmt.block, x.shape[-1]
    blocks = x.float().reshape(*x.shape[:-1], head_dim // block, block)
    finite = blocks.abs() <= FP32_MAX
    nonfinite = (~finite).any(dim=-1)
    blocks = torch.where(finite & (blocks.abs() >= FP32_MIN_NORMAL), blocks, 0.0)
    amax = blocks.abs().amax(dim=-1)
    exponent = _floor_log2(torch.where(amax > 0, amax, 1.0))
    biased = torch.where(amax > 0, (exponent - (m - 2) + 127).clamp(1, 254), 0)
    y = blocks * torch.pow(2.0, (127 - biased).float()).unsqueeze(-1)
    qmax = 2 ** (m - 1) - 1
    q = torch.round(y).clamp(-qmax, qmax).to(torch.int64)
    codes = torch.where(q < 0, q + 2 ** m, q)
    codes = torch.where(nonfinite.unsqueeze(-1), 0, codes)
    packed = _pack(codes.reshape(*x.shape[:-1], head_dim), m)
    scale = torch.where(nonfinite, 255, biased)
    return packed.to(torch.uint8), scale.to(torch.uint8)


def dequantize(data: torch.Tensor, scale: torch.Tensor, fmt_name: str, head_dim: int) -> torch.Tensor:
    """kernels/bfp.py dequantize_ref to float32."""
    fmt = parse_kv_format(fmt_name)
    if fmt.is_dense:
        return data.float()
    m, block = fmt.mantissa_bits, fmt.block
    codes = _unpack(data.to(torch.int64), m)
    values = torch.where(codes >= 2 ** (m - 1), codes - 2 ** m, codes).float()
    biased = scale.to(torch.int64)
    factor = torch.where(biased == 0, 0.0, torch.pow(2.0, (biased - 127).float()))
    return (values.reshape(*data.shape[:-1], head_dim // block, block) * factor.unsqueeze(-1)).reshape(values.shape)


def _write(x, data, scale, slots, fmt_name: str):
    q_data, q_scale = quantize(x, fmt_name)
    index = (slots.to(torch.int64),)
    flat = data.reshape(-1, *data.shape[2:]).index_put(index, q_data.to(data.dtype))
    new_data = flat.reshape(data.shape)
    if scale.shape[-1] == 0:
        return new_data, scale.clone()
    new_scale = scale.reshape(-1, *scale.shape[2:]).index_put(index, q_scale).reshape(scale.shape)
    return new_data, new_scale


def kv_write(k, v, k_data, k_scale, v_data, v_scale, slot_mapping, k_format: str, v_format: str):
    """kernels/kv_cache.py kv_write_pair_ref, returning the updated caches instead of writing them."""
    new_k_data, new_k_scale = _write(k, k_data, k_scale, slot_mapping, k_format)
    new_v_data, new_v_scale = _write(v, v_data, v_scale, slot_mapping, v_format)
    return new_k_data, new_k_scale, new_v_data, new_v_scale


def attention(q, k_data, k_scale, v_data, v_scale, page_table, query_start, seq_lens, k_format: str, v_format: str,
              scale: float, sliding_window: int):
    """kernels/attention.py attention_ref for every query token at once."""
    tokens, num_heads, head_dim = q.shape
    group = num_heads // k_data.shape[2]
    pages = page_table.to(torch.int64)
    token = torch.arange(tokens, device=q.device)
    ends = query_start[1:].to(torch.int64)
    seq = (token[:, None] >= ends[None, :]).sum(dim=-1)  # the sequence each query token belongs to
    position = seq_lens.to(torch.int64)[seq] - (ends[seq] - token)

    def context(data, scale_bytes, fmt):  # [T, L, Hq, D]: the pages of each token's sequence
        rows = dequantize(data[pages], scale_bytes[pages], fmt, head_dim)
        rows = rows.reshape(rows.shape[0], -1, rows.shape[-2], head_dim)[seq]
        return rows.repeat_interleave(group, dim=2)

    keys, values = context(k_data, k_scale, k_format), context(v_data, v_scale, v_format)
    scores = torch.einsum("thd,tlhd->thl", q.float(), keys) * scale
    key_pos = torch.arange(keys.shape[1], device=q.device)[None, :]
    visible = key_pos <= position[:, None]
    if sliding_window > 0:
        visible = visible & (key_pos > position[:, None] - sliding_window)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("thl,tlhd->thd", scores.softmax(dim=-1), values).to(q.dtype)
