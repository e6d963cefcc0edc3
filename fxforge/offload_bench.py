"""`fxforge bench offload`: MoE experts past a GPU budget, run by the placement rule vs always-copy vs always-CPU.

The MoE layers of a shape (random weights, bf16 on CUDA): each layer's first experts stay on the GPU
within `--gpu-memory-gb` (after the model's dense weights), the rest live in pinned host memory
(runtime/expert_offload.py). A decode step runs every layer's experts for `batch` tokens routed top-k
by a random router (the same routing for every policy); attention and the dense layers are the same
under every policy and are not run. Per batch and policy: the median step time over `repeats` timed
steps after a warm-up, tokens/s = batch / step, and the cost model's prediction for the same routing.
With `calibrate`, before the timed steps the three components of the offload cost model (an expert
on the device, a weight copy across the link, an expert on the CPU) are timed once on layer 0 for a
few row counts (separate random rows, not the benchmark's routing) and each gets a scale, measured /
modelled; the rule's threshold and every prediction then use the scaled model.
Targets (issue 12): the rule at least as fast as the better fixed policy at every batch (within 3%),
faster than both somewhere, and prediction error under 25%.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fxforge.ir.devices import System
from fxforge.ir.errors import FxforgeError
from fxforge.ir.spec import ModelSpec
from fxforge.kernels.moe import moe_route
from fxforge.passes.opb_placement import weight_bytes
from fxforge.runtime.expert_offload import OffloadCosts, OffloadedExperts, Policy, expert_rows, resident_experts


@dataclass(frozen=True)
class OffloadBench:
    spec: ModelSpec
    gpu_memory_gb: float
    batches: tuple[int, ...] = (1, 8, 64)
    repeats: int = 5
    layers: int = 0  # 0: the spec's
    exact: bool = True
    calibrate: bool = True
    calibration_rows: tuple[int, ...] = (1, 4, 16)

    @property
    def num_layers(self) -> int:
        return self.layers or self.spec.num_layers


def half_budget_gb(spec: ModelSpec, act: int = 2) -> float:
    """The budget that keeps half of every layer's experts on the GPU (dense weights included)."""
    dense, expert = weight_bytes(spec, act)
    return (dense + expert * spec.num_layers * (spec.num_experts // 2 + 0.5)) / 1e9


def costs_from(system: System, dtype: str, exact: bool) -> OffloadCosts:
    """The offload cost model from a system: its compute-side device, a CPU device and their link."""
    devices = list(system.devices.values())
    cpus = [d for d in devices if d.kind == "cpu"]
    gpus = [d for d in devices if d.kind == "xpu"]
    if not cpus or not gpus:
        raise FxforgeError(f"--devices must name a GPU (kind xpu) and a CPU (kind cpu), got "
                           f"{[(d.name, d.kind) for d in devices]}")
    gpu, cpu = gpus[0], cpus[0]
    return OffloadCosts(gpu, cpu, system.link(gpu.name, cpu.name), dtype, exact)


def build_layers(bench: OffloadBench, costs: OffloadCosts, device: torch.device, dtype: torch.dtype,
                 progress: Callable[[str], None] | None = None) -> list[OffloadedExperts]:
    """Random experts per layer, the budget's share on the device, the rest in (pinned) host memory."""
    spec = bench.spec
    dense, expert = weight_bytes(spec, torch.finfo(dtype).bits // 8)
    resident = resident_experts(bench.gpu_memory_gb * 1e9, dense, expert, spec.num_layers, spec.num_experts)
    layers = []
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = ((spec.moe_intermediate_size, spec.hidden_size), (spec.moe_intermediate_size, spec.hidden_size),
              (spec.hidden_size, spec.moe_intermediate_size))
    for layer in range(bench.num_layers):
        w = [(0.02 * torch.randn(spec.num_experts, *shape, generator=gen, device=device)).to(dtype) for shape in shapes]
        layers.append(OffloadedExperts(*w, resident=resident, device=device, costs=costs))
        del w
        if progress is not None:
            progress(f"layer {layer + 1}/{bench.num_layers}: {resident} of {spec.num_experts} experts on {device.type}")
    return layers


def _timed(fn: Callable[[], object], sync, repeats: int = 3) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate_costs(layer: OffloadedExperts, rows: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                    sync) -> OffloadCosts:
    """The layer's costs with gpu / cpu / link scales = median of measured / modelled over `rows` row counts."""
    costs, hidden, inter = layer.costs, layer.hidden, layer.intermediate
    gen = torch.Generator().manual_seed(7)
    ratios = {"gpu": [], "cpu": [], "link": []}
    if layer.host:
        copy = _timed(lambda: layer.device_weights(layer.resident, "copy"), sync)
        ratios["link"].append(copy / costs.weight_copy_s(hidden, inter))
    for n in rows:
        x = torch.randn(n, hidden, generator=gen).to(dtype)
        w = torch.ones(n, dtype=dtype)
        if layer.resident:
            xd, wd = x.to(device), w.to(device)
            seconds = _timed(lambda: expert_rows(xd, *layer.gpu[0], wd, dtype, layer.exact), sync)
            ratios["gpu"].append(seconds / costs.resident_s(n, hidden, inter))
        if layer.host:
            cpu_only = dataclasses.replace(costs, link_scale=0.0)  # the CPU compute alone
            seconds = _timed(lambda: expert_rows(x, *layer.host[0], w, dtype, layer.exact), lambda: None)
            ratios["cpu"].append(seconds / cpu_only.cpu_s(n, hidden, inter))
    scales = {f"{k}_scale": statistics.median(v) for k, v in ratios.items() if v}
    return dataclasses.replace(costs, **scales)


def _step(layers: list[OffloadedExperts], x: torch.Tensor, routing: list, policy: Policy, sync) -> float:
    start = time.perf_counter()
    for experts, (weights, ids) in zip(layers, routing):
        experts.forward(x, weights, ids, policy)
    sync()
    return time.perf_counter() - start


def run_bench(bench: OffloadBench, costs: OffloadCosts, device: torch.device, dtype: torch.dtype,
              progress: Callable[[str], None] | None = None) -> dict:
    """Rows per (batch, policy): measured and predicted step time, tokens/s; the targets."""
    layers = build_layers(bench, costs, device, dtype, progress)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if bench.calibrate:
        costs = calibrate_costs(layers[0], bench.calibration_rows, device, dtype, sync)
        for layer in layers:
            layer.costs = costs
        if progress is not None:
            progress(f"calibrated: gpu x{costs.gpu_scale:.2f}, cpu x{costs.cpu_scale:.2f}, "
                     f"link x{costs.link_scale:.2f}")
    spec, rows = bench.spec, []
    gen = torch.Generator(device=device).manual_seed(1)
    for batch in bench.batches:
        x = torch.randn(batch, spec.hidden_size, generator=gen, device=device).to(dtype)
        routing = []
        for _ in layers:
            weights, ids = moe_route(torch.randn(batch, spec.num_experts, generator=gen, device=device),
                                     spec.num_experts_per_tok, spec.norm_topk_prob)
            routing.append((weights.to(dtype), ids))
        counts = [torch.bincount(ids.reshape(-1).long(), minlength=spec.num_experts).tolist() for _, ids in routing]
        for policy in Policy:
            _step(layers, x, routing, policy, sync)  # warm-up
            times = [_step(layers, x, routing, policy, sync) for _ in range(bench.repeats)]
            measured = statistics.median(times)
            predicted = sum(layer.predict_s(c, policy) for layer, c in zip(layers, counts))
            plans = [layer.plan(c, policy) for layer, c in zip(layers, counts)]
            row = {"batch": batch, "policy": policy.value, "step_s": measured, "tokens_per_s": batch / measured,
                   "predicted_s": predicted, "error_pct": 100 * (predicted / measured - 1),
                   "on_cpu": sum(p.count("cpu") for p in plans), "copied": sum(p.count("copy") for p in plans),
                   "threshold": layers[0].threshold(batch * spec.num_experts_per_tok)}
            rows.append(row)
            if progress is not None:
                progress(str(row))
    return {"rows": rows, "targets": targets(rows), "resident_experts": layers[0].resident,
            "layers": bench.num_layers,
            "costs": {"gpu": costs.gpu.name, "cpu": costs.cpu.name, "link": costs.link.name, "exact": costs.exact,
                      "gpu_scale": costs.gpu_scale, "cpu_scale": costs.cpu_scale, "link_scale": costs.link_scale}}


def targets(rows: list[dict]) -> dict:
    """Issue 12's targets from the rows: rule vs the better fixed policy per batch, prediction error."""
    by = {(r["batch"], r["policy"]): r for r in rows}
    batches = sorted({r["batch"] for r in rows})
    ratios = {b: by[(b, "rule")]["tokens_per_s"] / max(by[(b, "copy")]["tokens_per_s"], by[(b, "cpu")]["tokens_per_s"])
              for b in batches}
    worst_error = max(abs(r["error_pct"]) for r in rows)
    return {"rule_vs_best_fixed": ratios,
            "rule_at_least_best_fixed": all(v >= 0.97 for v in ratios.values()),
            "rule_faster_than_both_somewhere": any(v > 1.03 for v in ratios.values()),
            "max_abs_prediction_error_pct": worst_error, "prediction_error_under_25pct": worst_error < 25}


__all__ = ["OffloadBench", "run_bench", "build_layers", "costs_from", "half_budget_gb", "targets"]
