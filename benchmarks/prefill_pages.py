"""Prefill attention over a packed KV cache: keys decoded in the kernel's loop (once per query tile
that sees them) against the step's pages decoded once first (paged_prefill_attention's
decode_pages), and against a bf16 cache, on one GPU, same inputs and same run.

    python benchmarks/prefill_pages.py out.json [--shape 32 8 128] [--prompts 4x8192 18x1792] [--sweep]

Each workload is one prefill step of whole prompts (N x L tokens, the long-context step of `fxforge bench
e2e --workload long-context` is 4 x 8192, the 8B step 18 x 1792, each 32k tokens), the Llama-3-8B
attention shape by default (32 query / 8 KV heads, d128). The cache holds the prompts' own K/V (random
bf16, stored in each format; pages scattered). Times: triton.testing.do_bench median (25 warm-up
calls outside it), one call = one layer's prefill attention, decode-once time includes its gather and
decode. Outputs are checked against each other (the same values enter the dots). --sweep also times
launch variants (SWEEP: rows per tile, keys per iteration, warps, stages) of the bf16 cache, which is the
kernel the decoded-once path runs, against the default (block_m 64, block_n 64, 4 warps, 2 stages).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fxforge.kernels.attention_bench import _do_bench, paged_cache
from fxforge.kernels.paged_attention import paged_prefill_attention

SWEEP = [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
         for m, n, w, st in ((64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2),
                             (128, 32, 4, 3), (64, 128, 4, 2), (256, 64, 8, 2), (128, 128, 8, 3))]


def bench(shape=(32, 8, 128), prompts=((4, 8192), (18, 1792)),
          formats=("bfloat16", "bfp16_32", "bfp12_32/bfp16_32"), page_size: int = 16, seed: int = 0,
          sweep: bool = False) -> list[dict]:
    hq, hkv, d = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for n, length in prompts:
        k, v = (torch.randn(n, length, hkv, d, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q = torch.randn(n * length, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        query_start = torch.arange(n + 1, dtype=torch.int32, device="cuda") * length
        seq_lens = torch.full((n,), length, dtype=torch.int32, device="cuda")
        bf16_us = None
        for fmt in formats:
            k_name, _, v_name = fmt.partition("/")
            v_name = v_name or k_name
            cache, table = paged_cache(k, v, (k_name, v_name), page_size, gen)
            ways = [("in loop", False)] + ([("decoded once", True)] if k_name != "bfloat16" or v_name != "bfloat16"
                                           else [])
            outs = {}
            for way, decode_pages in ways:
                fn = lambda dp=decode_pages: paged_prefill_attention(  # noqa: E731
                    q, *cache, table, query_start, seq_lens, k_name, v_name, d**-0.5, decode_pages=dp)
                outs[way] = fn()
                time_us = _do_bench(fn) * 1e3
                if fmt == "bfloat16":
                    bf16_us = time_us
                row = dict(prompts=n, prompt_len=length, format=fmt, way=way, time_us=round(time_us, 1),
                           vs_bfloat16=round(bf16_us / time_us, 3) if bf16_us else None,
                           device=torch.cuda.get_device_name(), shape=list(shape))
                if way == "decoded once":
                    row["max_abs_diff_vs_in_loop"] = float((outs[way].float() - outs["in loop"].float()).abs().max())
                    row["speedup_vs_in_loop"] = round(rows[-1]["time_us"] / time_us, 3)
                rows.append(row)
                print(f"{n:>3} x {length:<6} {fmt:>18} {way:>13} {time_us:10.1f} us"
                      + (f"  {row['speedup_vs_in_loop']}x in-loop" if "speedup_vs_in_loop" in row else ""), flush=True)
            if sweep and fmt == "bfloat16":
                for config in SWEEP:
                    fn = lambda c=config: paged_prefill_attention(  # noqa: E731
                        q, *cache, table, query_start, seq_lens, k_name, v_name, d**-0.5, **c)
                    try:
                        diff = float((fn().float() - outs["in loop"].float()).abs().max())
                        time_us = _do_bench(fn) * 1e3
                    except Exception as err:  # a variant over the shared-memory limit: skipped, said
                        if type(err).__name__ != "OutOfResources":
                            raise
                        print(f"{n:>3} x {length:<6} {json.dumps(config)} skipped: {err}")
                        continue
                    rows.append(dict(prompts=n, prompt_len=length, format=fmt, way="in loop", config=config,
                                     time_us=round(time_us, 1), vs_default=round(bf16_us / time_us, 3),
                                     max_abs_diff_vs_default=diff, device=torch.cuda.get_device_name(),
                                     shape=list(shape)))
                    print(f"{n:>3} x {length:<6} {json.dumps(config):<60} {time_us:10.1f} us "
                          f"{bf16_us / time_us:.3f}x default", flush=True)
            del cache, outs
        del k, v, q
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--shape", nargs=3, type=int, default=[32, 8, 128], metavar=("HQ", "HKV", "D"))
    parser.add_argument("--prompts", nargs="+", default=["4x8192", "18x1792"], help="NxLEN prefill steps")
    parser.add_argument("--sweep", action="store_true", help="also time the SWEEP launch variants (bf16 cache)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("prefill_pages.py needs a CUDA device")
    prompts = []
    for spec in args.prompts:
        n, _, length = spec.partition("x")
        if not (n.isdigit() and length.isdigit()):
            sys.exit(f"--prompts {spec!r}: expected NxLEN, e.g. 4x8192")
        prompts.append((int(n), int(length)))
    rows = bench(tuple(args.shape), prompts, sweep=args.sweep)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
