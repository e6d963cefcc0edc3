"""Rotary position embedding (RoPE), with an optional per-head channel permutation (KSort).

`rope_ref` is the float32 reference and the CPU path. A permuted input holds, in channel c of head h,
the original channel `channel_perm[h, c]`; RoPE stays exact because the rotation is applied in the
original channel order and the result is permuted back, i.e. pair partners and frequencies follow
their channels.
"""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:  # pairs (2i, 2i+1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # pairs (i, i + D/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_ref(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    interleaved: bool,
    channel_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T, H, D], positions [T], inv_freq [D/2], channel_perm [H, D] or None -> [T, H, D] in x.dtype."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    xf = x.float()
    if channel_perm is None:
        return _rotate(xf, cos, sin, interleaved).to(x.dtype)
    perm = channel_perm.long().unsqueeze(0).expand_as(xf)
    original = torch.empty_like(xf).scatter_(-1, perm, xf)  # original[..., perm[c]] = x[..., c]
    return _rotate(original, cos, sin, interleaved).gather(-1, perm).to(x.dtype)
