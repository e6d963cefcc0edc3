"""Serving benchmark of SkipDecode (issue 10), one run: the full model and SkipDecode schedules at
target layer speed-ups under the two runtime policies, at several batch sizes; decode tokens/s
against the layer ratio.

    fxforge bench skip-decode --device cuda --json-out skip_bench.json

Rows per batch size (max running sequences; twice as many prompts, every one generating exactly
max_new_tokens, the schedule's span, so its mean depth over a generation is N / target):
  full     the original, lowered, CUDA graphs and decode windows (the engine's default on CUDA)
  bucket   the skip-decode model, rows grouped by depth, a CUDA graph per (depth, batch bucket), windows
  mask     the skip-decode model, per-row layer masks in one eager call per step, windows
Decode tokens/s = (generated tokens - one per request) / (time of the generation - time of the same
requests generating one token, i.e. prefill), so prefill, always at full depth, is left out.
Target: decode tokens/s of a policy over the full model's in the same run >= 80% of the layer
ratio N / mean depth, at batch 64 and 256.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass

import torch

POLICIES = ("full", "bucket", "mask")


@dataclass
class SkipRow:
    model: str
    policy: str
    max_num_seqs: int
    requests: int
    layer_ratio: float  # N / mean depth of a generated token (1 for the full model)
    tokens: int
    seconds: float
    prefill_seconds: float
    kv_saving: float  # share of the KV slots a single pool of every layer would reserve that no layer wrote
    kv_memory_saving: float  # share of KV cache bytes the per-group pools save (EngineConfig.skip_kv_fraction)
    all_seconds: list

    @property
    def decode_tokens_per_second(self) -> float:
        decode = self.seconds - self.prefill_seconds
        return (self.tokens - self.requests) / decode if decode > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_tokens_per_second": self.decode_tokens_per_second}


def models_under_test(base, speedups: list[float], span: int, warmup: int, decay: str = "linear",
                      levels: int = 2) -> dict:
    """{name: (lowered model, layer ratio)}: the original and one skip-decode model per target."""
    import fxforge
    from fxforge.ir.skip import skip_schedule
    from fxforge.passes import Lower, SkipDecode

    models = {"full": (fxforge.optimize(base, passes=[Lower()]), 1.0)}
    for speedup in speedups:
        config = SkipDecode(target_speedup=speedup, warmup_layers=warmup, span=span, decay=decay, levels=levels)
        model = fxforge.optimize(base, passes=[config, Lower()])
        models[f"skip {speedup}x"] = (model, skip_schedule(model).speedup())
    return models


def _engine(model, policy: str, max_num_seqs: int, max_len: int, kv_fraction: float):
    from fxforge.runtime.engine import Engine

    return Engine(model, max_num_seqs=max_num_seqs, max_model_len=max_len, max_num_batched_tokens=max(8192, max_len),
                  num_pages=max_num_seqs * -(-max_len // 16), num_decode_steps=8,
                  skip_policy="bucket" if policy == "full" else policy, skip_kv_fraction=kv_fraction,
                  use_cuda_graphs=policy != "mask" and model.device.type == "cuda")


def _timed(engine, prompts: list, max_new_tokens: int) -> tuple[float, int]:
    from fxforge.runtime.sequence import SamplingParams

    _sync(engine.model)
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))
    _sync(engine.model)
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outputs)


def time_policy(model, name: str, policy: str, ratio: float, prompts: list, max_new_tokens: int, max_num_seqs: int,
                repeats: int, kv_fraction: float = 1.0) -> SkipRow:
    """Median of `repeats` timed generations (and of prefill-only runs) after a warm-up at the same shapes."""
    max_len = max(len(p) for p in prompts) + max_new_tokens + 16
    engine = _engine(model, policy, max_num_seqs, max_len, kv_fraction)
    _timed(engine, prompts, max_new_tokens)  # warm-up: compiles kernels, captures every depth's graphs
    times, prefill = [], []
    for _ in range(repeats):
        seconds, tokens = _timed(engine, prompts, max_new_tokens)
        times.append(seconds)
        prefill.append(_timed(engine, prompts, 1)[0])
    runner = engine.runner
    saving, memory = (runner.kv_saving(), runner.kv_memory_saving()) if hasattr(runner, "kv_saving") else (0.0, 0.0)
    return SkipRow(name, policy, max_num_seqs, len(prompts), ratio, tokens, statistics.median(times),
                   statistics.median(prefill), saving, memory, times)


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def run_bench(base, prompts: list, max_new_tokens: int, batches: list[int], speedups: list[float], warmup: int,
              repeats: int, progress=None, kv_fraction: float = 1.0, decay: str = "linear", levels: int = 2) -> dict:
    rows = []
    for name, (model, ratio) in models_under_test(base, speedups, max_new_tokens, warmup, decay, levels).items():
        for batch in batches:
            for policy in (["full"] if name == "full" else ["bucket", "mask"]):
                row = time_policy(model, name, policy, ratio, prompts[: 2 * batch], max_new_tokens, batch, repeats,
                                  kv_fraction)
                rows.append(row.to_dict())
                if progress is not None:
                    progress(rows[-1])
                gc.collect()  # the finished engine's KV pool and CUDA graphs go before the next one's
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
    return {"rows": rows, "targets": speed_targets(rows, batches)}


def speed_targets(rows: list[dict], batches: list[int]) -> dict:
    """Per skip row: decode tokens/s over the full model's at its batch, as a share of its layer ratio."""
    full = {r["max_num_seqs"]: r["decode_tokens_per_second"] for r in rows if r["policy"] == "full"}
    shares = {}
    for r in rows:
        if r["policy"] != "full" and r["max_num_seqs"] in full:
            speedup = r["decode_tokens_per_second"] / full[r["max_num_seqs"]]
            shares[f"{r['model']} {r['policy']} b{r['max_num_seqs']}"] = {
                "speedup": speedup, "layer_ratio": r["layer_ratio"], "share_of_layer_ratio": speedup / r["layer_ratio"]}
    met = {f"b{b}": any(v["share_of_layer_ratio"] >= 0.8 for k, v in shares.items() if k.endswith(f" b{b}"))
           for b in batches if b in (64, 256)}
    return {"speedup_vs_full": shares, "at_least_80pct_of_layer_ratio": met}
