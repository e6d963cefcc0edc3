"""skip-decode: batched early exit that keeps the KV cache valid (Del Corro et al. 2023, SkipDecode).

At generated position t every sequence runs the `warmup_layers` lowest layers plus the top a(t)
layers; a(t) falls from `max_layers` to `min_layers` over the first `span` generated tokens
(`linear` as in the paper, or `step`: `levels` equal stairs, 2 = max for the first half of the span,
min after; few levels mean few depths, so few groups and CUDA graphs under the bucket policy) and
stays at min_layers after it. Prompts are prefilled at full depth. Instead of min/max, `target_speedup` s asks
for a mean depth (warm-up included) of N / s over the span; the pass picks integer (min, max) that give it
(to a quarter layer) nearest a halving band, min = max / 2, and records them. A `schedule` of a(t) values may be
given as it is (decay `custom`); it must be non-increasing.

The schedule is data: `gm.meta["skip_decode"]` (ir/skip.py SkipSchedule), the report and the
resolved config in plan.json. Every layer's attention node notes until which generated position it
runs (`always`, or the last t). Checked before any pass runs: bounds (1 <= min <= max <= N - warm-up,
warm-up < N), monotonicity, and by simulation that no token needs KV an earlier token skipped.
Weights and the graph's computation are unchanged (rewrites=()): the runtime (runtime/skip_runner.py)
and recovery (fxforge/recover.py) apply the schedule. Runs once per model, before or after the other
passes; layer-tied models take it too (served lockstep: depth-wise batching loops one block stack and
cannot skip depths). Restorable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch.fx as fx

from fxforge.ir.capture import META_KEY, spec_of
from fxforge.ir.errors import PassConfigError
from fxforge.ir.ops import ADD_RMSNORM, ATTENTION
from fxforge.ir.skip import SKIP_KEY, SkipSchedule, build_schedule, decay_table
from fxforge.passes.manager import PassConfig, PassResult, register_pass


class Decay(str, enum.Enum):
    LINEAR = "linear"
    STEP = "step"
    CUSTOM = "custom"


@dataclass(frozen=True)
class SkipDecode(PassConfig):
    """min_layers / max_layers (top layers run, warm-up excluded; max 0: all but the warm-up) or
    target_speedup; warmup_layers; decay linear|step (with `levels` stairs); span (generated tokens the
    decay spans); or an explicit `schedule` of a(t) values (decay custom)."""

    min_layers: int = 0
    max_layers: int = 0
    target_speedup: float = 0.0
    warmup_layers: int = 1
    decay: Decay = Decay.LINEAR
    span: int = 256
    schedule: tuple[int, ...] = ()
    levels: int = 2  # stairs of a step decay

    def __post_init__(self):
        super().__post_init__()
        for name in ("min_layers", "max_layers", "warmup_layers", "span", "levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        schedule = self.schedule.split(",") if isinstance(self.schedule, str) else self.schedule
        try:
            schedule = tuple(int(a) for a in schedule if str(a).strip())
        except ValueError:
            raise ValueError(f"schedule={self.schedule!r} must be a list of integers (a(t) per generated "
                             "position)") from None
        object.__setattr__(self, "schedule", schedule)
        speedup = self.target_speedup
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not (speedup == 0 or speedup >= 1):
            raise ValueError(f"target_speedup={speedup!r} must be >= 1 (0: give min_layers instead)")
        given = [name for name, on in (("min_layers", self.min_layers), ("target_speedup", speedup),
                                        ("schedule", schedule)) if on]
        if len(given) != 1:
            raise ValueError(f"give exactly one of min_layers (with max_layers), target_speedup or schedule; got "
                             f"{given or 'none'}")
        if self.min_layers and self.max_layers and self.min_layers > self.max_layers:
            raise ValueError(f"min_layers={self.min_layers} is larger than max_layers={self.max_layers}")
        if (self.decay is Decay.CUSTOM) != bool(schedule):
            raise ValueError("decay 'custom' goes with an explicit schedule, and a schedule with decay 'custom'; "
                             f"got decay={self.decay.value!r}, schedule={list(schedule)}")
        if self.span < 1:
            raise ValueError(f"span={self.span} must be >= 1 generated token")
        if self.levels < 2 or (self.levels != 2 and self.decay is not Decay.STEP):
            raise ValueError(f"levels={self.levels} must be >= 2, and differs from 2 only for decay 'step'")

    def plan(self, num_layers: int) -> SkipSchedule:
        """The checked schedule for a model of num_layers layers (ValueError naming what is wrong)."""
        n, w = num_layers, self.warmup_layers
        if w >= n:
            raise ValueError(f"warmup_layers={w} leaves no layer to skip: the model has {n} layers")
        if self.schedule:
            return build_schedule(n, w, min(self.schedule), max(self.schedule), Decay.CUSTOM.value, len(self.schedule),
                                  self.schedule)
        if self.target_speedup:
            low, high = self._fit(n)
        else:
            low, high = self.min_layers, self.max_layers or n - w
        if high > n - w:
            raise ValueError(f"max_layers={high} exceeds the {n - w} layers above the {w} warm-up layer(s)")
        if low > high:
            raise ValueError(f"min_layers={low} is larger than max_layers={high}")
        return build_schedule(n, w, low, high, self.decay.value, self.span, levels=self.levels)

    def _fit(self, n: int) -> tuple[int, int]:
        """(min, max) whose schedule's mean depth is N / target_speedup: of the pairs within a quarter layer
        of the closest, the one nearest a halving band (min = max / 2); max_layers, if given, is kept."""
        w, goal = self.warmup_layers, n / self.target_speedup
        if goal < w + 1:
            raise ValueError(f"target_speedup={self.target_speedup} asks for {goal:.2f} layers on average, fewer "
                             f"than the {w} warm-up layer(s) plus one; lower it or the warm-up")
        tops = [self.max_layers] if self.max_layers else range(1, n - w + 1)
        pairs = []
        for top in tops:
            for low in range(1, top + 1):
                table = decay_table(self.decay.value, low, top, self.span, self.levels)
                pairs.append((abs(w + sum(table[:self.span]) / self.span - goal), low, top))
        best = min(error for error, _, _ in pairs)
        _, negative_top, low = min((abs(low - top / 2), -top, low) for error, low, top in pairs if error <= best + 0.25)
        return low, -negative_top


def _check(config: SkipDecode, spec) -> None:
    config.plan(spec.num_layers)


def _adds_fused_across_layers(gm: fx.GraphModule) -> list[str]:
    """fxforge::add_rmsnorm nodes whose branch input (the add's operand) is another layer's."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ADD_RMSNORM and META_KEY in node.meta:
            branch = node.args[0]
            if isinstance(branch, fx.Node) and META_KEY in branch.meta and (
                    branch.meta[META_KEY].layer != node.meta[META_KEY].layer):
                found.append(node.name)
    return found


def _fuse_within_layers(gm: fx.GraphModule) -> int:
    """skip-decode cuts the graph per layer, so a residual add fused into the next layer's norm (lower's
    fuse_add_norm, on by default) would make two hidden states cross a boundary: undo the elementwise
    fusions and redo them within layers only (the same ops under the same binding: logits unchanged).
    Returns the adds fused again."""
    from fxforge.ir.capture import annotate
    from fxforge.passes.fuse_elementwise import fuse_add_rmsnorm, fuse_rope_kv_write, unfuse_elementwise

    spec = spec_of(gm)
    unfuse_elementwise(gm.graph)
    gm.graph.lint()
    gm.recompile()
    adds = fuse_add_rmsnorm(gm, across_layers=False)
    fuse_rope_kv_write(gm)
    annotate(gm, spec)
    return len(adds)


@register_pass("skip-decode", SkipDecode, check=_check)
def skip_decode(gm: fx.GraphModule, config: SkipDecode, ctx) -> PassResult:
    """Attach the SkipDecode schedule a(t) to the graph and note on every layer until when it runs."""
    spec = spec_of(gm)
    if SKIP_KEY in gm.meta:
        raise PassConfigError("skip-decode runs once per model: this graph already carries a skip-decode schedule "
                              f"({gm.meta[SKIP_KEY].to_dict()['top_layers'][:8]}...); compile from the source model")
    fused_again = _fuse_within_layers(gm) if _adds_fused_across_layers(gm) else None
    schedule = config.plan(spec.num_layers)
    gm.meta[SKIP_KEY] = schedule
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ATTENTION:
            layer = node.meta[META_KEY].layer
            node.meta[META_KEY].notes["skip_decode"] = {"runs_until": _last_position(schedule, layer)}
    resolved = SkipDecode(min_layers=schedule.min_layers, max_layers=schedule.max_layers,
                          warmup_layers=schedule.warmup, decay=schedule.decay, span=schedule.span,
                          schedule=schedule.top_layers if schedule.decay == Decay.CUSTOM.value else (),
                          levels=config.levels)
    report = {"warmup_layers": schedule.warmup, "min_layers": schedule.min_layers, "max_layers": schedule.max_layers,
              "decay": schedule.decay, "span": schedule.span, "top_layers": list(schedule.top_layers),
              "mean_depth": round(schedule.mean_depth(), 4), "layer_speedup": round(schedule.speedup(), 4),
              **({"target_speedup": config.target_speedup} if config.target_speedup else {}),
              **({"adds_fused_again_within_layers": fused_again} if fused_again is not None else {})}
    modified = schedule.mean_depth() < spec.num_layers or fused_again is not None
    return PassResult(gm, modified, report, resolved)


def _last_position(schedule: SkipSchedule, layer: int) -> str | int:
    """'always', or the last generated position whose token runs `layer` (-1: none, only prompts)."""
    if layer < schedule.warmup or layer >= schedule.num_layers - schedule.min_layers:
        return "always"
    runs = [t for t, a in enumerate(schedule.top_layers) if layer >= schedule.num_layers - a]
    return runs[-1] if runs else -1


__all__ = ["SkipDecode", "Decay"]
