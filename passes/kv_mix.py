"""kv-mix: per-layer K and V cache formats under an average bits-per-value budget, chosen on data.

Loss proxy: for every layer and every candidate format, the mean KL(original || changed) of the
next-token distributions on calibration text when only that layer's K (or V) takes that format,
every other cache staying in the model's dtype. Taking these as additive, a dynamic programme over
layers picks the assignment with the least total proxy whose average storage bits per value (K, or
K and V together when V is quantized; shared exponents included) fit `bits`. This costs one
forward pass over the calibration windows per (layer, candidate).

The choice is structure (format arguments of kv_write / attention), not tensors, so the pass
returns a resolved config with `layers` filled in; replaying that one (artifact load) needs no data.

Requires: kv_write / attention role metadata; runs after ksort and bfp-kv (it keeps bfp-kv's
pre-RoPE wiring and replaces its formats). Guarantees: kv_write and attention agree on formats.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fxforge.ir.capture import annotate, kv_formats, meta, nodes_by_role, set_kv_format_args, spec_of
from fxforge.ir.model import Model, kv_bytes_per_token
from fxforge.kernels.bfp import parse_kv_format
from fxforge.passes.calibration import calibration_windows
from fxforge.passes.manager import PassConfig, PassResult, register_pass

NATIVE = "native"
_UNITS = 8  # bits per value are multiples of 1/8 for every format (m + 8 / block), so budgets are integers


@dataclass(frozen=True)
class KVMix(PassConfig):
    """bits: average bits per value allowed (over K, or over K and V when V is quantized);
    k_formats / v_formats: candidates per layer, those whose block divides head_dim (v_formats
    ("native",): V stays in the model dtype);
    layers: the per-layer (k, v) formats, filled in by the pass (given: applied without data)."""

    bits: float = 4.25
    k_formats: tuple[str, ...] = ("bfp12_16", "bfp12_32", "mxfp4_32", "bfp12_64")
    v_formats: tuple[str, ...] = (NATIVE,)
    calib_tokens: int = 2048
    context: int = 512
    layers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        super().__post_init__()
        for name in ("k_formats", "v_formats"):
            value = getattr(self, name)
            if isinstance(value, str) or not value:
                raise ValueError(f"{name}={value!r} must be a non-empty list of formats")
            object.__setattr__(self, name, tuple(self._canonical(f, name) for f in value))
        if NATIVE in self.v_formats and len(self.v_formats) > 1:
            raise ValueError(f"v_formats={list(self.v_formats)}: 'native' (V unquantized) cannot be mixed with "
                             "quantized V formats, since the budget counts V only when V is quantized")
        if not isinstance(self.bits, (int, float)) or isinstance(self.bits, bool) or self.bits <= 0:
            raise ValueError(f"bits={self.bits!r} must be a positive number of bits per value")
        object.__setattr__(self, "layers", tuple(tuple(pair) for pair in self.layers))
        for pair in self.layers:
            if len(pair) != 2 or pair[0] not in self.k_formats or pair[1] not in self.v_formats:
                raise ValueError(f"layers entry {list(pair)} must be a (k, v) pair from k_formats {list(self.k_formats)} "
                                 f"and v_formats {list(self.v_formats)}")
        if self.calib_tokens < self.context or self.context < 2:
            raise ValueError(f"calib_tokens={self.calib_tokens} must be >= context={self.context} >= 2")

    @staticmethod
    def _canonical(fmt: str, field: str) -> str:
        if fmt == NATIVE and field == "v_formats":
            return NATIVE
        parsed = parse_kv_format(fmt)
        if parsed.is_dense:
            raise ValueError(f"{field}: {fmt!r} is not a block format; candidates are bfp12/14/16 and mxfp4 with a "
                             "block (e.g. bfp12_32), or 'native' for V")
        return parsed.name

    @property
    def quantize_v(self) -> bool:
        return self.v_formats != (NATIVE,)


def _bits(fmt: str) -> int:
    return 0 if fmt == NATIVE else round(parse_kv_format(fmt).bits_per_value() * _UNITS)


def _fits(fmt: str, head_dim: int) -> bool:
    return fmt == NATIVE or head_dim % parse_kv_format(fmt).block == 0


def _candidates(config: KVMix, head_dim: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The candidates whose block divides head_dim (a block never crosses a row); the rest are skipped."""
    return (tuple(f for f in config.k_formats if _fits(f, head_dim)),
            tuple(f for f in config.v_formats if _fits(f, head_dim)))


def _check(config: KVMix, spec) -> None:
    k_formats, v_formats = _candidates(config, spec.head_dim)
    for which, kept, given in (("k_formats", k_formats, config.k_formats), ("v_formats", v_formats, config.v_formats)):
        if not kept:
            raise ValueError(f"none of {which} {list(given)} has a block dividing head_dim={spec.head_dim}")
    for k_fmt, v_fmt in config.layers:
        for fmt in (k_fmt, v_fmt):
            if not _fits(fmt, spec.head_dim):
                raise ValueError(f"layers: format {fmt} has a block that does not divide head_dim={spec.head_dim}")
    cheapest = (min(map(_bits, k_formats)) + min(map(_bits, v_formats))) / _UNITS
    per_value = cheapest / (2 if config.quantize_v else 1)
    if per_value > config.bits + 1e-9:
        raise ValueError(f"bits={config.bits} is below the cheapest candidates' {per_value:g} bits per value; raise "
                         "bits or add cheaper formats")
    if config.layers and len(config.layers) != spec.num_layers:
        raise ValueError(f"layers has {len(config.layers)} entries; the model has {spec.num_layers} layers")


