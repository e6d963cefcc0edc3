"""Rotary position embedding (RoPE), with an optional per-head channel permutation (KSort).

`rope_ref` is the float32 reference and the CPU path. A permuted input holds, in channel c of head h,
the original channel `channel_perm[h, c]`; RoPE stays exact because the rotation is applied in the
original channel order and the result is permuted back, i.e. pair partners and frequencies follow
their channels.

`rope_triton` does the same in one pass over x, with one of two kernels:
  _rope_kernel           no permutation: each program loads the two halves of every pair side by
                         side for a few heads and computes cos/sin once per pair, shared by the heads;
  _rope_permuted_kernel  channel c of head h holds original channel o = perm[h, c]; it is rotated
                         with the channel holding o's pair partner, at o's frequency:
                         out[c] = x[c] * cos(pos * inv_freq[f(o)]) + sign(o) * x[partner[c]] * sin(...).
                         o and partner[c] come from one int32 table per head (o | partner << 16),
                         built on the host once per permutation tensor (`rope_tables`); loads and
                         stores of x stay in channel order, only the partner is gathered.

Pre-RoPE key caches store keys before rotation; attention rotates them when it reads them
(kernels/attention.py, kernels/paged_attention.py), at each key's position in its sequence. The
stored channel order must be a *key-RoPE layout*: per KV head, channels j and j + D/2 hold the two
channels of one RoPE pair (either way round), whatever the model's own pair layout. That keeps the
rotation a swap of tile halves in the kernels. `key_rope_table` describes such a layout as one
float32 table [H, 3, D/2]: per pair slot j, the pair's inverse frequency (negated when the slot holds
the pair's second channel in its low half), and the scales of channels j and j + D/2, which the
reader multiplies in before rotating (keys may be stored divided by per-channel scales);
`rotate_keys_ref` applies it.
"""

from __future__ import annotations

import torch

from fxforge.kernels.triton_support import check_launchable, jit, tl, triton

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


