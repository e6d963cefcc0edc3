"""Paged causal attention over a KV cache in any format (GQA/MQA, variable-length, chunked).

Batch layout: queries are flat [T, Hq, D]; sequence s owns queries query_start[s]:query_start[s+1]
and has seq_lens[s] tokens in the cache (the new ones included, already written). Query j of a chunk
of n sits at position seq_lens[s] - n + j and sees keys at positions <= its own (and, with a sliding
window w > 0, > position - w). Query head h reads KV head h // (Hq / Hkv). The key at index i of
a sequence's context sits at position i.

With `key_rope` (a table from kernels/rope.py's key_rope_table), the cache holds keys before RoPE
(pre-RoPE keys, in a key-RoPE channel layout): they are rotated at their positions as they are read,
and q arrives already rotated, in the same channel order.
"""

from __future__ import annotations

import torch

from fxforge.kernels.kv_cache import kv_read_ref
from fxforge.kernels.rope import rotate_keys_ref


def attention_ref(
    q: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor, v_data: torch.Tensor, v_scale: torch.Tensor,
    page_table: torch.Tensor, query_start: torch.Tensor, seq_lens: torch.Tensor,
    k_format: str, v_format: str, scale: float, sliding_window: int, key_rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 reference: per sequence, dequantize its context (and rotate pre-RoPE keys), masked
    softmax(q k^T * scale) v."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    group = num_q_heads // k_data.shape[2]
    page_size = k_data.shape[1]
    out = torch.zeros_like(q)
    starts, lens = query_start.tolist(), seq_lens.tolist()
    for s, length in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        pages = page_table[s, : (length + page_size - 1) // page_size]
        k = kv_read_ref(k_data, k_scale, pages, length, k_format, head_dim)
        if key_rope is not None:
            k = rotate_keys_ref(k, torch.arange(length, device=q.device), key_rope)
        k = k.repeat_interleave(group, dim=1)
        v = kv_read_ref(v_data, v_scale, pages, length, v_format, head_dim).repeat_interleave(group, dim=1)
        qs = q[q0:q1].float()
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        q_pos = torch.arange(length - (q1 - q0), length, device=q.device)[:, None]
        k_pos = torch.arange(length, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window > 0:
            visible &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
