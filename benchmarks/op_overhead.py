"""Host cost of one fxforge custom-op call: through torch.ops (custom_op dispatch), through the direct
function eager engine steps use (ir/ops.py DIRECT, runtime/model_runner.py), and the bound
implementation called by hand; plus one eager forward of a lowered model through its GraphModule and
through ops.direct_module. Tiny inputs, so dispatch, not kernels, is timed (per call, after warm-up,
one sync at the end of each batch of calls).

    python benchmarks/op_overhead.py                     # CUDA: ops bound to the Triton kernels
    python benchmarks/op_overhead.py --device cpu        # CPU: ops bound to the torch references
    python benchmarks/op_overhead.py --device cpu --json-out op_overhead_cpu.json
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fxforge.ir import ops


def per_call(fn, device, n=300, rounds=5):
    """Median over `rounds` batches of n calls, in microseconds per call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(20):
        fn()
    sync()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    dev = args.device
    impl = ops.TRITON if dev == "cuda" else ops.REFERENCE
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    x = torch.randn(64, 576, device=dev, dtype=dtype)
    w = torch.ones(576, device=dev, dtype=dtype)
    g = torch.randn(64, 1536, device=dev, dtype=dtype)
    rows = {"torch add (scale)": per_call(lambda: x + x, dev)}
    for name, op, inputs in (("rmsnorm", ops.RMSNORM, (x, w, 1e-5)), ("swiglu", ops.SWIGLU, (g, g))):
        bound = ops.implementation(name, impl, x)
        rows[f"torch.ops.fxforge.{name}"] = per_call(lambda: op(*inputs, impl), dev)
        rows[f"{name} direct (ops.DIRECT)"] = per_call(lambda: ops.DIRECT[op](*inputs, impl), dev)
        rows[f"{bound.__name__} by hand"] = per_call(lambda: bound(*inputs), dev)

    sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
    import fxforge
    from conftest import tiny_model  # noqa: E402  (the tests' tiny Llama: 2 layers)
    from fxforge.ir.model import build_batch

    source = tiny_model("llama-gqa")
    source.module.to(dev)
    model = fxforge.optimize(source, passes=["bfp-kv", "lower"])
    batch = build_batch([list(range(1, 9))], [0], [[0]], 16, model.device)
    cache = model.new_kv_cache(2, 16)
    direct = ops.direct_module(model.module)
    calls = sum(1 for n in model.module.graph.nodes if n.op == "call_function" and n.target in ops.OP_NAMES)
    rows[f"tiny model eager forward, torch.ops ({calls} op calls)"] = per_call(
        lambda: model.module(*batch.args(), cache), dev, n=50)
    rows["tiny model eager forward, direct_module"] = per_call(lambda: direct(*batch.args(), cache), dev, n=50)
    for name, us in rows.items():
        print(f"{name:<50} {us:8.1f} us")
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": dev, "torch": torch.__version__, "us_per_call": rows}, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
