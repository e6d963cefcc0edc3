"""Batched sampling of the next token: greedy, temperature, top-k, top-p, per-row seeds.

One pass over the whole batch, on any device: per-row temperature / top-k / top-p tensors, one
stable sort for both filters (only when some row uses one), and an exponential race instead of
`torch.multinomial`: argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with probability p_i.

Reproducibility of seeded rows: a row whose generator is given draws its own V exponentials from
that generator (a loop over seeded rows only), and every other step is row-local, so its token
depends only on its logits, its parameters and its generator's state -- not on which rows share
the batch or where it sits. The model runner makes one generator per seeded sequence with
`make_generator(seed, device)` and keeps it for the sequence's life, so a seed fixes the whole
token stream. Greedy rows never advance their generator. Unseeded rows share one batched draw
from the device's default generator.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .sequence import SamplingParams

# Temperatures below this sample as greedy: dividing logits by them overflows float32.
GREEDY_TEMPERATURE = 1e-5


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with `seed`, for one seeded sequence."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Sample one token per row of `logits` [B, V]; returns int64 token ids [B] on logits' device.

    `params[i]` are row i's sampling parameters; `generators[i]` (or None) its random generator,
    required where `params[i].seed` is set and the row is not greedy.
    """
    temperatures, top_ks, top_ps = _check_inputs(logits, params, generators)
    greedy = [t < GREEDY_TEMPERATURE for t in temperatures]
    greedy_tokens = logits.argmax(dim=-1)
    if all(greedy):
        return greedy_tokens
    device, vocab_size = logits.device, logits.shape[1]
    temperature = torch.tensor(
        [1.0 if g else t for g, t in zip(greedy, temperatures)], dtype=torch.float32, device=device
    )
    scaled = logits.to(torch.float32) / temperature[:, None]
    if any(0 < k < vocab_size for k in top_ks) or any(p < 1 for p in top_ps):
        top_k = torch.tensor(top_ks, device=device)
        top_p = torch.tensor(top_ps, dtype=torch.float32, device=device)
        scaled = _mask_top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(dim=-1)
    noise = _exponential_noise(probs, greedy, generators)
    sampled = probs.div_(noise).argmax(dim=-1)
    return torch.where(torch.tensor(greedy, device=device), greedy_tokens, sampled)


def _mask_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k, then outside its top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability (after top-k) reaches
    top_p; the most likely token is always kept. A stable sort breaks ties by token id, as argmax does.
    """
    vocab_size = scaled.shape[1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab_size, device=scaled.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    drop = ranks[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(drop, -math.inf).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
    drop_by_token = torch.empty_like(drop).scatter_(-1, order, drop)
    return scaled.masked_fill(drop_by_token, -math.inf)


def _exponential_noise(probs: torch.Tensor, greedy: list[bool], generators) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for row, generator in enumerate(generators or ()):
        if generator is not None and not greedy[row]:
            noise[row].exponential_(generator=generator)
    # Exp(1) can round to 0; p / 0 would pick a masked (p = 0) token.
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _check_inputs(logits: torch.Tensor, params, generators) -> tuple[list[float], list[int], list[float]]:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point tensor [batch, vocab], got {got}")
    batch, vocab_size = logits.shape
    if vocab_size == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if len(params) != batch:
        raise ValueError(f"got {len(params)} SamplingParams for {batch} rows of logits")
    if generators is not None and len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for {batch} rows of logits (use None for unseeded rows)")
    temperatures, top_ks, top_ps = [], [], []
    for row, p in enumerate(params):
        if not (math.isfinite(p.temperature) and p.temperature >= 0 and p.top_k >= 0 and 0 < p.top_p <= 1):
            raise ValueError(
                f"row {row}: invalid sampling parameters temperature={p.temperature!r} (finite, >= 0), "
                f"top_k={p.top_k!r} (>= 0), top_p={p.top_p!r} (in (0, 1])"
            )
        generator = generators[row] if generators is not None else None
        if generator is None and p.seed is not None and p.temperature >= GREEDY_TEMPERATURE:
            raise ValueError(f"row {row} has seed {p.seed} but no generator: pass make_generator(seed, device)")
        if generator is not None and generator.device.type != logits.device.type:
            raise ValueError(f"row {row}: generator on {generator.device} but logits on {logits.device}")
        temperatures.append(float(p.temperature))
        top_ks.append(int(p.top_k))
        top_ps.append(float(p.top_p))
    return temperatures, top_ks, top_ps
