"""Host time of one eager prefill forward per layer, by KV format, with every Triton launch stubbed
out: what Python and torch dispatch cost around the kernels (the engine's direct-dispatch path, as
its prefill-carrying steps run). On a CPU under TRITON_INTERPRET=1 the launches are replaced by a
no-op, so the figure is the launcher code, input checks, index math and the torch ops around the
kernels (a tiny model keeps those ops cheap); kernel time is left out. Packed formats also decode
the step's pages once where the step averages enough query tiles a sequence (always, with
--decode-pages-first).

    python benchmarks/prefill_host.py --json-out benchmarks/results/prefill_host_cpu.json
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors take the Triton launchers

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fxforge  # noqa: E402
from fxforge.ir.model import Model, build_batch  # noqa: E402
from fxforge.ir.ops import direct_module  # noqa: E402
from fxforge.kernels import paged_attention  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))
from tests.conftest import TINY_SPECS  # noqa: E402  (the tiny model the tests use)

LAUNCHES = {"n": 0}


def _no_launch(self, grid):
    def run(*args, **kwargs):
        LAUNCHES["n"] += 1
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv", default="bfloat16,bfp16,bfp12/bfp16", help="KV formats (K/V for two)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens a sequence")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds of 20 forwards (median)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    InterpretedFunction.__getitem__ = _no_launch
    spec = dataclasses.replace(TINY_SPECS["llama-gqa"], num_layers=args.layers)
    base = fxforge.optimize(Model.from_state_dict(spec, None, seed=0), passes=[])
    rows = []
    for kv in args.kv.split(","):
        k_format, _, v_format = kv.partition("/")
        passes = [] if kv == "bfloat16" else [{"name": "bfp-kv", "k_format": k_format, "v_format": v_format or k_format}]
        model = fxforge.optimize(base, passes=passes + [{"name": "lower", "backend": "triton"}])
        forward = direct_module(model.module)
        page_size = 16
        pages = -(-args.prompt // page_size)
        cache = model.new_kv_cache(args.seqs * pages + 1, page_size, "cpu")
        tables = [list(range(s * pages, (s + 1) * pages)) for s in range(args.seqs)]
        batch = build_batch([[5] * args.prompt] * args.seqs, [0] * args.seqs, tables, page_size, "cpu")
        for decode_first in ([False, True] if kv != "bfloat16" else [False]):
            paged_attention._DECODE_PAGES_MIN_TILES = 0 if decode_first else 10**9
            with torch.inference_mode():
                for _ in range(3):
                    forward(*batch.args(), cache)
                rounds = []
                for _ in range(args.repeats):
                    LAUNCHES["n"] = 0
                    start = time.perf_counter()
                    for _ in range(20):
                        forward(*batch.args(), cache)
                    rounds.append((time.perf_counter() - start) / 20)
            ms = statistics.median(rounds) * 1e3
            row = dict(kv=kv, decode_pages_first=decode_first, ms_per_forward=ms, ms_per_layer=ms / args.layers,
                       launches_per_forward=LAUNCHES["n"] // 20)
            rows.append(row)
            print(f"{kv:12s} pages decoded first: {str(decode_first):5s} {ms:7.3f} ms a forward, "
                  f"{row['ms_per_layer']:.3f} ms a layer, {row['launches_per_forward']} launches")
    result = dict(layers=args.layers, seqs=args.seqs, prompt=args.prompt, heads=spec.num_heads,
                  kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype="float32",
                  note="Triton launches stubbed: host work only", rows=rows)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
