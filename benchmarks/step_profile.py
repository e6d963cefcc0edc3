"""Where the wall time of `fxforge bench e2e` goes: per engine step kind (prefill-carrying single
steps vs decode windows), host time of schedule / run / update, and GPU time of one decode pass.

    python benchmarks/step_profile.py smollm2-135m --seats 512 --decode-steps 16 [--kv bfp16]
"""
import argparse
import json
import time
from collections import defaultdict

import torch

import fxforge
from fxforge.bench import chat_prompts
from fxforge.runtime.engine import Engine
from fxforge.runtime.sequence import SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default="smollm2-135m")
ap.add_argument("--seats", type=int, default=512)
ap.add_argument("--decode-steps", type=int, default=16)
ap.add_argument("--kv", default="bfloat16")
ap.add_argument("--prompts", type=int, default=512)
ap.add_argument("--max-new-tokens", type=int, default=256)
ap.add_argument("--max-batched-tokens", type=int, default=8192)
ap.add_argument("--json-out")
args = ap.parse_args()

base = fxforge.load(args.model, device="cuda", dtype="bfloat16")
passes = [] if args.kv == "bfloat16" else [{"name": "bfp-kv", "k_format": args.kv, "v_format": args.kv}]
model = fxforge.optimize(base, passes=passes + [{"name": "lower", "backend": "triton"}])
prompts = chat_prompts(base, args.prompts)
max_len = max(len(p) for p in prompts) + args.max_new_tokens + 16
engine = Engine(model, max_num_seqs=args.seats, max_model_len=max_len, max_num_batched_tokens=max(args.max_batched_tokens, max_len),
                num_decode_steps=args.decode_steps)
engine.generate(prompts[: args.seats], SamplingParams(max_new_tokens=8, ignore_eos=True))

# instrument the three phases of a step (execute ends in a host sync: .tolist()); prepare is part of execute
phases = defaultdict(float)
sched, runner = engine.scheduler, engine.runner
orig = {"schedule": sched.schedule, "update": sched.update, "execute": runner.execute, "prepare": runner.prepare}


def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        r = fn(*a, **k)
        phases[name] += time.perf_counter() - t
        return r
    return wrapper


for name, fn in orig.items():
    setattr(sched if name in ("schedule", "update") else runner, name, timed(name, fn))
kinds = defaultdict(lambda: [0, 0.0, 0])  # steps, seconds, forward passes
step = engine.step


def step_timed():
    t = time.perf_counter()
    n_before = engine.stats.forward_passes
    out = step()
    dt = time.perf_counter() - t
    passes = engine.stats.forward_passes - n_before
    kind = "window" if passes > 1 else "single step (prefill, or decode next to one)"
    kinds[kind][0] += 1
    kinds[kind][1] += dt
    kinds[kind][2] += passes
    return out


engine.step = step_timed
params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
torch.cuda.synchronize()
t0 = time.perf_counter()
engine.generate(prompts, params)
torch.cuda.synchronize()
wall = time.perf_counter() - t0

# GPU time of one decode pass at the full bucket, by CUDA events around graph replays
gpu_ms = None
if runner.graphs:
    graph = runner.graphs[max(runner.graphs)][0]
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    for _ in range(3):
        graph.replay()
    ev[0].record()
    for _ in range(20):
        graph.replay()
    ev[1].record()
    torch.cuda.synchronize()
    gpu_ms = ev[0].elapsed_time(ev[1]) / 20  # note: the static inputs are those of the last window
# does the profiler see kernels launched by a CUDA graph replay?
if runner.graphs:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"profiler saw {len(kernels)} device events in one graph replay, "
          f"{sum(e.time_range.end - e.time_range.start for e in kernels) / 1e3:.3f} ms")
result = {"wall_s": wall, "tokens_per_s": engine.stats.generated_tokens / wall,
          "kinds": {k: {"steps": v[0], "seconds": v[1], "forward_passes": v[2]} for k, v in kinds.items()},
          "phases_s": dict(phases), "graph_replay_ms_full_bucket": gpu_ms}
print(json.dumps(result, indent=1))
if args.json_out:
    open(args.json_out, "w").write(json.dumps(result, indent=1))