@register_pass("kv-mix", KVMix, after=("ksort", "bfp-kv"), check=_check)
def kv_mix(gm, config: KVMix, ctx) -> PassResult:
    """Choose each layer's K/V cache formats under the bit budget (loss proxy on calibration data)."""
    spec = spec_of(gm)
    before = kv_formats(gm, spec.num_layers)
    native = before[0][0] if parse_kv_format(before[0][0]).is_dense else "float32"
    report: dict = {}
    if config.layers:
        layers = config.layers
    else:
        proxy = _proxy(gm, config, ctx, spec, native)
        layers = _assign(proxy, *_candidates(config, spec.head_dim), config, spec.num_layers)
        report["proxy_kl"] = {which: {fmt: [float(f"{v:.4g}") for v in values] for fmt, values in table.items()}
                              for which, table in proxy.items()}
    resolved = [(k, native if v == NATIVE else v) for k, v in layers]
    for layer, (k_fmt, v_fmt) in enumerate(resolved):
        for node in nodes_by_role(gm, "kv_write", layer) + nodes_by_role(gm, "attention", layer):
            set_kv_format_args(node, k_fmt, v_fmt)
            meta(node).notes["kv-mix"] = {"k_format": k_fmt, "v_format": v_fmt}
    annotate(gm, spec)
    report.update(_budget_report(spec, before, resolved, config))
    return PassResult(gm, resolved != before, report, dataclasses.replace(config, layers=tuple(layers)))


def _set_layer(gm, layer: int, k_fmt: str, v_fmt: str) -> None:
    for node in nodes_by_role(gm, "kv_write", layer) + nodes_by_role(gm, "attention", layer):
        set_kv_format_args(node, k_fmt, v_fmt)


@torch.no_grad()
def _proxy(gm, config: KVMix, ctx, spec, native: str) -> dict[str, dict[str, list[float]]]:
    """{"k"|"v": {format: [mean KL per layer]}} with only that layer's K (V) in that format."""
    windows = calibration_windows(ctx, config.context, config.calib_tokens, "kv-mix")
    for layer in range(spec.num_layers):
        _set_layer(gm, layer, native, native)
    gm.recompile()
    runner = Model(gm, spec)
    reference = torch.log_softmax(runner.logits(windows), dim=-1)
    probs = reference.exp()
    k_formats, v_formats = _candidates(config, spec.head_dim)
    candidates = {"k": k_formats, "v": v_formats if config.quantize_v else ()}
    out: dict[str, dict[str, list[float]]] = {which: {fmt: [] for fmt in formats} for which, formats in candidates.items()}
    for layer in range(spec.num_layers):
        for which, formats in candidates.items():
            for fmt in formats:
                _set_layer(gm, layer, *((fmt, native) if which == "k" else (native, fmt)))
                gm.recompile()
                changed = torch.log_softmax(runner.logits(windows), dim=-1)
                out[which][fmt].append(float((probs * (reference - changed)).sum(-1).mean()))
        _set_layer(gm, layer, native, native)
    gm.recompile()
    return out


def _assign(proxy: dict, k_formats, v_formats, config: KVMix, num_layers: int) -> tuple[tuple[str, str], ...]:
    """Least total proxy with sum of bits <= budget: a dynamic programme over layers (budget in 1/8 bits)."""
    combos = [(k, v) for k in k_formats for v in v_formats]
    cost = torch.tensor([_bits(k) + _bits(v) for k, v in combos])
    values = num_layers * (2 if config.quantize_v else 1)
    budget = int(config.bits * _UNITS * values + 1e-6)
    inf = float("inf")
    best = torch.full((budget + 1,), inf, dtype=torch.float64)  # best[b]: least proxy spending exactly b
    best[0] = 0.0
    picks = []
    for layer in range(num_layers):
        loss = torch.tensor([proxy["k"][k][layer] + (proxy["v"][v][layer] if config.quantize_v else 0.0)
                             for k, v in combos], dtype=torch.float64)
        options = torch.full((len(combos), budget + 1), inf, dtype=torch.float64)
        for i, (c, value) in enumerate(zip(cost.tolist(), loss.tolist())):
            if c <= budget:
                options[i, c:] = best[: budget + 1 - c] + value
        best, choice = options.min(dim=0)
        picks.append(choice)
    spent = int(torch.nonzero(best == best.min())[0])  # the fewest bits among the least-loss totals
    layers = []
    for layer in reversed(range(num_layers)):
        combo = int(picks[layer][spent])
        layers.append(combos[combo])
        spent -= int(cost[combo])
    return tuple(reversed(layers))


def _budget_report(spec, before, resolved, config: KVMix) -> dict:
    k_bits = sum(parse_kv_format(k).bits_per_value() for k, _ in resolved) / len(resolved)
    v_bits = sum(parse_kv_format(v).bits_per_value() for _, v in resolved) / len(resolved)
    old, new = kv_bytes_per_token(spec, before), kv_bytes_per_token(spec, resolved)
    return {"layers": [list(pair) for pair in resolved], "k_bits_per_value": round(k_bits, 4),
            "v_bits_per_value": round(v_bits, 4),
            "average_bits_per_value": round((k_bits + v_bits) / 2 if config.quantize_v else k_bits, 4),
            "budget_bits_per_value": config.bits, "kv_bytes_per_token_before": old, "kv_bytes_per_token": new,
            "kv_memory_saving_pct": round(100.0 * (1 - new / old), 2)}
