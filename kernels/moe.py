"""Fused mixture-of-experts: routing, alignment by expert, and two grouped expert GEMMs, with no host sync.

    weights, expert_ids = moe_route(router_logits, top_k, renormalize)
    out = moe_experts(x, w_gate, w_up, w_down, weights, expert_ids)

Expert weights are stacked as in ir/modules.py: w_gate, w_up [E, I, H], w_down [E, H, I]. A pair is
one (token, slot) of the routing, numbered p = token * top_k + slot. The steps:
  1. route: probs = softmax(router_logits in float32); (weights, expert_ids) = top-k of probs;
     weights /= their sum when renormalising. The same ops, in the same order, as MoE.forward.
  2. align: the pairs sorted by expert (stably: by p within an expert), each expert's segment padded
     with -1 to a multiple of BLOCK_M, so every BLOCK_M tile of the sorted list belongs to one expert
     and a GEMM program loads one expert's weights. Sizes are static upper bounds (padded_size) and
     everything stays on the device, so a CUDA graph can hold the whole layer.
  3. gate/up: for each tile of sorted pairs and BLOCK_N columns of I, both GEMMs against x[token]
     (float32 accumulation), then h = silu(gate) * up, rounded to x's dtype (as the bf16 module rounds
     it), stored at the pairs' sorted positions: intermediate [padded_size, I].
  4. down: y = h @ w_down[e]^T in float32, times the pair's routing weight, written to row p of a
     float32 [T*k, H] buffer.
  5. out = the sum of that buffer over the k slots, in slot order, rounded once to x's dtype.
The pairs each expert received (step 2's counts) can land in a caller's int32 [E] buffer
(`expert_counts=`): the canonical MoE block keeps one per layer for the runtime.

Why a [T, k, H] buffer and a sum rather than float32 atomic adds into [T, H]: every row is written by
exactly one program, so the result is deterministic (the same bits on every run and every CUDA-graph
replay; float atomics add in arrival order), no zero fill is needed and no program contends for a row.
The price is T*k*H*4 bytes written and read back once: nothing at decode sizes, where the expert
weights dominate the traffic; on an H200 the slot sum took 8 us at one token and 55 us at 2048 tokens
of Qwen3-30B-A3B (of 590 us for the whole layer).

Launch configs (block sizes, warps, stages) are data: kernels/configs/moe_<device>.json, written by
benchmarks/moe_tune.py and picked at launch by (E, I, H, dtype) and the nearest tuned token count;
default_config otherwise. Configs are tuned for the serving dtype; other dtypes get the default.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from fxforge.kernels.triton_support import INTERPRETED, can_launch, check_launchable, dot_acc, jit, next_pow2, tl, triton

__all__ = [
    "moe_route", "MoEAlignment", "padded_size", "expert_counts_ref", "moe_align", "moe_align_ref", "GemmTiles",
    "MoEConfig", "default_config", "pick_config", "tuned_configs", "config_path", "shape_key", "CONFIG_DIR",
    "moe_gate_up_swiglu", "moe_down", "fused_moe", "fused_moe_ref", "moe_experts",
]

CONFIG_DIR = Path(__file__).parent / "configs"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MIN_DOT = 16  # tl.dot needs every dim >= 16 on the GPU
_ALIGN_CELLS = 8192  # pairs x experts compared at once by an align program (register budget)


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, top_k] float32, expert_ids [T, top_k] int32), on the device.

    softmax in float32, top-k, then weights / their sum when `renormalize`: exactly MoE.forward's
    routing (which then casts the weights to the activation dtype)."""
    if router_logits.dim() != 2 or not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"moe_route: router_logits must be [T, E] with 1 <= top_k <= E, got "
                         f"{tuple(router_logits.shape)} and top_k={top_k}")
    probs = router_logits.float().softmax(dim=-1)
    weights, expert_ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Alignment: pairs sorted by expert, segments padded to BLOCK_M
