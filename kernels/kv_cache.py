"""Paged KV cache storage in any KV format: write new K/V rows, read a sequence's context back.

A layer's cache is four tensors: k_data, k_scale, v_data, v_scale, each [num_pages, page_size,
num_kv_heads, cols]. Dense formats keep the values in k_data and an empty k_scale; packed formats
(BFP, MXFP4) keep mantissa bytes in k_data and shared exponents in k_scale (kernels/bfp.py).
A token's slot is page_id * page_size + offset_in_page.
"""

from __future__ import annotations

import torch

from fxforge.kernels.bfp import KVFormat, dequantize, parse_kv_format, quantize


def allocate_layer_cache(
    num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, fmt: KVFormat | str,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """[k_data, k_scale, v_data, v_scale] for one layer, K and V in the same format."""
    return allocate_kv_pair(num_pages, page_size, num_kv_heads, head_dim, fmt, fmt, device)


def allocate_kv_pair(num_pages, page_size, num_kv_heads, head_dim, k_format, v_format, device="cpu"):
    out = []
    for fmt in (k_format, v_format):
        fmt = parse_kv_format(fmt) if isinstance(fmt, str) else fmt
        fmt.check_head_dim(head_dim)
        shape = (num_pages, page_size, num_kv_heads)
        out.append(torch.zeros(*shape, fmt.row_bytes(head_dim) // _itemsize(fmt), dtype=fmt.storage_dtype(), device=device))
        out.append(torch.zeros(*shape, fmt.scale_cols(head_dim), dtype=torch.uint8, device=device))
    return out


def _itemsize(fmt: KVFormat) -> int:
    return torch.empty((), dtype=fmt.storage_dtype()).element_size()


def kv_write_ref(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, slot_mapping: torch.Tensor, fmt: str) -> None:
    """Quantize x [T, Hkv, D] into the format and store row t at slot slot_mapping[t] (in place)."""
    if x.shape[0] == 0:
        return
    q_data, q_scale = quantize(x, parse_kv_format(fmt))
    slots = slot_mapping.long()
    data.view(-1, *data.shape[2:])[slots] = q_data.to(data.dtype)
    if scale.shape[-1]:
        scale.view(-1, *scale.shape[2:])[slots] = q_scale


def kv_read_ref(data: torch.Tensor, scale: torch.Tensor, pages: torch.Tensor, length: int, fmt: str, head_dim: int) -> torch.Tensor:
    """The first `length` tokens stored in `pages`, dequantized to float32: [length, Hkv, D]."""
    rows = data[pages.long()].flatten(0, 1)[:length]
    scales = scale[pages.long()].flatten(0, 1)[:length]
    return dequantize(rows, scales, parse_kv_format(fmt), head_dim, torch.float32)
