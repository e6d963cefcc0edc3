"""The calibrated search of ksort: a channel order and per-channel scales for one KV head's cache.

Objective (passes/ksort.py): the expected squared attention-logit error of the quantized cache,
sum_n e_n^T C e_n over calibration rows n, where e_n is the quantization error of the row as the
reader sees it (after undoing the scales, in the current channel order, and for pre-RoPE keys
rotated to the row's position) and C = E[q q^T] over the queries that read it.

A candidate is (perm, scale), both indexed like the current layout: new channel c holds current
channel perm[c], stored divided by scale[perm[c]]. Whoever reads the cache multiplies the scale
back in (folded into W_q / QK-norm for post-RoPE keys, into W_o for V, into the key_rope table for
pre-RoPE keys), so without quantization nothing changes; with it, a channel whose values are large
and whose queries are small can be shrunk so it no longer sets its block's shared exponent.

Constraints, as the exactness of the rewrite needs them:
  free     any order, any scale per channel (V; pre-RoPE keys, whose scales the reader applies);
  pairs    post-RoPE keys: a scale is shared by the two channels of a RoPE pair (a rotation commutes
           only with a scale constant on its plane);
  slots    pre-RoPE keys keep a key-RoPE layout (kernels/rope.py): channels j and j + D/2 stay one
           pair, so the moves are slot swaps and flips inside a slot.
Every step accepts a change only when the objective falls, starting from the identity (which is a
candidate), so the result is never worse than the current layout on the calibration rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxforge.kernels.bfp import simulate_quantize
from fxforge.kernels.formats import KVFormat

_TRIAL_VALUES = 1 << 24  # values per batched objective evaluation (trials x rows x D)
_SCALE_STEPS = (2**-0.5, 2**-0.25, 2**0.25, 2**0.5)
_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Problem:
    """One KV head: x [N, D] the values the cache would store (current layout, float32), cov [D, D]
    = C in that layout, the format, and the constraint. Pre-RoPE keys also give cos / sin [N, D/2],
    the rotation of each row's pair slots (j, j + D/2) at its position."""

    x: torch.Tensor
    cov: torch.Tensor
    fmt: KVFormat
    constraint: str  # "free" | "pairs" | "slots"
    partner: torch.Tensor | None = None  # "pairs": [D] channel holding each channel's RoPE partner
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.x.shape[1]