def _pair_of(channels: torch.Tensor, half: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(RoPE pair index, is the pair's first channel) of original channels."""
    if interleaved:
        return channels // 2, channels % 2 == 0
    return channels % half, channels < half


def is_key_rope_layout(channel_perm: torch.Tensor | None, interleaved: bool, head_dim: int) -> bool:
    """True when channel order `channel_perm` ([H, D], None: the model's own) puts each RoPE pair at
    channels j and j + D/2 (see the module docstring)."""
    half = head_dim // 2
    perm = torch.arange(head_dim)[None] if channel_perm is None else channel_perm.long().cpu()
    pair, first = _pair_of(perm, half, interleaved)
    return bool((pair[:, :half] == pair[:, half:]).all() and (first[:, :half] != first[:, half:]).all())


def key_rope_table(inv_freq: torch.Tensor, interleaved: bool, channel_perm: torch.Tensor | None, num_heads: int,
                   head_dim: int, channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [H, 3, D/2] for keys stored in channel order `channel_perm` ([H, D] or None) and
    divided by `channel_scale` ([H, D] or None): rows signed inverse frequency, scale of channel j,
    scale of channel j + D/2. ValueError unless the order is a key-RoPE layout."""
    if not is_key_rope_layout(channel_perm, interleaved, head_dim):
        raise ValueError("pre-RoPE keys need channels j and j + D/2 of every head to hold one RoPE pair; "
                         "this channel order does not (bfp-kv with pre_rope=True rearranges it)")
    half = head_dim // 2
    perm = torch.arange(head_dim).expand(num_heads, -1) if channel_perm is None else channel_perm.long().cpu()
    pair, first = _pair_of(perm[:, :half], half, interleaved)
    freq = inv_freq.float().cpu()[pair] * torch.where(first, 1.0, -1.0)
    scale = torch.ones(num_heads, head_dim) if channel_scale is None else channel_scale.float().cpu()
    return torch.stack([freq, scale[:, :half], scale[:, half:]], dim=1).contiguous()


def rotate_keys_ref(k: torch.Tensor, positions: torch.Tensor, key_rope: torch.Tensor) -> torch.Tensor:
    """Stored pre-RoPE keys k [N, H, D] at `positions` [N] -> rotated keys, float32 [N, H, D]: per slot j,
    (lo, hi) = (k_j s_j, k_{j+D/2} s_{j+D/2}) becomes (lo cos - hi sin, hi cos + lo sin) at angle
    position * freq_j, the rotation rope_ref gives the pair in the model's own layout."""
    half = k.shape[-1] // 2
    table = key_rope.to(k.device, torch.float32)
    angles = positions.to(torch.float32)[:, None, None] * table[None, :, 0]
    cos, sin = angles.cos(), angles.sin()
    lo, hi = k[..., :half].float() * table[:, 1], k[..., half:].float() * table[:, 2]
    return torch.cat((lo * cos - hi * sin, hi * cos + lo * sin), dim=-1)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


@jit
def rotated(x, x_partner, cos, signed_sin):
    # One channel of a rotated pair: x cos + x_partner sin (-sin for the pair's first channel), with
    # the FMA written out. Left to the compiler, which product is contracted into the add depends on
    # how the expression is spelled: _rope_kernel's x2 cos + x1 sin and rope_kv_write's
    # x cos + x_partner sin (the same value) once rounded float32 keys differently.
    return tl.fma(x, cos, x_partner * signed_sin)


@jit
def _rope_kernel(
    x_ptr,  # *fp32|bf16|fp16 [T, H, D]: input, unit stride along D
    out_ptr,  # *same dtype [T, H, D] out, contiguous
    positions_ptr,  # *int32|int64 [T]: position of each token
    inv_freq_ptr,  # *float [D/2]: frequency of each RoPE pair
    num_heads,  # H
    stride_xt,  # x stride between tokens (elements)
    stride_xh,  # x stride between heads (elements)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_PAIRS: tl.constexpr,  # next power of two >= D/2
    BLOCK_H: tl.constexpr,  # heads per program (power of two)
    INTERLEAVED: tl.constexpr,  # pairs (2i, 2i+1) if True, else (i, i + D/2)
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    pairs = tl.arange(0, BLOCK_PAIRS)[None, :]
    in_row = pairs < HEAD_DIM // 2
    mask = (heads < num_heads) & in_row
    if INTERLEAVED:
        first = 2 * pairs
        second = 2 * pairs + 1
    else:
        first = pairs
        second = pairs + HEAD_DIM // 2
    angle = tl.load(positions_ptr + token).to(tl.float32) * tl.load(inv_freq_ptr + pairs, mask=in_row, other=0.0).to(tl.float32)
    cos = tl.cos(angle)  # [1, BLOCK_PAIRS]: shared by the heads of this program
    sin = tl.sin(angle)
    row = x_ptr + token * stride_xt + heads * stride_xh
    x1 = tl.load(row + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + second, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + (token * num_heads + heads) * HEAD_DIM
    tl.store(out + first, rotated(x1, x2, cos, -sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + second, rotated(x2, x1, cos, sin).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def permuted_pair(code, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    # a rope_tables entry -> (is the channel the first of its original pair, its frequency index,
    # the channel holding its partner)
    original = code & 0xFFFF
    partner = code >> 16
    if INTERLEAVED:
        is_first = (original % 2) == 0
        freq = original // 2
    else:
        is_first = original < HEAD_DIM // 2
        freq = tl.where(is_first, original, original - HEAD_DIM // 2)
    return is_first, freq, partner


@jit
def _rope_permuted_kernel(
    x_ptr,  # *fp32|bf16|fp16 [T, H, D]: input in permuted channel order, unit stride along D
    out_ptr,  # *same dtype [T, H, D] out, contiguous
    positions_ptr,  # *int32|int64 [T]: position of each token
    inv_freq_ptr,  # *float [D/2]: frequency of each RoPE pair (in original channel order)
    table_ptr,  # *int32 [H, D]: original channel o | (channel holding o's partner) << 16
    num_heads,  # H
    stride_xt,  # x stride between tokens (elements)
    stride_xh,  # x stride between heads (elements)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next power of two >= D
    BLOCK_H: tl.constexpr,  # heads per program (power of two)
    INTERLEAVED: tl.constexpr,  # original pairs (2i, 2i+1) if True, else (i, i + D/2)
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    channels = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (channels < HEAD_DIM)
    code = tl.load(table_ptr + heads * HEAD_DIM + channels, mask=mask, other=0)
    is_first, freq, partner = permuted_pair(code, HEAD_DIM, INTERLEAVED)
    angle = tl.load(positions_ptr + token).to(tl.float32) * tl.load(inv_freq_ptr + freq, mask=mask, other=0.0).to(tl.float32)
    sin = tl.sin(angle)
    row = x_ptr + token * stride_xt + heads * stride_xh
    x = tl.load(row + channels, mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(row + partner, mask=mask, other=0.0).to(tl.float32)
    out = rotated(x, x_partner, tl.cos(angle), tl.where(is_first, -sin, sin))
    tl.store(out_ptr + (token * num_heads + heads) * HEAD_DIM + channels, out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_VALUES_PER_PROGRAM = 512  # heads per program = this // D (small tiles measured fastest on H100)
_CACHE_SIZE = 256
# (data_ptr, version, device, shape, stride, interleaved) -> (perm, table). The entry holds the
# permutation tensor, so its memory cannot be reused by another tensor while the entry lives; an
# in-place write bumps the version and misses the cache.
_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_tables(channel_perm: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """int32 [H, D]: for channel c of head h, o | p << 16 with o = channel_perm[h, c] (its original
    channel) and p the channel of head h holding o's pair partner. Cached per permutation tensor."""
    key = (channel_perm.data_ptr(), channel_perm._version, channel_perm.device, tuple(channel_perm.shape),
           channel_perm.stride(), bool(interleaved))
    cached = _tables.get(key)
    if cached is not None:
        return cached[1]
    perm = channel_perm.long()
    half = perm.shape[1] // 2
    pair = perm ^ 1 if interleaved else torch.where(perm < half, perm + half, perm - half)
    channels = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    holder = torch.empty_like(perm).scatter_(1, perm, channels)  # holder[h, o]: the channel holding o
    table = (perm | (holder.gather(1, pair) << 16)).to(torch.int32).contiguous()
    if len(_tables) >= _CACHE_SIZE:
        _tables.pop(next(iter(_tables)))
    _tables[key] = (channel_perm, table)
    return table


def _check_rope_inputs(x, positions, inv_freq, channel_perm) -> None:
    check_launchable("rope_triton", "x", x, "rope_ref")
    if x.dim() != 3 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rope_triton: x must be float32/bfloat16/float16 [T, H, D], got {x.dtype} {tuple(x.shape)}")
    tokens, heads, head_dim = x.shape
    if head_dim % 2 or x.stride(2) != 1:
        raise ValueError(f"rope_triton: x [T, H, D] needs an even D with unit stride, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}; call .contiguous() first")
    if positions.shape != (tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rope_triton: positions must be int32/int64 [{tokens}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if inv_freq.shape != (head_dim // 2,) or not inv_freq.is_floating_point():
        raise ValueError(f"rope_triton: inv_freq must be a float [{head_dim // 2}] (D/2), got {inv_freq.dtype} "
                         f"{tuple(inv_freq.shape)}")
    if channel_perm is not None and tuple(channel_perm.shape) != (heads, head_dim):
        raise ValueError(f"rope_triton: channel_perm must be [H, D] = {(heads, head_dim)}, got "
                         f"{tuple(channel_perm.shape)}")
    for name, t in (("positions", positions), ("inv_freq", inv_freq), ("channel_perm", channel_perm)):
        if t is not None and t.device != x.device:
            raise ValueError(f"rope_triton: {name} is on {t.device}, x on {x.device}; put them on one device")


def rope_triton(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    interleaved: bool,
    channel_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `rope_ref`: same arguments and result (x on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    _check_rope_inputs(x, positions, inv_freq, channel_perm)
    tokens, heads, head_dim = x.shape
    out = torch.empty((tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    positions, inv_freq = positions.contiguous(), inv_freq.contiguous()
    block_h = min(triton.next_power_of_2(heads), max(1, _VALUES_PER_PROGRAM // head_dim))
    grid = (tokens, triton.cdiv(heads, block_h))
    common = dict(HEAD_DIM=head_dim, BLOCK_H=block_h, INTERLEAVED=bool(interleaved), num_warps=4)
    if channel_perm is None:
        _rope_kernel[grid](x, out, positions, inv_freq, heads, x.stride(0), x.stride(1),
                           BLOCK_PAIRS=triton.next_power_of_2(head_dim // 2), **common)
    else:
        _rope_permuted_kernel[grid](x, out, positions, inv_freq, rope_tables(channel_perm, interleaved), heads,
                                    x.stride(0), x.stride(1), BLOCK_D=triton.next_power_of_2(head_dim), **common)
    return out
