"""Kernel-time breakdown of one decode pass (B sequences at a given context) and one prefill step,
run eagerly under torch.profiler (the same kernels a CUDA graph replays).

    python benchmarks/kernel_profile.py smollm2-135m --batch 512 --context 300 --prefill-tokens 8192
    python benchmarks/kernel_profile.py smollm2-135m --random-init --batch 256 --context 300 \\
        --kv bfloat16,bfp16,bfp12/bfp16 --json-out kernels.json   # formats side by side (K/V: K format/V format)
"""
import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

import torch.fx as fx

import fxforge
from fxforge.ir.model import build_batch
from fxforge.ir.ops import direct_module

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default="smollm2-135m")
ap.add_argument("--batch", type=int, default=512)
ap.add_argument("--context", type=int, default=300)
ap.add_argument("--prefill-tokens", type=int, default=8192)
ap.add_argument("--kv", default="bfloat16", help="KV formats, comma-separated; K/V for two (bfp12/bfp16)")
ap.add_argument("--random-init", action="store_true", help="random weights of the model's shape (kernel times only)")
ap.add_argument("--cprofile", action="store_true", help="also print a host (Python) profile of the prefill step")
ap.add_argument("--json-out", help="per format: ms per eager forward and the top kernels, decode and prefill")
ap.add_argument("--table-tokens", type=int, default=None, help="each sequence's page table this many tokens wide "
                "(default: its context): the engine's decode graphs size it by max_model_len, and the decode split "
                "count follows that width, not the context")
ap.add_argument("--dispatch", choices=["direct", "library"], default="direct", help="direct: the bound kernels called "
                "directly, as the engine's eager steps do (EngineConfig.direct_dispatch); library: through torch.library")
args = ap.parse_args()
REPEATS = 5


def profile_format(model) -> dict:
    direct = args.dispatch == "direct" and isinstance(model.module, fx.GraphModule)
    module = direct_module(model.module) if direct else None

    def forward(batch, cache):
        return module(*batch.args(), cache) if direct else model.forward(batch, cache)

    ps = 16
    pages = -(-max(args.context + 1, args.table_tokens or 0) // ps)
    cache = model.new_kv_cache(args.batch * pages + 1, ps, "cuda")
    tables = [list(range(b * pages, (b + 1) * pages)) for b in range(args.batch)]
    prompt = 128
    n = min(args.prefill_tokens // prompt, args.batch)
    batches = {"decode": build_batch([[1]] * args.batch, [args.context] * args.batch, tables, ps, "cuda"),
               "prefill": build_batch([[5] * prompt] * n, [0] * n, tables[:n], ps, "cuda")}
    out = {}
    for name, batch in batches.items():
        with torch.inference_mode():
            for _ in range(3):
                forward(batch, cache)
            torch.cuda.synchronize()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            for _ in range(REPEATS):
                forward(batch, cache)
            ev[1].record()
            torch.cuda.synchronize()
            ms = ev[0].elapsed_time(ev[1]) / REPEATS
            print(f"== {name}: {ms:.3f} ms per forward (eager, events)")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(REPEATS):
                    forward(batch, cache)
                torch.cuda.synchronize()
            if name == "prefill" and args.cprofile:
                import cProfile
                import pstats
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(REPEATS):
                    forward(batch, cache)
                torch.cuda.synchronize()
                pr.disable()
                pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:16]
        kernels = [{"ms": e.device_time_total / REPEATS / 1e3, "count": e.count // REPEATS, "kernel": e.key[:120]}
                   for e in rows]
        for k in kernels:
            print(f"{k['ms']:8.3f} ms  {k['count']:4d}x  {k['kernel'][:90]}")
        total = sum(e.device_time_total for e in prof.key_averages()) / REPEATS / 1e3
        out[name] = {"ms_per_forward": ms, "kernel_ms_per_forward": total, "top_kernels": kernels}
    return out


base = fxforge.load(args.model, device="cuda", dtype="bfloat16", random_init=args.random_init)
results = {"model": args.model, "dispatch": args.dispatch, "random_init": args.random_init, "batch": args.batch, "context": args.context,
           "table_tokens": args.table_tokens,
           "prefill_tokens": args.prefill_tokens, "device": torch.cuda.get_device_name(), "formats": {}}
for kv in args.kv.split(","):
    k_format, _, v_format = kv.partition("/")
    passes = [] if kv == "bfloat16" else [{"name": "bfp-kv", "k_format": k_format, "v_format": v_format or k_format}]
    model = fxforge.optimize(base, passes=passes + [{"name": "lower", "backend": "triton"}])
    print(f"#### KV {kv}")
    results["formats"][kv] = profile_format(model)
    del model
    torch.cuda.empty_cache()
if args.json_out:
    with open(args.json_out, "w") as f:
        json.dump(results, f, indent=1)