def objective(p: Problem, perms: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """sum_n e_n^T C e_n for each candidate: perms, scales [M, D] -> [M] (float64)."""
    chunk = max(1, _TRIAL_VALUES // p.x.numel())
    out = []
    for start in range(0, perms.shape[0], chunk):
        perm, scale = perms[start:start + chunk], scales[start:start + chunk]
        held = scale.gather(1, perm)[:, None, :]  # [m, 1, D]: scale of the channel each new one holds
        stored = p.x[:, perm].permute(1, 0, 2) / held  # [m, N, D]
        err = (stored - simulate_quantize(stored, p.fmt)) * held
        err = torch.empty_like(err).scatter_(2, perm[:, None, :].expand_as(err), err)  # back to the current layout
        if p.cos is not None:
            half = p.dim // 2
            lo, hi = err[..., :half], err[..., half:]
            err = torch.cat((lo * p.cos - hi * p.sin, hi * p.cos + lo * p.sin), dim=-1)
        out.append(((err @ p.cov) * err).sum(dim=(1, 2)).double())
    return torch.cat(out)


def search(p: Problem, permute: bool, scale: bool, steps: int, start_orders: dict[str, torch.Tensor]):
    """(perm [D], scale [D], report) for one KV head: scales, then the order, then the scales again
    for that order, searched on a sample of the rows (2048 on CUDA, 512 on CPU); the result is kept
    only if it beats the identity on all rows. `start_orders` are extra candidate orders (e.g. the
    paper's weight-norm one). report: objective of the identity and of the result, starting order."""
    device = p.x.device
    identity, ones = torch.arange(p.dim, device=device), torch.ones(p.dim, device=device)
    rows = torch.linspace(0, p.x.shape[0] - 1, min(p.x.shape[0], 2048 if p.x.is_cuda else 512), device=device).long()
    sample = Problem(p.x[rows], p.cov, p.fmt, p.constraint, p.partner,
                     None if p.cos is None else p.cos[rows], None if p.sin is None else p.sin[rows])
    perm, scales, start = identity, ones, "identity"
    if scale:
        scales = _search_scales(sample, perm, _initial_scales(sample, perm), steps)
    if permute and p.fmt.block < p.dim:
        perm, start = _search_order(sample, scales, start_orders, steps)
        if scale:
            scales = _search_scales(sample, perm, scales, steps)
    base, final = objective(p, torch.stack((identity, perm)), torch.stack((ones, scales))).tolist()
    if final > base:
        perm, scales, final, start = identity, ones, base, "identity"
    return perm, scales, {"identity": base, "chosen": final, "start": start}


# -- scales -----------------------------------------------------------------------------------------

def _groups(p: Problem) -> torch.Tensor:
    """[G, D] one-hot rows: the channels that share one scale."""
    eye = torch.eye(p.dim, device=p.x.device)
    if p.constraint != "pairs":
        return eye
    first = torch.arange(p.dim, device=p.x.device) < p.partner
    return (eye + eye[p.partner])[first]


def _query_weight(p: Problem) -> torch.Tensor:
    """[D] E over rows of the C-weight a unit error in each channel gets (after the rotation)."""
    diag = p.cov.diagonal()
    if p.cos is None:
        return diag
    half = p.dim // 2
    cross = p.cov.diagonal(half)[:half]  # C[j, j + D/2]
    lo, hi = diag[:half], diag[half:]
    cos2, sin2, cs = (p.cos**2).mean(0), (p.sin**2).mean(0), (p.cos * p.sin).mean(0)
    return torch.cat((cos2 * lo + sin2 * hi + 2 * cs * cross, sin2 * lo + cos2 * hi - 2 * cs * cross))


def _initial_scales(p: Problem, perm: torch.Tensor) -> torch.Tensor:
    """Best of s = a^alpha / b^(alpha/2) over alpha (a: rms of a channel's values, b: rms of the query
    weight it meets; per group), the balance SmoothQuant strikes between the two sides."""
    groups = _groups(p)
    size = groups.sum(1)
    a = ((groups @ p.x.pow(2).mean(0)) / size).sqrt().clamp_min(1e-30)
    b = ((groups @ _query_weight(p).clamp_min(0)) / size).sqrt().clamp_min(1e-30)
    candidates = torch.stack([(a**alpha / b ** (alpha / 2)) @ groups for alpha in _ALPHAS])
    candidates = candidates / candidates.log().mean(1, keepdim=True).exp()  # geometric mean 1
    scores = objective(p, perm.expand(len(_ALPHAS), -1), candidates)
    return candidates[int(scores.argmin())]


def _search_scales(p: Problem, perm: torch.Tensor, scales: torch.Tensor, steps: int) -> torch.Tensor:
    """Coordinate descent on log-scales: each round (steps / 16 of them, at least one) scores every
    group times every step factor, then applies every group's best improving factor at once, or only
    the single best if that is better."""
    groups = _groups(p)
    factors = torch.tensor(_SCALE_STEPS, device=scales.device)
    moves = (1 + groups[:, None, :] * (factors[None, :, None] - 1)).reshape(-1, p.dim)  # [G * F, D] multipliers
    current = float(objective(p, perm[None], scales[None])[0])
    for _ in range(max(1, steps // 16)):
        trial = objective(p, perm.expand(moves.shape[0], -1), scales * moves).view(groups.shape[0], len(_SCALE_STEPS))
        best, which = trial.min(dim=1)
        improving = best < current
        if not improving.any():
            break
        chosen = moves.view(groups.shape[0], len(_SCALE_STEPS), p.dim)[torch.arange(groups.shape[0]), which]
        combined = scales * chosen[improving].prod(dim=0)
        combined_score = float(objective(p, perm[None], combined[None])[0])
        single = int(best.argmin())
        if combined_score <= float(best[single]):
            scales, current = combined, combined_score
        else:
            scales, current = scales * chosen[single], float(best[single])
    return scales


# -- order ------------------------------------------------------------------------------------------

def _search_order(p: Problem, scales: torch.Tensor, start_orders: dict[str, torch.Tensor], steps: int):
    """Best starting order (identity, the given ones, sorts of the scaled data), refined by greedy moves."""
    candidates = {"identity": torch.arange(p.dim, device=p.x.device), **start_orders, **_sorted_orders(p, scales)}
    names = list(candidates)
    scores = objective(p, torch.stack([candidates[n].to(p.x.device) for n in names]), scales.expand(len(names), -1))
    start = names[int(scores.argmin())]
    perm, improved = _greedy_moves(p, candidates[start].to(p.x.device), scales, steps)
    return perm, start + ("+moves" if improved else "")


def _sorted_orders(p: Problem, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Orders that put channels of like (scaled) magnitude together; key-RoPE layouts for "slots"."""
    absx = (p.x / scales).abs()
    stats = {"rms": absx.pow(2).mean(0), "max": absx.amax(0), "mean_abs": absx.mean(0)}
    weight = _query_weight(p) * scales**2
    out = {}
    for name, stat in stats.items():
        for tag, value in ((name, stat), (f"weighted_{name}", stat * weight)):
            out[tag] = _slot_sort(value) if p.constraint == "slots" else value.argsort(descending=True, stable=True)
    return out


def _slot_sort(value: torch.Tensor) -> torch.Tensor:
    """Key-RoPE order: slots by descending pair maximum, the larger channel of each pair in the low half."""
    half = value.shape[0] // 2
    lo, hi = value[:half], value[half:]
    slots = torch.maximum(lo, hi).argsort(descending=True, stable=True)
    swap = hi[slots] > lo[slots]
    first = torch.where(swap, slots + half, slots)
    return torch.cat((first, torch.where(swap, slots, slots + half)))


def _moves(p: Problem, perm: torch.Tensor) -> torch.Tensor:
    """[K, D] every neighbour of perm: cross-block swaps ("slots": slot swaps and flips)."""
    dim, block, device = p.dim, p.fmt.block, p.x.device
    if p.constraint != "slots":
        a, b = torch.triu_indices(dim, dim, offset=1, device=device)
        keep = (a // block) != (b // block)
        return _swapped(perm, [(a[keep], b[keep])])
    half = dim // 2
    a, b = torch.triu_indices(half, half, offset=1, device=device)
    keep = (a // block) != (b // block)  # block <= D/2, so a slot's low and high halves lie in different blocks
    slots = torch.arange(half, device=device)
    return torch.cat((_swapped(perm, [(a[keep], b[keep]), (a[keep] + half, b[keep] + half)]),
                      _swapped(perm, [(slots, slots + half)])))


def _swapped(perm: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One neighbour per index i: perm with positions a[i] <-> b[i] exchanged, for each (a, b) in pairs."""
    count = pairs[0][0].shape[0]
    out = perm.repeat(count, 1)
    rows = torch.arange(count, device=perm.device)
    for a, b in pairs:
        out[rows, a], out[rows, b] = perm[b], perm[a]
    return out


def _greedy_moves(p: Problem, perm: torch.Tensor, scales: torch.Tensor, steps: int,
                  patience: int = 12) -> tuple[torch.Tensor, bool]:
    """Take the best improving move while the objective falls. On CUDA every move is scored at each
    step (a local optimum); on CPU a random 32 of them per step keeps it affordable."""
    if steps <= 0:
        return perm, False
    on_gpu = p.x.is_cuda
    current = float(objective(p, perm[None], scales[None])[0])
    gen = torch.Generator().manual_seed(0)
    improved, stale = False, 0
    for _ in range(steps):
        moves = _moves(p, perm)
        if not on_gpu:
            moves = moves[torch.randint(0, moves.shape[0], (32,), generator=gen)]
        scores = objective(p, moves, scales.expand(moves.shape[0], -1))
        best = int(scores.argmin())
        if float(scores[best]) >= current:
            stale += 1
            if on_gpu or stale >= patience:  # on GPU the whole neighbourhood was scored: local optimum
                break
            continue
        perm, current, improved, stale = moves[best], float(scores[best]), True, 0
    return perm, improved


def rope_rotation(freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, D/2] of each row's pair slots at its position (freq: signed, per slot)."""
    angles = positions.to(torch.float32)[:, None] * freq.to(positions.device, torch.float32)[None, :]
    return angles.cos(), angles.sin()


__all__ = ["Problem", "objective", "search", "rope_rotation"]
