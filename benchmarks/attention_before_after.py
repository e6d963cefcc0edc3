"""Paged attention before and after the readability split of kernels/paged_attention.py, in one process.

    source benchmarks/device_env.sh    # on the lent GPU machine: installs fxforge
    python benchmarks/attention_before_after.py --json-out attention_before_after_h200.json
    TRITON_INTERPRET=1 python benchmarks/attention_before_after.py --smoke --json-out /tmp/smoke.json  # CPU

"before" is kernels/paged_attention.py as of git commit d40172b (--before-rev), loaded from its source
text as the module `paged_attention_before`; where the checkout has no git history (the GPU machine
gets no .git), pass that file with --before-source. "after" is fxforge.kernels.paged_attention as
installed. Both run on the same inputs and their outputs must be bit-identical (AssertionError
otherwise), then both are timed.

Shapes: decode as `fxforge bench attention` (B=64, Hq 32 / Hkv 8, head_dim 128, context 4096, page 16;
bfp12_32, bfp16_32, mxfp4_32, bfloat16) and a prefill of 8 fresh sequences x 512 tokens (same heads;
bfloat16 and bfp16_32); bf16 queries throughout, inputs built by kernels/attention_bench.paged_cache.
Timing: triton.testing.do_bench (median after its warm-up, L2 flushed before every call), once over
CUDA-graph replays ("graph": the kernels alone) and once calling the launcher ("eager": with its
Python cost). Before and after alternate, in swapped order, over --rounds rounds; a row's before_ms and
after_ms are the medians over the rounds, ratio = after_ms / before_ms (> 1: the refactor is slower).
With --smoke (tiny shapes, meant for the CPU interpreter) the times are wall-clock medians of a few
calls and say nothing about kernel speed: the run checks the script and the bit-identity.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.testing

from fxforge.kernels import paged_attention as after_module
from fxforge.kernels.attention_bench import graphed, paged_cache

BEFORE_REV = "d40172b"
KERNEL_PATH = "kernels/paged_attention.py"
DECODE_FORMATS = ("bfp12_32", "bfp16_32", "mxfp4_32", "bfloat16")
PREFILL_FORMATS = ("bfloat16", "bfp16_32")


@dataclass(frozen=True)
class Shape:
    batch: int  # sequences
    q_heads: int
    kv_heads: int
    head_dim: int
    context: int  # tokens per sequence in the cache
    new_tokens: int  # queries per sequence: 1 is decode, context is a fresh prefill
    page_size: int = 16


FULL_SHAPES = {"decode": Shape(64, 32, 8, 128, 4096, 1), "prefill": Shape(8, 32, 8, 128, 512, 512)}
SMOKE_SHAPES = {"decode": Shape(2, 4, 2, 128, 40, 1), "prefill": Shape(2, 4, 2, 128, 24, 24)}


def _git_show(rev: str, path: str) -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True, text=True)
        failure = done.stderr.strip() if done.returncode else ""
    except OSError as error:  # no git installed
        failure = str(error)
    if failure:
        sys.exit(f"git show {rev}:{path} failed in {repo} ({failure}); where there is no git history, write that "
                 f"file elsewhere (git show {rev}:{path} > FILE) and pass it with --before-source FILE")
    return done.stdout


def load_before(rev: str, source: Path | None):
    """The kernel module as of `rev` (or the file `source`), imported as `paged_attention_before`."""
    text = source.read_text() if source is not None else _git_show(rev, KERNEL_PATH)
    path = Path(tempfile.mkdtemp(prefix="attention_before_after_")) / "paged_attention_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("paged_attention_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_inputs(kind: str, shape: Shape, fmt: str, device: str, seed: int) -> tuple:
    """(positional args of paged_{kind}_attention) with bf16 queries over a cache in `fmt`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    kv_shape = (shape.batch, shape.context, shape.kv_heads, shape.head_dim)
    k, v = (torch.randn(*kv_shape, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    cache, page_table = paged_cache(k, v, fmt, shape.page_size, gen)
    q = torch.randn(shape.batch * shape.new_tokens, shape.q_heads, shape.head_dim, generator=gen, device=device,
                    dtype=torch.bfloat16)
    seq_lens = torch.full((shape.batch,), shape.context, dtype=torch.int32, device=device)
    scale = shape.head_dim ** -0.5
    if kind == "decode":
        return (q, *cache, page_table, seq_lens, fmt, fmt, scale)
    query_start = torch.arange(shape.batch + 1, dtype=torch.int32, device=device) * shape.new_tokens
    return (q, *cache, page_table, query_start, seq_lens, fmt, fmt, scale)


def assert_bit_identical(before: torch.Tensor, after: torch.Tensor, what: str) -> None:
    same_bits = before.shape == after.shape and before.dtype == after.dtype and torch.equal(
        before.view(torch.int16), after.view(torch.int16))
    if not same_bits:
        differ = before.view(torch.int16) != after.view(torch.int16)
        diff = (before.float() - after.float()).abs().nan_to_num(float("inf"))
        raise AssertionError(f"{what}: before and after differ in {int(differ.sum())} of {before.numel()} values "
                             f"{tuple(before.shape)}, max |diff| {diff.max().item():.3g}")


def time_ms(fn, on_cuda: bool) -> float:
    if on_cuda:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compare(kind: str, shape: Shape, fmt: str, before_module, rounds: int, device: str, seed: int) -> list[dict]:
    """Bit-identity check, then one row per timing mode for this (kind, format)."""
    args = build_inputs(kind, shape, fmt, device, seed)
    launchers = {version: getattr(module, f"paged_{kind}_attention")
                 for version, module in (("before", before_module), ("after", after_module))}
    calls = {version: (lambda launch=launch: launch(*args)) for version, launch in launchers.items()}
    what = f"{kind} {fmt} {shape}"
    assert_bit_identical(calls["before"](), calls["after"](), what)
    on_cuda = device == "cuda"
    modes = {"eager": calls}
    if on_cuda:
        modes["graph"] = {version: graphed(call) for version, call in calls.items()}
    rows = []
    for mode, fns in modes.items():
        samples = {"before": [], "after": []}
        for round_index in range(rounds):
            order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
            for version in order:
                samples[version].append(time_ms(fns[version], on_cuda))
        before_ms, after_ms = (statistics.median(samples[version]) for version in ("before", "after"))
        rows.append(dict(kind=kind, format=fmt, mode=mode, **asdict(shape), before_ms=round(before_ms, 5),
                         after_ms=round(after_ms, 5), ratio=round(after_ms / before_ms, 4),
                         before_rounds_ms=[round(t, 5) for t in samples["before"]],
                         after_rounds_ms=[round(t, 5) for t in samples["after"]], bit_identical=True))
        print(f"{kind:>7} {fmt:>9} {mode:>5}  before {before_ms:9.4f} ms  after {after_ms:9.4f} ms  "
              f"ratio {after_ms / before_ms:6.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out", required=True, type=Path, help="where to write the rows as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU run under TRITON_INTERPRET=1")
    parser.add_argument("--rounds", type=int, default=5, help="timings of each version per row (median taken)")
    parser.add_argument("--before-rev", default=BEFORE_REV, help=f"git revision of {KERNEL_PATH} to compare against")
    parser.add_argument("--before-source", type=Path, help=f"the 'before' {KERNEL_PATH} as a file (instead of git)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("without a CUDA device only --smoke runs (and then under TRITON_INTERPRET=1)")
    before_module = load_before(args.before_rev, args.before_source)
    shapes = SMOKE_SHAPES if args.smoke else FULL_SHAPES
    rows = []
    for kind, formats in (("decode", DECODE_FORMATS), ("prefill", PREFILL_FORMATS)):
        for fmt in formats:
            rows += compare(kind, shapes[kind], fmt, before_module, args.rounds, device, args.seed)
            if device == "cuda":
                torch.cuda.empty_cache()
    report = dict(version=1, device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu (Triton interpreter)",
                  torch=torch.__version__, triton=triton.__version__,
                  before=str(args.before_source) if args.before_source else f"git {args.before_rev}:{KERNEL_PATH}",
                  timer="triton.testing.do_bench median" if device == "cuda" else "perf_counter median (smoke)",
                  rounds=args.rounds, rows=rows)
    args.json_out.write_text(json.dumps(report, indent=1))
    worst = max(rows, key=lambda row: row["ratio"])
    print(f"{len(rows)} rows, all bit-identical; largest after/before ratio {worst['ratio']} "
          f"({worst['kind']} {worst['format']} {worst['mode']}); wrote {args.json_out}")


if __name__ == "__main__":
    main()