# ----------------------------------------------------------------------------------------------


class MoEAlignment(NamedTuple):
    """The pairs grouped by expert, every tensor on the device and of a size fixed by (T, k, E, block_m)."""

    sorted_pairs: torch.Tensor  # int32 [padded_size]: pair ids by expert, each segment padded with -1
    tile_experts: torch.Tensor  # int32 [padded_size / block_m]: expert of each tile, -1 past num_padded
    num_padded: torch.Tensor  # int32 [1]: entries in use (the segments' padded lengths summed)
    expert_counts: torch.Tensor  # int32 [E]: pairs routed to each expert
    block_m: int


def padded_size(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static size of `sorted_pairs`: each expert that gets pairs (at most min(E, T*k) of them) adds
    fewer than block_m padding entries; rounded up to whole tiles."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-bound // block_m) * block_m


def expert_counts_ref(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: the (token, slot) pairs routed to each expert, by scatter-add (no host sync)."""
    pair_experts = expert_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=pair_experts.device)
    return counts.scatter_add_(0, pair_experts, torch.ones_like(pair_experts))


def moe_align_ref(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> MoEAlignment:
    """Torch alignment (any device, no host sync): counts by scatter-add, segment starts by cumsum,
    the pairs' order by a stable sort, tile owners by searchsorted over the segment ends."""
    pair_experts = expert_ids.reshape(-1).long()
    num_pairs, device = pair_experts.numel(), pair_experts.device
    counts = expert_counts_ref(pair_experts, num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    order = torch.sort(pair_experts, stable=True).indices  # by expert, by pair id within an expert
    sorted_experts = pair_experts[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    positions = (padded_ends - padded)[sorted_experts] + rank
    size = padded_size(num_pairs, num_experts, block_m)
    sorted_pairs = torch.full((size,), -1, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, positions, order.to(torch.int32))
    tile_starts = torch.arange(0, size, block_m, device=device)
    owners = torch.searchsorted(padded_ends, tile_starts, right=True)
    tile_experts = torch.where(tile_starts < padded_ends[-1], owners, -1).to(torch.int32)
    return MoEAlignment(sorted_pairs, tile_experts, padded_ends[-1:].to(torch.int32), counts.to(torch.int32), block_m)


@jit
def _onehot_experts(expert_ids_ptr, chunk, num_pairs, experts, CHUNK: tl.constexpr):
    # [CHUNK, E_PAD] int32: 1 where pair chunk * CHUNK + i is routed to expert j (pairs past the end: none)
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(expert_ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
    return (ids[:, None] == experts[None, :]).to(tl.int32)


@jit
def _chunk_counts_kernel(
    expert_ids_ptr,  # *int32|int64 [num_pairs]: expert of pair p (token * top_k + slot)
    chunk_counts_ptr,  # *int32 [num_chunks, E_PAD] out: pairs of each expert in each chunk
    num_pairs,  # T * top_k
    E_PAD: tl.constexpr,  # next power of two >= E
    CHUNK: tl.constexpr,  # pairs per program
):
    experts = tl.arange(0, E_PAD)
    onehot = _onehot_experts(expert_ids_ptr, tl.program_id(0), num_pairs, experts, CHUNK)
    tl.store(chunk_counts_ptr + tl.program_id(0) * E_PAD + experts, tl.sum(onehot, axis=0))


@jit
def _place_pairs_kernel(
    expert_ids_ptr,  # *int32|int64 [num_pairs]: expert of pair p
    counts_through_ptr,  # *int32 [num_chunks, E_PAD]: pairs of each expert in chunks 0..c (a cumsum)
    sorted_pairs_ptr,  # *int32 [size] out: pair ids by expert, segments padded with -1
    tile_experts_ptr,  # *int32 [size / BLOCK_M] out: expert of each tile, -1 past the padded end
    num_padded_ptr,  # *int32 [1] out: padded entries in use
    counts_ptr,  # *int32 [num_experts] out: pairs per expert
    num_pairs,  # T * top_k
    size,  # entries of sorted_pairs (padded_size)
    num_experts,  # E
    BLOCK_M: tl.constexpr,  # GEMM tile rows: segments are padded to a multiple of it
    E_PAD: tl.constexpr,  # next power of two >= E
    CHUNK: tl.constexpr,  # pairs (entries, tiles) per program and step
):
    # Program c places the pairs of chunk c: position = its expert's segment start + the expert's
    # pairs in earlier chunks + those before it in this chunk. Every entry is written once (pairs here,
    # -1 padding below), so no ordering between programs is needed. Segment starts are recomputed by
    # each program from the totals (a cumsum over E_PAD values).
    chunk, num_chunks = tl.program_id(0), tl.num_programs(0)
    experts = tl.arange(0, E_PAD)
    totals = tl.load(counts_through_ptr + (num_chunks - 1) * E_PAD + experts)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    onehot = _onehot_experts(expert_ids_ptr, chunk, num_pairs, experts, CHUNK)
    earlier = tl.load(counts_through_ptr + chunk * E_PAD + experts) - tl.sum(onehot, axis=0)
    rank_in_chunk = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    positions = tl.sum(onehot * (ends - padded + earlier)[None, :], axis=1) + rank_in_chunk
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    routed = tl.sum(onehot, axis=1) > 0  # False past the end, and for an expert id outside [0, E)
    tl.store(sorted_pairs_ptr + positions, pairs, mask=routed)

    if chunk == 0:  # program 0 pads the segments and writes the per-expert outputs
        slack = tl.arange(0, BLOCK_M)
        tl.store(sorted_pairs_ptr + (ends - padded + totals)[:, None] + slack[None, :],
                 tl.full([E_PAD, BLOCK_M], -1, tl.int32), mask=slack[None, :] < (padded - totals)[:, None])
        tl.store(counts_ptr + experts, totals, mask=experts < num_experts)
        tl.store(num_padded_ptr, total)
    for start in range(chunk * CHUNK, size, num_chunks * CHUNK):  # the entries past the padded end
        entries = start + tl.arange(0, CHUNK)
        tl.store(sorted_pairs_ptr + entries, tl.full([CHUNK], -1, tl.int32), mask=(entries >= total) & (entries < size))
    num_tiles = size // BLOCK_M
    for start in range(chunk * CHUNK, num_tiles, num_chunks * CHUNK):
        tiles = start + tl.arange(0, CHUNK)
        tile_start = tiles * BLOCK_M
        owner = tl.sum((ends[None, :] <= tile_start[:, None]).to(tl.int32), axis=1)  # segments ending before it
        tl.store(tile_experts_ptr + tiles, tl.where(tile_start < total, owner, -1), mask=tiles < num_tiles)


def moe_align(expert_ids: torch.Tensor, num_experts: int, block_m: int,
              counts_out: torch.Tensor | None = None) -> MoEAlignment:
    """expert_ids [T, k] -> MoEAlignment, on the device, without a host sync.

    Where Triton can launch: per-chunk expert counts, their cumsum over chunks (torch), then every
    chunk's pairs placed in parallel; three launches at any size (the torch path takes a dozen, a
    sort among them). moe_align_ref otherwise. Both give the same tensors, bit for bit.
    counts_out: an int32 [E] tensor to hold expert_counts (written in place: a buffer a CUDA graph
    captured keeps its address); None allocates one."""
    if not can_launch(expert_ids):
        alignment = moe_align_ref(expert_ids, num_experts, block_m)
        if counts_out is None:
            return alignment
        return alignment._replace(expert_counts=counts_out.copy_(alignment.expert_counts))
    num_pairs, device = expert_ids.numel(), expert_ids.device
    size, e_pad = padded_size(num_pairs, num_experts, block_m), next_pow2(num_experts)
    chunk_size = max(16, _ALIGN_CELLS // e_pad)
    num_chunks = max(1, triton.cdiv(num_pairs, chunk_size))
    pair_experts = expert_ids.reshape(-1)
    chunk_counts = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=device)
    _chunk_counts_kernel[(num_chunks,)](pair_experts, chunk_counts, num_pairs, E_PAD=e_pad, CHUNK=chunk_size,
                                        num_warps=4)
    sorted_pairs = torch.empty(size, dtype=torch.int32, device=device)
    tile_experts = torch.empty(size // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device) if counts_out is None else counts_out
    _place_pairs_kernel[(num_chunks,)](pair_experts, chunk_counts.cumsum(0, dtype=torch.int32), sorted_pairs,
                                       tile_experts, num_padded, counts, num_pairs, size, num_experts, BLOCK_M=block_m,
                                       E_PAD=e_pad, CHUNK=chunk_size, num_warps=4)
    return MoEAlignment(sorted_pairs, tile_experts, num_padded, counts, block_m)


# ----------------------------------------------------------------------------------------------
# Launch configs (data)
# ----------------------------------------------------------------------------------------------


def _check_pow2(owner: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < _MIN_DOT or value & (value - 1):
            raise ValueError(f"{owner}: {name}={value!r} must be a power of two >= {_MIN_DOT}")


@dataclass(frozen=True)
class GemmTiles:
    """Launch parameters of one grouped GEMM kernel."""

    block_n: int
    block_k: int
    group_m: int = 1  # m-tiles that sweep the n-tiles together, sharing an expert's weight tiles in L2
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        _check_pow2("GemmTiles", block_n=self.block_n, block_k=self.block_k)
        if self.group_m < 1 or self.num_stages < 1 or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmTiles: group_m={self.group_m} and num_stages={self.num_stages} must be >= 1, "
                             f"num_warps={self.num_warps} a power of two <= 16")


@dataclass(frozen=True)
class MoEConfig:
    """How fused_moe launches: the tile rows shared by the alignment and both GEMMs, and each GEMM's tiles."""

    VERSION: ClassVar[int] = 1  # of the JSON layout; a file of another version is refused

    block_m: int
    gate_up: GemmTiles
    down: GemmTiles

    def __post_init__(self):
        _check_pow2("MoEConfig", block_m=self.block_m)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        """The inverse of to_dict; unknown or missing keys are an error."""
        _check_keys("MoEConfig", data, {f.name for f in fields(cls)})
        tiles = {}
        for part in ("gate_up", "down"):
            _check_keys(f"MoEConfig.{part}", data[part], {f.name for f in fields(GemmTiles)},
                        optional={"group_m", "num_warps", "num_stages"})
            tiles[part] = GemmTiles(**data[part])
        return cls(block_m=data["block_m"], **tiles)


def _check_keys(owner: str, data: dict, allowed: set, optional: frozenset | set = frozenset()) -> None:
    unknown, missing = set(data) - allowed, allowed - set(optional) - set(data)
    if unknown or missing:
        raise ValueError(f"{owner}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                         f"expected {sorted(allowed)}")


def default_config(rows_per_expert: float, dtype: torch.dtype) -> MoEConfig:
    """The config when no tuned one matches. BLOCK_M 16 (tl.dot's smallest) while experts get <= 16
    rows on average (decode: larger tiles would only multiply padding rows), else 64; 64x64 weight tiles
    (float32: BLOCK_K 32, to keep the staged tiles within shared memory); 4 warps, 3 stages, GROUP_M 8:
    the Triton matmul tutorial's starting point."""
    block_k = 32 if dtype == torch.float32 else 64
    tiles = GemmTiles(block_n=64, block_k=block_k, group_m=8, num_warps=4, num_stages=3)
    return MoEConfig(block_m=16 if rows_per_expert <= 16 else 64, gate_up=tiles, down=tiles)


def shape_key(num_experts: int, intermediate: int, hidden: int, dtype: torch.dtype) -> str:
    """Key of one MoE shape in a config file: the gate/up GEMM is N = I by K = H."""
    return f"E={num_experts},N={intermediate},K={hidden},dtype={str(dtype).removeprefix('torch.')}"


def config_path(device_name: str, directory: Path = CONFIG_DIR) -> Path:
    """kernels/configs/moe_<device name, non-alphanumerics as _>.json, e.g. moe_NVIDIA_H200.json."""
    return Path(directory) / f"moe_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.json"


@functools.cache
def tuned_configs(device_name: str, directory: Path = CONFIG_DIR) -> dict[str, dict[int, MoEConfig]]:
    """{shape_key: {tokens: MoEConfig}} from the device's config file ({} without one); read once."""
    path = config_path(device_name, directory)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("version") != MoEConfig.VERSION:
        raise ValueError(f"{path}: version {data.get('version')!r}, this fxforge reads version {MoEConfig.VERSION}; "
                         f"rerun benchmarks/moe_tune.py")
    return {key: {int(tokens): MoEConfig.from_dict(entry["config"]) for tokens, entry in buckets.items()}
            for key, buckets in data["shapes"].items()}


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def pick_config(num_experts: int, intermediate: int, hidden: int, top_k: int, tokens: int, dtype: torch.dtype,
                device: torch.device) -> MoEConfig:
    """The tuned config of this CUDA device and shape at the tuned token count nearest to `tokens` (in
    log scale), else default_config."""
    tuned = tuned_configs(_device_name(device)) if device.type == "cuda" else {}
    buckets = tuned.get(shape_key(num_experts, intermediate, hidden, dtype))
    if buckets:
        nearest = min(buckets, key=lambda bucket: (abs(math.log2(bucket) - math.log2(max(tokens, 1))), bucket))
        return buckets[nearest]
    return default_config(tokens * top_k / num_experts, dtype)


# ----------------------------------------------------------------------------------------------
# The expert GEMMs
# ----------------------------------------------------------------------------------------------


@jit
def _program_tile(N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # (m-tile, n-tile) of this program. The grid is m-tiles x n-tiles (its size fixed by the static
    # bound, so no count travels as an argument). GROUP_M consecutive m-tiles (mostly one expert's)
    # visit each n-tile one after the other, so the weight tile they share is read from L2.
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_m_tiles = tl.num_programs(0) // num_n_tiles
    per_group = GROUP_M * num_n_tiles
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m_tiles - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows_in_group, (pid % per_group) // rows_in_group


@jit
def _gate_up_swiglu_kernel(
    x_ptr,  # *fp32|bf16|fp16 [T, K]: the tokens
    w_gate_ptr,  # *same [E, N, K]
    w_up_ptr,  # *same [E, N, K]
    out_ptr,  # *same [size, N] out: silu(x @ w_gate[e]^T) * (x @ w_up[e]^T) at each pair's sorted position
    sorted_pairs_ptr,  # *int32 [size]: pair ids by expert, -1 for padding
    tile_experts_ptr,  # *int32 [size / BLOCK_M]: expert of each tile, -1 past the padded end
    top_k,  # slots per token: token = pair // top_k
    N,  # I
    K,  # H
    stride_xt, stride_xk,  # x strides (elements)
    stride_ge, stride_gn, stride_gk,  # w_gate strides
    stride_ue, stride_un, stride_uk,  # w_up strides
    stride_out,  # out stride between rows (unit stride along N)
    BLOCK_M: tl.constexpr,  # sorted pairs per tile (the alignment's block_m)
    BLOCK_N: tl.constexpr,  # columns of I per program
    BLOCK_K: tl.constexpr,  # reduction step along H
    GROUP_M: tl.constexpr,  # m-tiles per L2 group (see _tile_coords)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for float32 operands
    UPCAST_DOT: tl.constexpr,  # bf16 under the interpreter (see _dot)
):
    pid_m, pid_n = _program_tile(N, BLOCK_N, GROUP_M)
    expert = tl.load(tile_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:  # past the padded end: the static grid covers the worst case
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    is_pair = pairs >= 0
    tokens = (tl.where(is_pair, pairs, 0) // top_k).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrapped: loads stay in bounds, the store masks
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xk
    gate_ptrs = w_gate_ptr + expert * stride_ge + cols[None, :] * stride_gn + ks[:, None] * stride_gk
    up_ptrs = w_up_ptr + expert * stride_ue + cols[None, :] * stride_un + ks[:, None] * stride_uk
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = ks < K - k_start
        a = tl.load(x_ptrs, mask=is_pair[:, None] & k_ok[None, :], other=0.0)
        gate = dot_acc(a, tl.load(gate_ptrs, mask=k_ok[:, None], other=0.0), gate, INPUT_PRECISION, UPCAST_DOT)
        up = dot_acc(a, tl.load(up_ptrs, mask=k_ok[:, None], other=0.0), up, INPUT_PRECISION, UPCAST_DOT)
        x_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_gk
        up_ptrs += BLOCK_K * stride_uk
    h = gate / (1.0 + tl.exp(-gate)) * up  # padding rows: silu(0) * 0 = 0
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + out_cols[None, :], h.to(out_ptr.dtype.element_ty),
             mask=out_cols[None, :] < N)


@jit
def _down_kernel(
    h_ptr,  # *fp32|bf16|fp16 [size, K]: the gate/up kernel's output, unit stride along K
    w_down_ptr,  # *same [E, N, K]
    weights_ptr,  # *float [T, top_k]: routing weights
    out_ptr,  # *fp32 [T * top_k, N] out: row p = weight of p * (h @ w_down[e]^T) of p
    sorted_pairs_ptr,  # *int32 [size]: pair ids by expert, -1 for padding
    tile_experts_ptr,  # *int32 [size / BLOCK_M]: expert of each tile, -1 past the padded end
    top_k,  # slots per token
    N,  # H
    K,  # I
    stride_h,  # h stride between rows
    stride_de, stride_dn, stride_dk,  # w_down strides
    stride_wt, stride_wk,  # routing weights strides
    BLOCK_M: tl.constexpr,  # sorted pairs per tile (the alignment's block_m)
    BLOCK_N: tl.constexpr,  # columns of H per program
    BLOCK_K: tl.constexpr,  # reduction step along I
    GROUP_M: tl.constexpr,  # m-tiles per L2 group (see _tile_coords)
    INPUT_PRECISION: tl.constexpr,  # "ieee" for float32 operands
    UPCAST_DOT: tl.constexpr,  # bf16 under the interpreter (see _dot)
):
    pid_m, pid_n = _program_tile(N, BLOCK_N, GROUP_M)
    expert = tl.load(tile_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:  # past the padded end
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    is_pair = pairs >= 0
    slot_rows = tl.where(is_pair, pairs, 0)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]  # padding rows hold zeros
    w_ptrs = w_down_ptr + expert * stride_de + cols[None, :] * stride_dn + ks[:, None] * stride_dk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = ks < K - k_start
        a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
        acc = dot_acc(a, tl.load(w_ptrs, mask=k_ok[:, None], other=0.0), acc, INPUT_PRECISION, UPCAST_DOT)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_dk
    route_weight = tl.load(weights_ptr + (slot_rows // top_k) * stride_wt + (slot_rows % top_k) * stride_wk,
                           mask=is_pair, other=0.0).to(tl.float32)
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + slot_rows.to(tl.int64)[:, None] * N + out_cols[None, :], acc * route_weight[:, None],
             mask=is_pair[:, None] & (out_cols[None, :] < N))


def _dot_meta(tiles: GemmTiles, block_m: int, dtype: torch.dtype) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
                INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",  # ignored for 16-bit operands
                UPCAST_DOT=INTERPRETED and dtype == torch.bfloat16, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages)


def moe_gate_up_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, alignment: MoEAlignment,
                       top_k: int, tiles: GemmTiles) -> torch.Tensor:
    """Step 3 alone: intermediate [padded_size, I] in x's dtype, row = sorted position (rows of unused
    tiles are left unwritten). Inputs as fused_moe checks them; for the tuner and fused_moe."""
    intermediate = w_gate.shape[1]
    out = torch.empty(alignment.sorted_pairs.numel(), intermediate, dtype=x.dtype, device=x.device)
    grid = (alignment.tile_experts.numel() * triton.cdiv(intermediate, tiles.block_n),)
    if grid[0]:
        _gate_up_swiglu_kernel[grid](
            x, w_gate, w_up, out, alignment.sorted_pairs, alignment.tile_experts, top_k, intermediate, x.shape[1],
            *x.stride(), *w_gate.stride(), *w_up.stride(), out.stride(0),
            **_dot_meta(tiles, alignment.block_m, x.dtype))
    return out


def moe_down(intermediate: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor, alignment: MoEAlignment,
             tiles: GemmTiles) -> torch.Tensor:
    """Step 4 alone: [T, k, H] float32, slot (t, j) = weights[t, j] * (its row of intermediate @ w_down[e]^T)."""
    num_tokens, top_k = weights.shape
    hidden = w_down.shape[1]
    out = torch.empty(num_tokens, top_k, hidden, dtype=torch.float32, device=intermediate.device)
    grid = (alignment.tile_experts.numel() * triton.cdiv(hidden, tiles.block_n),)
    if grid[0]:
        _down_kernel[grid](
            intermediate, w_down, weights, out, alignment.sorted_pairs, alignment.tile_experts, top_k, hidden,
            intermediate.shape[1], intermediate.stride(0), *w_down.stride(),
            *weights.stride(), **_dot_meta(tiles, alignment.block_m, intermediate.dtype))
    return out


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def _check_inputs(fn: str, x, w_gate, w_up, w_down, weights, expert_ids) -> None:
    """Shapes, dtypes and devices. The values of expert_ids, which must lie in [0, E), are not read
    (that would sync the host): the reference raises on one outside, the kernels drop its pair, which
    leaves that slot's output undefined but writes nothing out of bounds."""
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: x must be [T, H] float32/bfloat16/float16, got {x.dtype} {tuple(x.shape)}")
    if w_gate.dim() != 3 or w_gate.shape[2] != x.shape[1]:
        raise ValueError(f"{fn}: w_gate must be [E, I, H={x.shape[1]}], got {tuple(w_gate.shape)}")
    num_experts, intermediate, hidden = w_gate.shape
    expected = {"w_gate": (num_experts, intermediate, hidden), "w_up": (num_experts, intermediate, hidden),
                "w_down": (num_experts, hidden, intermediate)}
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if tuple(w.shape) != expected[name] or w.dtype != x.dtype:
            raise ValueError(f"{fn}: {name} must be {x.dtype} {list(expected[name])} (E, I, H from w_gate and x), "
                             f"got {w.dtype} {tuple(w.shape)}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0] or expert_ids.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{fn}: expert_ids must be int32/int64 [T={x.shape[0]}, top_k], got "
                         f"{expert_ids.dtype} {tuple(expert_ids.shape)}")
    if not 1 <= expert_ids.shape[1] <= num_experts:
        raise ValueError(f"{fn}: expert_ids has top_k={expert_ids.shape[1]} slots; expected 1..E={num_experts}")
    if weights.shape != expert_ids.shape or not weights.is_floating_point():
        raise ValueError(f"{fn}: weights must be float {list(expert_ids.shape)} (the shape of expert_ids), got "
                         f"{weights.dtype} {tuple(weights.shape)}")
    for name, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down), ("weights", weights),
                    ("expert_ids", expert_ids)):
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, x on {x.device}; put them on one device")


def _check_counts(fn: str, expert_counts: torch.Tensor | None, num_experts: int, device: torch.device) -> None:
    if expert_counts is not None and (expert_counts.shape != (num_experts,) or expert_counts.dtype != torch.int32
                                      or expert_counts.device != device or not expert_counts.is_contiguous()):
        raise ValueError(f"{fn}: expert_counts must be a contiguous int32 [E={num_experts}] tensor on {device}, got "
                         f"{expert_counts.dtype} {tuple(expert_counts.shape)} on {expert_counts.device}")


def fused_moe(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              weights: torch.Tensor, expert_ids: torch.Tensor, config: MoEConfig | None = None,
              expert_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `fused_moe_ref` (CUDA, or CPU under TRITON_INTERPRET=1): x [T, H] -> [T, H] in x's dtype.

    The alignment, both grouped GEMMs and the slot sum, with no host sync (CUDA-graph capturable).
    config: the launch config; None picks the tuned one for this device and shape (pick_config).
    expert_counts: int32 [E], overwritten with the pairs routed to each expert (the alignment writes
    it directly: no extra launch)."""
    check_launchable("fused_moe", "x", x, "fused_moe_ref")
    _check_inputs("fused_moe", x, w_gate, w_up, w_down, weights, expert_ids)
    num_experts, intermediate, hidden = w_gate.shape
    _check_counts("fused_moe", expert_counts, num_experts, x.device)
    top_k = expert_ids.shape[1]
    if config is None:
        config = pick_config(num_experts, intermediate, hidden, top_k, x.shape[0], x.dtype, x.device)
    alignment = moe_align(expert_ids, num_experts, config.block_m, expert_counts)
    h = moe_gate_up_swiglu(x, w_gate, w_up, alignment, top_k, config.gate_up)
    return moe_down(h, w_down, weights, alignment, config.down).sum(dim=1).to(x.dtype)


def fused_moe_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  weights: torch.Tensor, expert_ids: torch.Tensor, expert_counts: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Float32 reference (the CPU path): x [T, H], routing [T, k] -> sum_k weight * expert(x) [T, H].

    A loop over experts (reading which tokens each got syncs a GPU; this is the CPU path): both GEMMs
    in float32, h rounded to x's dtype, each pair's weighted output kept per slot, the slots summed in
    order and rounded once to x's dtype. expert_counts: as fused_moe's."""
    _check_inputs("fused_moe_ref", x, w_gate, w_up, w_down, weights, expert_ids)
    _check_counts("fused_moe_ref", expert_counts, w_gate.shape[0], x.device)
    if expert_counts is not None:
        expert_counts.copy_(expert_counts_ref(expert_ids, w_gate.shape[0]))
    per_slot = torch.zeros(*expert_ids.shape, x.shape[1], dtype=torch.float32, device=x.device)
    for expert in range(w_gate.shape[0]):
        token, slot = (expert_ids == expert).nonzero(as_tuple=True)
        xe = x[token].float()
        h = (F.silu(xe @ w_gate[expert].float().T) * (xe @ w_up[expert].float().T)).to(x.dtype).float()
        per_slot[token, slot] = (h @ w_down[expert].float().T) * weights[token, slot, None].float()
    return per_slot.sum(dim=1).to(x.dtype)


def moe_experts(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                weights: torch.Tensor, expert_ids: torch.Tensor, expert_counts: torch.Tensor | None = None
                ) -> torch.Tensor:
    """sum_k weights * expert_k(x): fused_moe where a Triton kernel can run on x, fused_moe_ref otherwise."""
    impl = fused_moe if can_launch(x) else fused_moe_ref
    return impl(x, w_gate, w_up, w_down, weights, expert_ids, expert_counts=expert_counts)
