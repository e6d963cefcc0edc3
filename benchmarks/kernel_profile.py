"""Kernel-time breakdown of one decode pass (B sequences at a given context) and one prefill step,
run eagerly under torch.profiler (the same kernels a CUDA graph replays).

    python benchmarks/kernel_profile.py smollm2-135m --batch 512 --context 300 --prefill-tokens 8192
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fxforge
from fxforge.ir.model import build_batch

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default="smollm2-135m")
ap.add_argument("--batch", type=int, default=512)
ap.add_argument("--context", type=int, default=300)
ap.add_argument("--prefill-tokens", type=int, default=8192)
ap.add_argument("--kv", default="bfloat16")
ap.add_argument("--cprofile", action="store_true", help="also print a host (Python) profile of the prefill step")
args = ap.parse_args()

base = fxforge.load(args.model, device="cuda", dtype="bfloat16")
passes = [] if args.kv == "bfloat16" else [{"name": "bfp-kv", "k_format": args.kv, "v_format": args.kv}]
model = fxforge.optimize(base, passes=passes + [{"name": "lower", "backend": "triton"}])
ps = 16
pages = -(-(args.context + 1) // ps)
cache = model.new_kv_cache(args.batch * pages + 1, ps, "cuda")
tables = [list(range(b * pages, (b + 1) * pages)) for b in range(args.batch)]
V = model.spec.vocab_size


def decode_batch():
    return build_batch([[1]] * args.batch, [args.context] * args.batch, tables, ps, "cuda")


prompt = 128
n = args.prefill_tokens // prompt
prefill = build_batch([[5] * prompt] * n, [0] * n, tables[:n], ps, "cuda")
for name, batch in (("decode", decode_batch()), ("prefill", prefill)):
    with torch.inference_mode():
        for _ in range(3):
            model.forward(batch, cache)
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(5):
            model.forward(batch, cache)
        ev[1].record()
        torch.cuda.synchronize()
        print(f"== {name}: {ev[0].elapsed_time(ev[1]) / 5:.3f} ms per forward (eager, events)")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model.forward(batch, cache)
            torch.cuda.synchronize()
        if name == "prefill" and args.cprofile:
            import cProfile
            import pstats
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(5):
                model.forward(batch, cache)
            torch.cuda.synchronize()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:14]
    for e in rows:
        print(f"{e.device_time_total / 5 / 1e3:8.3f} ms  {e.count // 5:4d}x  {e.key[:90]}")
