"""Serving benchmark of layer-tied models (issue 9), one run: the original, the tied model without LoRA
and the relaxed recursive model (K blocks, rank r), under the runtime's loop policies, at several
batch sizes; tokens/s, weight and KV bytes read per generated token, and the copy-bandwidth roofline.

    fxforge bench tying --device cuda --json-out tying_bench.json

Configurations per model and batch (max running sequences):
  graphs     lockstep with CUDA graphs and decode windows (the engine's default on CUDA)
  lockstep   lockstep, eager, one model step per host sync
  depthwise  depth-wise batching (eager, one pass of the shared stack per step; tied models only)
`lockstep` and `depthwise` differ only in the loop policy, so their ratio is the policy's effect.

Bytes a forward pass must read: lockstep reads every depth's weights (a shared block once per depth
it runs at, plus that depth's LoRA slot) and each useful row's KV at every depth; a depth-wise pass
reads the K shared blocks once, the LoRA slots of the loops present, and each row's KV at the K
depths of its loop. Roofline % = those bytes at the measured copy bandwidth over the wall time.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass

import torch

MODES = ("graphs", "lockstep", "depthwise")


@dataclass
class ServingRow:
    model: str
    mode: str
    max_num_seqs: int
    tokens: int
    seconds: float
    forward_passes: int
    weight_bytes_per_token: float
    kv_bytes_per_token: float
    roofline_pct: float | None
    all_seconds: list

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def models_under_test(base, unique_layers: int, rank: int) -> dict:
    """{name: lowered model}: the original, tied (no LoRA) and relaxed (rank r), all on base's device."""
    import fxforge
    from fxforge.passes import LayerTying, Lower

    tied = LayerTying(unique_layers=unique_layers)
    relaxed = LayerTying(unique_layers=unique_layers, rank=rank)
    return {"original": fxforge.optimize(base, passes=[Lower()]),
            f"tied K={unique_layers}": fxforge.optimize(base, passes=[tied, Lower()]),
            f"relaxed K={unique_layers} r={rank}": fxforge.optimize(base, passes=[relaxed, Lower()])}


def pass_weight_bytes(model, depthwise: bool) -> int:
    """Weight bytes one forward pass reads (embedding rows aside: the LM head reads the table once)."""
    from fxforge.ir.recursive import tying_plan

    module, plan = model.module, tying_plan(model)
    if plan is None:
        return _bytes(module.parameters())
    depths = range(plan.unique_layers) if depthwise else range(plan.num_layers)
    layers = sum(_bytes(module.get_submodule(f"layers.{d}").parameters()) for d in depths)
    outside = _bytes(p for n, p in module.named_parameters() if not n.startswith(("layers.", "lora.")))
    lora = _bytes(module.get_submodule("lora").parameters()) if plan.lora_rank else 0
    return outside + layers + lora  # depth-wise: every loop present reads its slots, at most all of them


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def time_generation(model, name: str, mode: str, prompts: list, max_new_tokens: int, max_num_seqs: int,
                    bandwidth: float | None, repeats: int) -> ServingRow:
    """Median of `repeats` timed offline generations after a warm-up at the same shapes."""
    from fxforge.runtime.engine import Engine
    from fxforge.runtime.sequence import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    max_len = max(len(p) for p in prompts) + max_new_tokens + 16
    engine = Engine(model, max_num_seqs=max_num_seqs, max_model_len=max_len, max_num_batched_tokens=max(8192, max_len),
                    num_pages=max_num_seqs * -(-max_len // 16),  # every running sequence at full length: no preemption
                    loop_policy="depthwise" if mode == "depthwise" else "lockstep",
                    num_decode_steps=8 if mode == "graphs" else 1, use_cuda_graphs=mode == "graphs" and _cuda(model))
    engine.generate(prompts[:max_num_seqs], SamplingParams(max_new_tokens=4, ignore_eos=True))
    times, outputs = [], None
    for _ in range(repeats):
        engine.stats = type(engine.stats)()
        _sync(model)
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        _sync(model)
        times.append(time.perf_counter() - start)
    stats, tokens = engine.stats, sum(len(o.token_ids) for o in outputs)
    loops = engine.runner.looped.loops if mode == "depthwise" else 1
    weight = stats.forward_passes * pass_weight_bytes(model, mode == "depthwise")
    kv = stats.kv_tokens_read * model.kv_bytes_per_token() / loops  # a depth-wise row reads 1/L of the depths
    seconds = statistics.median(times)
    roofline = 100 * (weight + kv) / bandwidth / seconds if bandwidth else None
    return ServingRow(name, mode, max_num_seqs, tokens, seconds, stats.forward_passes, weight / tokens, kv / tokens,
                      roofline, times)


def _cuda(model) -> bool:
    return model.device.type == "cuda"


def _sync(model) -> None:
    if _cuda(model):
        torch.cuda.synchronize()


def run_bench(base, prompts: list, max_new_tokens: int, batches: list[int], unique_layers: int, rank: int,
              repeats: int, bandwidth: float | None, progress=None) -> dict:
    rows = []
    for name, model in models_under_test(base, unique_layers, rank).items():
        modes = [m for m in MODES if not (m == "depthwise" and name == "original") and (m != "graphs" or _cuda(model))]
        for batch in batches:
            for mode in modes:
                row = time_generation(model, name, mode, prompts[: 2 * batch], max_new_tokens, batch, bandwidth, repeats)
                rows.append(row.to_dict())
                if progress is not None:
                    progress(rows[-1])
                gc.collect()  # the finished engine's KV pool and CUDA graphs go before the next one's
                if _cuda(model):
                    torch.cuda.empty_cache()
    return {"rows": rows, "targets": serving_targets(rows, unique_layers, rank, batches)}


def serving_targets(rows: list[dict], unique_layers: int, rank: int, batches: list[int]) -> dict:
    """LoRA overhead (tied r=0 over relaxed, same mode) and the relaxed model against the original."""
    speed = {(r["model"], r["mode"], r["max_num_seqs"]): r["tokens_per_second"] for r in rows}
    tied, relaxed = f"tied K={unique_layers}", f"relaxed K={unique_layers} r={rank}"
    out = {"lora_overhead_pct": {}, "relaxed_vs_original": {}, "depthwise_vs_lockstep": {}}
    for (model, mode, batch), tps in speed.items():
        if model == relaxed and (tied, mode, batch) in speed:
            out["lora_overhead_pct"][f"{mode} b{batch}"] = 100 * (speed[(tied, mode, batch)] / tps - 1)
        if model == relaxed:
            best_original = max(v for (m, _, b), v in speed.items() if m == "original" and b == batch)
            out["relaxed_vs_original"][f"{mode} b{batch}"] = tps / best_original
        if mode == "depthwise" and (model, "lockstep", batch) in speed:
            out["depthwise_vs_lockstep"][f"{model} b{batch}"] = tps / speed[(model, "lockstep", batch)]
    overheads = out["lora_overhead_pct"].values()
    out["lora_overhead_at_most_15pct"] = bool(overheads) and max(overheads) <= 15
    at_64 = [v for k, v in out["relaxed_vs_original"].items() if k.endswith(" b64")]
    out["relaxed_1_3x_original_at_b64"] = bool(at_64) and max(at_64) >= 1.3
    return out
