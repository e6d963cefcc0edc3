"""Host time the engine spends around the model between decode windows: Scheduler.schedule,
ModelRunner.prepare and Scheduler.update (plus the in-window input advance), per engine step, for a
batch of sequences on the tiny 2-layer model. These are pure host work (Python and numpy), so the CPU
measures what they cost; the model forward is left out of every figure. On a GPU whose step is short
(SmolLM2 at 256 sequences), this is time the device can sit idle between windows.

    python benchmarks/host_overhead.py                          # 256 sequences, windows of 8 steps
    python benchmarks/host_overhead.py --seqs 256 --json-out host_overhead_cpu.json
"""
import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import fxforge
from fxforge.runtime.engine import Engine
from fxforge.runtime.sequence import SamplingParams

sys.path.append(str(Path(__file__).resolve().parents[1]))
from tests.conftest import tiny_model  # noqa: E402  (the same tiny model the tests use)


def timed(obj, name: str, times: dict) -> None:
    """Wrap obj.name so each call's wall time lands in times[name] (milliseconds)."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return result
    setattr(obj, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, default=256, help="sequences, all running at once")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode window length")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    model = fxforge.optimize(tiny_model("llama-gqa"), passes=["bfp-kv", "lower"])
    prompts = [[rng.randrange(1, 200) for _ in range(rng.randint(40, 160))] for _ in range(args.seqs)]
    engine = Engine(model, num_pages=40000, page_size=16, max_num_batched_tokens=32768, max_num_seqs=args.seqs,
                    num_decode_steps=args.decode_steps)
    times: dict[str, list[float]] = {}
    timed(engine.scheduler, "schedule", times)
    timed(engine.scheduler, "update", times)
    timed(engine.runner, "prepare", times)
    timed(engine.runner, "_advance", times)
    engine.generate(prompts, SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
    # the first step is the prefill of every prompt; the rest are decode windows
    result = {name: {"calls": len(v), "median_ms_after_first": round(statistics.median(v[1:]), 3)}
              for name, v in times.items() if len(v) > 1}
    window = sum(result[n]["median_ms_after_first"] for n in ("schedule", "prepare", "update"))
    result.update(seqs=args.seqs, decode_steps=args.decode_steps, host_ms_between_windows=round(window, 3),
                  device="cpu", torch=torch.__version__)
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
