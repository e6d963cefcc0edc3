"""`fxforge bench costmodel`: the cost model's predicted node times against measured ones, and its calibration.

A one-layer model of a shape (random weights; lowered to the Triton kernels on CUDA, the torch
references on CPU) runs a forward for each workload: decode steps over batches 1..2048 (context cut
so the KV cache stays within `kv_tokens`) and prefill steps. An fx Interpreter times every node it
runs (synchronised; median over `repeats` forwards after a warm-up). The nodes compared, by class:
  attention_decode, attention_prefill   fxforge::attention
  projection                            q/k/v/o projections, dense MLP projections, router
  expert                                fxforge::moe (the fused experts)
Predicted: the roofline of ir/cost.py on the device spec, max(FLOPs / peak, bytes / bandwidth).
Calibration: per class, the achieved fractions of the compute and memory roofs and a fixed cost
per call are chosen (grid search) to minimise the median absolute relative error, i.e.
    t = max(FLOPs / (f_compute * peak), bytes / (f_memory * bandwidth)) + overhead
The JSON holds every row, the error distribution (median, p90, max of |error|) per class before and
after calibration, and the factors. Target (issue 12): median |error| under 20% after calibration.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from fxforge.ir.capture import capture, meta
from fxforge.ir.cost import COST_KEY, BatchDesc, annotate_costs
from fxforge.ir.devices import DeviceSpec
from fxforge.ir.model import DEFAULT_PAGE_SIZE, Model, build_batch
from fxforge.ir.ops import ATTENTION, MOE
from fxforge.ir.spec import ModelSpec

CLASSES = ("attention_decode", "attention_prefill", "projection", "expert")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_gate", "mlp_up", "mlp_down", "router", "qkv_proj",
                "mlp_gate_up")
# calibration grid: fractions of peak 1% .. 100%, fixed costs 0 and 1 us .. 10 ms (log-spaced)
_FRACTIONS = tuple(round(10 ** (-2 + i / 7), 4) for i in range(15))
_OVERHEADS = (0.0,) + tuple(10 ** (-6 + i / 3) for i in range(13))


@dataclass(frozen=True)
class CostBench:
    spec: ModelSpec | None = None
    decode_batches: tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 2048)
    context: int = 4096
    prefill: tuple[tuple[int, int], ...] = ((1, 512), (4, 1024), (8, 2048))  # (sequences, tokens each)
    kv_tokens: int = 1 << 21  # cached tokens per decode workload at most (context shrinks for large batches)
    repeats: int = 5


class _TimedInterpreter(fx.Interpreter):
    """Runs the graph node by node, recording the synchronised wall time of each call node."""

    def __init__(self, gm: fx.GraphModule, sync: Callable[[], None]):
        super().__init__(gm)
        self.sync, self.times = sync, {}

    def run_node(self, node: fx.Node):
        if node.op not in ("call_module", "call_function"):
            return super().run_node(node)
        self.sync()
        start = time.perf_counter()
        result = super().run_node(node)
        self.sync()
        self.times.setdefault(node.name, []).append(time.perf_counter() - start)
        return result


def node_class(node: fx.Node, phase: str) -> str | None:
    if node.target is ATTENTION:
        return f"attention_{phase}"
    if node.target is MOE:
        return "expert"
    if node.op == "call_module" and meta(node).role in _PROJECTIONS:
        return "projection"
    return None


def workloads(bench: CostBench) -> list[BatchDesc]:
    """Decode steps (context cut to kv_tokens / batch) and prefill steps."""
    out = [BatchDesc("decode", b, max(16, min(bench.context, bench.kv_tokens // b))) for b in bench.decode_batches]
    return out + [BatchDesc("prefill", s, t) for s, t in bench.prefill]


def _inputs(model: Model, batch: BatchDesc, device) -> tuple:
    """Runtime inputs of one step: `batch.batch` sequences with their KV pages (values random)."""
    pages = math.ceil(batch.context / DEFAULT_PAGE_SIZE)
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(batch.batch)]
    new = 1 if batch.phase == "decode" else batch.context
    past = batch.context - new
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randint(0, model.spec.vocab_size, (new,), generator=gen).tolist() for _ in range(batch.batch)]
    inputs = build_batch(chunks, [past] * batch.batch, tables, DEFAULT_PAGE_SIZE, device)
    cache = model.new_kv_cache(batch.batch * pages, DEFAULT_PAGE_SIZE, device)
    for t in cache:
        if t.is_floating_point():
            t.normal_()
    return (*inputs.args(), cache)


def measure(model: Model, gm: fx.GraphModule, bench: CostBench, device: DeviceSpec,
            progress: Callable[[str], None] | None = None) -> list[dict]:
    """One row per timed node of every workload: class, FLOPs, bytes, measured and predicted seconds."""
    torch_device = model.device
    sync = torch.cuda.synchronize if torch_device.type == "cuda" else (lambda: None)
    rows = []
    for batch in workloads(bench):
        batch = dataclasses.replace(batch, dtype=str(model.dtype).removeprefix("torch."))
        args = _inputs(model, batch, torch_device)
        interpreter = _TimedInterpreter(gm, sync)
        with torch.no_grad():
            for _ in range(bench.repeats + 1):
                interpreter.run(*args)
        annotate_costs(gm, model.spec, batch)
        for node in gm.graph.nodes:
            kind, cost = node_class(node, batch.phase), node.meta.get(COST_KEY)
            if kind is None or node.name not in interpreter.times or cost is None:
                continue
            measured = statistics.median(interpreter.times[node.name][1:])  # the first run warms up
            rows.append({"class": kind, "node": node.name, "role": cost.role, "phase": batch.phase,
                         "batch": batch.batch, "context": batch.context, "tokens": batch.num_tokens,
                         "flops": cost.flops, "bytes": cost.bytes, "measured_s": measured,
                         "predicted_s": device.time_s(cost.flops, cost.bytes, batch.dtype)})
        del args
        if progress is not None:
            progress(f"{batch.phase} batch {batch.batch} context {batch.context}")
    return rows


def _errors(rows: list[dict], key: str = "predicted_s") -> dict:
    errors = sorted(abs(r[key] / r["measured_s"] - 1) for r in rows)
    if not errors:
        return {}
    return {"n": len(errors), "median_abs_pct": 100 * statistics.median(errors),
            "p90_abs_pct": 100 * errors[min(len(errors) - 1, int(0.9 * len(errors)))], "max_abs_pct": 100 * errors[-1]}


def _calibrated_time(row: dict, device: DeviceSpec, dtype: str, fc: float, fm: float, overhead: float) -> float:
    return max(row["flops"] / (fc * device.peak(dtype)), row["bytes"] / (fm * device.mem_bandwidth)) + overhead


def calibrate(rows: list[dict], device: DeviceSpec, dtype: str) -> dict:
    """Per class: (f_compute, f_memory, overhead) minimising the median |relative error|; rows get calibrated_s."""
    factors = {}
    for kind in CLASSES:
        chosen = [r for r in rows if r["class"] == kind]
        if not chosen:
            continue
        best = None
        for fc, fm, overhead in itertools.product(_FRACTIONS, _FRACTIONS, _OVERHEADS):
            errors = [abs(_calibrated_time(r, device, dtype, fc, fm, overhead) / r["measured_s"] - 1) for r in chosen]
            score = statistics.median(errors)
            if best is None or score < best[0]:
                best = (score, fc, fm, overhead)
        _, fc, fm, overhead = best
        factors[kind] = {"compute_fraction": fc, "memory_fraction": fm, "overhead_s": overhead}
        for r in chosen:
            r["calibrated_s"] = _calibrated_time(r, device, dtype, fc, fm, overhead)
    return factors


def run_bench(models: list[Model], bench: CostBench, device: DeviceSpec, progress=None) -> dict:
    """Measure every model's nodes, compare, calibrate over all rows; the document the CLI writes."""
    rows = []
    for model in models:
        gm = model.module if isinstance(model.module, fx.GraphModule) else capture(model.module)
        for row in measure(model, gm, dataclasses.replace(bench, spec=model.spec), device, progress):
            rows.append({"model": model.spec.name or model.spec.family, **row})
    dtype = str(models[0].dtype).removeprefix("torch.")
    factors = calibrate(rows, device, dtype)
    by_class = {k: [r for r in rows if r["class"] == k] for k in CLASSES}
    before = {k: _errors(v) for k, v in by_class.items() if v}
    after = {k: _errors(v, "calibrated_s") for k, v in by_class.items() if v}
    overall = _errors(rows, "calibrated_s")
    return {"device": device.to_dict(), "dtype": dtype, "models": [m.spec.name or m.spec.family for m in models],
            "errors_before": {**before, "all": _errors(rows)}, "errors_after": {**after, "all": overall},
            "factors": factors, "rows": rows,
            "targets": {"median_abs_error_after_pct": overall.get("median_abs_pct"),
                        "median_under_20pct": bool(overall) and overall["median_abs_pct"] < 20}}


def one_layer(spec: ModelSpec) -> ModelSpec:
    return dataclasses.replace(spec, num_layers=1)


def markdown(results: dict) -> str:
    lines = ["| class | nodes | median abs err before | after | p90 after | max after | f_compute | f_memory | "
             "overhead us |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, after in results["errors_after"].items():
        if kind == "all":
            continue
        before, f = results["errors_before"][kind], results["factors"][kind]
        lines.append(f"| {kind} | {after['n']} | {before['median_abs_pct']:.1f}% | {after['median_abs_pct']:.1f}% | "
                     f"{after['p90_abs_pct']:.1f}% | {after['max_abs_pct']:.1f}% | {f['compute_fraction']} | "
                     f"{f['memory_fraction']} | {f['overhead_s'] * 1e6:.1f} |")
    return "\n".join(lines) + "\n"


__all__ = ["CostBench", "run_bench", "measure", "calibrate", "workloads", "node_class", "one_layer", "markdown",
           "CLASSES"]
