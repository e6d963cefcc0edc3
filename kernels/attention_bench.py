"""Decode-attention benchmark: our paged kernels per KV format vs torch SDPA over dense bf16 K/V.

    python -m fxforge.kernels.attention_bench out.json [--kernels tiles blocks diag] [--sweep] [--tune DIR] [--ablate]

For each context length it builds a random bf16 K/V cache (B sequences, pages scattered through a
random permutation), stores it in each format (kernels.bfp.quantize on the GPU), checks our decode
kernel against attention_ref, then times it and SDPA (query [B, Hq, 1, D], K/V [B, Hkv, ctx, D]
bf16; every SDPA backend that runs, with enable_gqa=True and with K/V expanded to Hq heads, the
fastest is the baseline). Timing: triton.testing.do_bench, median, over CUDA-graph replays (so the
Python launch cost stays out); do_bench zeroes a 256 MB buffer before every timed call, so each
call starts with a cold L2, and inputs smaller than 2x L2 are also rotated among copies.
Bandwidth: bytes read (K+V pages of the visible tokens incl. scale bytes, + q) + written (out);
the ceiling is a device-to-device copy (bytes read + written / time).
Each of our decode kernels runs in the same run ("tiles": values scaled per value, the kernel before
issue 14; "blocks" and "diag": scales per block, see kernels/paged_attention.py), so old and new
compare on the same inputs and baseline.
--sweep also times a few launch variants of each kernel at context 4096 (SWEEP; --sweep-context picks
another, e.g. the few hundred tokens of a chat workload); --tune DIR then
writes the fastest config per (K, V, head_dim, group, bf16) shape at that context to DIR/paged_decode_<device>.json,
the file paged_decode_attention reads at launch (entries of other shapes in an existing file kept).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from fxforge.kernels.attention import attention_ref
from fxforge.kernels.bfp import parse_kv_format, quantize
from fxforge.kernels import paged_attention
from fxforge.kernels.triton_support import jit, tl
from fxforge.kernels.paged_attention import (ABLATIONS, DECODE_KERNELS, DecodeConfig, auto_num_splits,
                                             decode_kernel_supports, decode_config_key, decode_config_path,
                                             paged_decode_attention, to_channels_by_tokens, v_channels_by_tokens)

# launch variants timed by --sweep, per kernel: tile shapes, warps, stages (a packed tile's loop is
# a chain of dependent steps, so more tokens per iteration and deeper pipelining are the first
# knobs), the register prefetch (blocks, diag), the split-K target (programs per SM, with the
# automatic split count), and the portable Triton decode instead of the inline PTX (asm=False)
SWEEP = {
    "tiles": ([dict(block_n=n, num_warps=w, num_stages=st)
               for n, w, st in ((64, 4, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3), (256, 8, 2))]
              + [dict(block_n=n, num_warps=w, num_stages=1, prefetch=True)
                 for n, w in ((64, 4), (64, 8), (128, 8), (256, 8))]
              + [dict(programs_per_sm=pps) for pps in (4, 16)] + [dict(asm=False)]),
    "blocks": ([dict(block_n=n, num_warps=w, num_stages=st, prefetch=pf)
                for n, w, st, pf in ((64, 4, 1, True), (128, 4, 1, True), (128, 8, 1, True), (64, 4, 2, False),
                                     (128, 8, 2, False))]
               + [dict(programs_per_sm=16)]),
}
SWEEP["diag"] = SWEEP["blocks"]
SWEEP["i8k"] = ([dict(block_n=n, num_warps=w, num_stages=st)
                 for n, w, st in ((64, 4, 3), (64, 4, 1), (64, 8, 2), (128, 8, 2), (128, 8, 3))]
                + [dict(programs_per_sm=pps) for pps in (4, 16)])
SWEEP["i8t"] = SWEEP["i8k"] + [dict(block_n=32, num_warps=4, num_stages=st) for st in (2, 3)]
# DecodeConfig fields that set the split count (auto_num_splits), not keywords of paged_decode_attention
SPLIT_KEYS = ("programs_per_sm", "min_split_tokens")


def _do_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def graphed(fn):
    """fn replayed from a CUDA graph (warm-up outside the capture); fn itself if capture fails."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return fn
    return graph.replay


def _time_rotating(make_fns) -> float:
    """Median time of one call; make_fns: list of callables over distinct input copies."""
    graphs = [graphed(fn) for fn in make_fns]
    cycle = itertools.cycle(graphs)
    return _do_bench(lambda: next(cycle)()) * 1e3  # us


@jit
def _empty_kernel(ptr):
    if tl.program_id(0) < 0:  # never true: nothing is read or written
        tl.store(ptr, 0)


def empty_launch_us(grid: tuple[int, ...]) -> float:
    """Median time of a Triton kernel that reads and writes nothing, over `grid` programs of one warp,
    replayed from a CUDA graph as every timed launch is: the floor under any decode launch of that grid
    in this harness (the graph replay and the programs' scheduling)."""
    sink = torch.empty(1, dtype=torch.int32, device="cuda")
    return _time_rotating([lambda: _empty_kernel[grid](sink, num_warps=1)])


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = _do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _copies_needed(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return 1 if nbytes >= 2 * l2 else min(8, math.ceil(2 * l2 / max(nbytes, 1)))


def paged_cache(k: torch.Tensor, v: torch.Tensor, fmt, page_size: int, generator: torch.Generator,
                table_tokens: int | None = None):
    """k, v [B, ctx, Hkv, D] -> ([k_data, k_scale, v_data, v_scale], page_table [B, pages]) with the
    pages of all sequences scattered through a random permutation; fmt: one format or (K, V).
    table_tokens: the page table holds this many tokens (>= ctx; the columns past ctx name page 0,
    never read), as an engine's decode graph's table is as wide as the longest sequence it serves."""
    k_format, v_format = (fmt, fmt) if isinstance(fmt, str) else fmt
    batch, ctx, hkv, d = k.shape
    pages_per_seq = -(-ctx // page_size)
    pad = pages_per_seq * page_size - ctx
    perm = torch.randperm(batch * pages_per_seq, generator=generator, device=k.device)
    tensors = []
    for x, name in ((k, k_format), (v, v_format)):
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).reshape(batch * pages_per_seq, page_size, hkv, d)
        data, scale = quantize(x, parse_kv_format(name))
        for part in (data, scale):
            paged = torch.empty_like(part)
            paged[perm] = part
            tensors.append(paged)
    table = perm.view(batch, pages_per_seq).to(torch.int32)
    if table_tokens is not None:
        if table_tokens < ctx:
            raise ValueError(f"paged_cache: table_tokens={table_tokens} must be >= the context {ctx}")
        table = torch.nn.functional.pad(table, (0, -(-table_tokens // page_size) - pages_per_seq))
    return tensors, table


def _sdpa_variants(q4, kv_copies, group):
    """{name: [fn per K/V copy]} for each SDPA backend x GQA mode that runs on these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    variants = [("default+gqa", None, True)]
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        name = backend.name.lower()
        variants += [(f"{name}+gqa", backend, True), (f"{name}+expanded", backend, False)]
    expanded = [tuple(x.repeat_interleave(group, dim=1) for x in kv_copies[0])]  # >= 2x L2 at any useful size
    runnable = {}
    for name, backend, gqa in variants:
        def make(k_in, v_in, backend=backend, gqa=gqa):
            kwargs = dict(enable_gqa=True) if gqa else {}

            def fn():
                if backend is None:
                    return sdpa(q4, k_in, v_in, **kwargs)
                with sdpa_kernel([backend]):
                    return sdpa(q4, k_in, v_in, **kwargs)
            return fn
        fns = [make(k, v) for k, v in (kv_copies if gqa else expanded)]
        try:
            fns[0]()
            torch.cuda.synchronize()
        except RuntimeError:
            continue
        runnable[name] = fns
    return runnable


def bench_decode(batch: int = 64, hq: int = 32, hkv: int = 8, d: int = 128, contexts=(1024, 4096, 16384),
                 formats=("bfp12_32", "bfp16_32", "bfloat16"), page_size: int = 16, sweep: bool = False,
                 seed: int = 0, kernels=("tiles", "blocks", "diag"), ablate: bool = False,
                 variants: list[dict] | None = None, sweep_context: int = 4096,
                 table_tokens: int | None = None) -> list[dict]:
    """One row per (format, context, kernel): time_us, speedup_vs_sdpa, bytes_read, effective_bw_GBps,
    pct_of_copy_bw, max_abs_diff vs attention_ref (+ the SDPA baseline used). A format may be "K/V"
    (e.g. bfp12_32/bfp16_32). With sweep, extra rows (config != "default") time the SWEEP variants of
    each kernel at context `sweep_context`. A kernel's rows are left out for formats it does not run. With ablate,
    more rows per format (4/8-bit and dense) time the fastest config of "tiles" and of "i8k" / "i8t" with
    stages left out (paged_attention.ABLATIONS; "tiles" 1: the loop's loads only, 2: loads and decode,
    no dots or softmax; "i8k" 3: no V stage, 4: no K stage; each 5: no loop, setup and store only) and
    an empty launch of the same grid (rows' "empty_launch_us"): what each stage costs. Variants over the
    device's shared memory are skipped, and said so. table_tokens: each page table this many tokens
    wide (paged_cache), so launches pick configs and split counts as an engine's decode graph of that
    width does; rows record the width as "capacity" (the context otherwise)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_decode needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    copy_bw = copy_bandwidth()
    scale = d ** -0.5
    rows = []
    for ctx in contexts:
        q, k, v = (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)
                   for shape in ((batch, hq, d), (batch, ctx, hkv, d), (batch, ctx, hkv, d)))
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")

        dense = (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
        kv_copies = [dense] + [tuple(x.clone() for x in dense) for _ in range(_copies_needed(2 * k.nbytes) - 1)]
        sdpa_times = {name: _time_rotating(fns)
                      for name, fns in _sdpa_variants(q[:, :, None, :], kv_copies, hq // hkv).items()}
        del dense, kv_copies
        base_name = min(sdpa_times, key=sdpa_times.get)
        capacity = -(-max(ctx, table_tokens or 0) // page_size) * page_size  # paged_cache's table, in tokens
        base = dict(sdpa_us=round(sdpa_times[base_name], 2), sdpa_variant=base_name,
                    sdpa_all_us={n: round(t, 2) for n, t in sdpa_times.items()}, capacity=capacity)
        if ablate:  # the floor under the ablations: a launch of the decode grid (one slice) doing nothing
            base["empty_launch_us"] = round(empty_launch_us((hkv, 1, batch)), 2)
            print(f"ctx {ctx:>6}: empty launch over {hkv} x 1 x {batch} programs {base['empty_launch_us']:.1f} us",
                  flush=True)

        for fmt_name in formats:
            k_name, _, v_name = fmt_name.partition("/")
            v_name = v_name or k_name
            k_fmt, v_fmt = parse_kv_format(k_name), parse_kv_format(v_name)
            cache, page_table = paged_cache(k, v, (k_name, v_name), page_size, gen, table_tokens)
            query_start = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
            ref = attention_ref(q, *cache, page_table, query_start, seq_lens, k_name, v_name, scale, 0)
            nbytes = batch * ctx * hkv * (k_fmt.bytes_per_row(d) + v_fmt.bytes_per_row(d)) + 2 * q.numel() * 2
            copies = [cache] + [[t.clone() for t in cache] for _ in range(_copies_needed(nbytes) - 1)]
            for kernel in kernels:
                if not decode_kernel_supports(kernel, k_fmt, v_fmt, d):
                    continue
                kernel_copies = copies
                if kernel == "i8t":  # the same values, V stored channels by tokens (the layout i8t reads)
                    kernel_copies = [[c[0], c[1], to_channels_by_tokens(c[2]), to_channels_by_tokens(c[3])]
                                     for c in copies]
                configs = [("default", {})] + ([(json.dumps(c), c) for c in (SWEEP[kernel] if variants is None
                                                                             else variants)]
                                               if sweep and ctx == sweep_context else [])
                if ablate and kernel in ABLATIONS:  # after the full runs: the kernel's fastest config, stages left out
                    configs += [("ablate", None)]
                for config_name, config in configs:
                    ablation = None
                    if config is None:
                        if any(not f.is_dense and f.mantissa_bits == 6 for f in (k_fmt, v_fmt)):
                            continue
                        fastest = min((r for r in rows if r["format"] == fmt_name and r["context"] == ctx
                                       and r["kernel"] == kernel and "ablate" not in r), key=lambda r: r["time_us"])
                        config = {} if fastest["config"] == "default" else json.loads(fastest["config"])
                        config = {key: val for key, val in config.items() if key != "asm"}
                        runs = [(f"ablate={a} {fastest['config']}", dict(config, ablate=a))
                                for a in ABLATIONS[kernel]]
                    else:
                        runs = [(config_name, config)]
                    for config_name, config in runs:
                        try:
                            launch = launch_of(q, kernel_copies[0], k_name, v_name, kernel, config, capacity)
                        except paged_attention.DecodeLaunchFault as fault:  # would end the CUDA context: skipped, said
                            print(f"{fmt_name:>18} ctx {ctx:>6} {kernel:>6} {config_name:<60} skipped: {fault}")
                            continue
                        try:
                            time_us, max_diff = _time_kernel(q, kernel_copies, page_table, seq_lens, k_name, v_name,
                                                             scale, ref, kernel, config, launch, page_size)
                        except Exception as err:  # e.g. a variant over the shared-memory limit: skipped, said
                            if type(err).__name__ != "OutOfResources":
                                raise
                            print(f"{fmt_name:>18} ctx {ctx:>6} {kernel:>6} {config_name:<60} skipped: {err}")
                            continue
                        ablation = config.get("ablate")
                        _add_row(rows, fmt_name, ctx, kernel, config_name, time_us, max_diff, nbytes, copy_bw, batch,
                                 hq, hkv, d, page_size, base, ablation, launch)
            del cache, copies
        del k, v
        torch.cuda.empty_cache()
    return rows


def launch_of(q, cache, k_name, v_name, kernel, config, capacity: int | None = None) -> dict:
    """The whole launch a timed row ran (DecodeConfig.to_dict()): a variant's keywords over the config
    pick_decode_config gives this device, shape and page-table capacity (the tuned entry, or the default), as
    paged_decode_attention resolves them; programs_per_sm as the variant gives it. The tuner writes
    this, not the variant alone: a field the variant leaves out took the tuned entry's value."""
    k_fmt, v_fmt = parse_kv_format(k_name), parse_kv_format(v_name)
    layout = "channels" if v_channels_by_tokens(cache[2]) else "rows"
    overrides = [config.get(key) for key in ("block_n", "num_warps", "num_stages", "prefetch")]
    launch = paged_attention._decode_launch_config(k_fmt, v_fmt, q, q.shape[1] // cache[0].shape[2], False, kernel,
                                                   *overrides, layout, capacity).to_dict()
    launch.update({key: config[key] for key in SPLIT_KEYS if key in config})
    return launch


def _add_row(rows, fmt_name, ctx, kernel, config_name, time_us, max_diff, nbytes, copy_bw, batch, hq, hkv, d,
             page_size, base, ablation, launch=None) -> None:
    bw = nbytes / (time_us * 1e-6) / 1e9
    row = dict(format=fmt_name, context=ctx, kernel=kernel, config=config_name, launch=launch,
               time_us=round(time_us, 2), speedup_vs_sdpa=round(base["sdpa_us"] / time_us, 3),
               bytes_read=nbytes, effective_bw_GBps=round(bw, 1),
               pct_of_copy_bw=round(100 * bw / copy_bw, 1), max_abs_diff=max_diff,
               copy_bw_GBps=round(copy_bw, 1), batch=batch, hq=hq, hkv=hkv, d=d, page_size=page_size, **base)
    if ablation:
        row.update(ablate=ablation, max_abs_diff=None)  # not attention: stages left out
    rows.append(row)
    diff = "(ablation)" if ablation else f"max|diff| {max_diff:.2e}"
    print(f"{fmt_name:>18} ctx {ctx:>6} {kernel:>6} {config_name:<60} {time_us:9.1f} us  "
          f"x{row['speedup_vs_sdpa']:5.2f} vs SDPA ({base['sdpa_variant']} {base['sdpa_us']:.1f} us)  "
          f"{bw:7.0f} GB/s ({row['pct_of_copy_bw']:4.1f}% of copy)  {diff}", flush=True)


def _time_kernel(q, copies, page_table, seq_lens, k_name, v_name, scale, ref, kernel, config, launch, page_size):
    """(median µs over CUDA-graph replays rotating the cache copies, max |out - ref|) of one kernel and
    launch variant (config: paged_decode_attention keywords, plus asm and SPLIT_KEYS; launch: the whole
    launch it runs, launch_of)."""
    kwargs = {key: val for key, val in config.items() if key not in ("asm",) + SPLIT_KEYS}
    if any(key in config for key in SPLIT_KEYS):  # the split count of the launch with the variant's split keys
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        kwargs["num_splits"] = auto_num_splits(q.shape[0], copies[0][0].shape[2], page_table.shape[1] * page_size,
                                               sms, launch["programs_per_sm"], launch["min_split_tokens"])
    default_asm = paged_attention._ASM_DECODE
    paged_attention._ASM_DECODE = config.get("asm", default_asm)  # read when the kernels are launched
    try:
        out = paged_decode_attention(q, *copies[0], page_table, seq_lens, k_name, v_name, scale, kernel=kernel,
                                     **kwargs)
        max_diff = (out.float() - ref.float()).abs().max().item()
        fns = [lambda c=c: paged_decode_attention(q, *c, page_table, seq_lens, k_name, v_name, scale, kernel=kernel,
                                                  **kwargs) for c in copies]
        return _time_rotating(fns), max_diff
    finally:
        paged_attention._ASM_DECODE = default_asm


def tuned_entries(rows: list[dict], context: int = 4096) -> dict:
    """{decode_config_key: {"config", "time_us", "default_time_us", "context"}}: per format, the fastest row
    at `context` (the sweep's) among every kernel and variant timed (the "tiles" default is the baseline).
    An entry's context is its rows' page-table capacity (the context unless --table-tokens widened it),
    in its key where that is not TUNE_CONTEXT; "lengths" records the sequences' own context when it differs."""
    entries = {}
    for fmt_name in dict.fromkeys(r["format"] for r in rows):
        timed = [r for r in rows if r["format"] == fmt_name and r["context"] == context and "ablate" not in r]
        if not timed:
            continue
        default = next(r for r in timed if r["kernel"] == "tiles" and r["config"] == "default")
        # "i8t" reads V stored channels by tokens (EngineConfig.v_layout "channels"): keys of their own
        for layout, kernels_ok in (("rows", lambda k: k != "i8t"), ("channels", lambda k: k == "i8t")):
            candidates = [r for r in timed if kernels_ok(r["kernel"])]
            if not candidates:
                continue
            best = min(candidates, key=lambda r: r["time_us"])
            variant = {} if best["config"] == "default" else json.loads(best["config"])
            if "asm" in variant:  # the portable decode is a process-wide switch, not a launch config
                continue
            # the launch the row ran (launch_of); rows from before it was recorded: the variant over the defaults
            config = (DecodeConfig.from_dict(best["launch"]) if best.get("launch")
                      else DecodeConfig(kernel=best["kernel"], **variant))
            k_name, _, v_name = fmt_name.partition("/")
            capacity = best.get("capacity", context)
            key = decode_config_key(parse_kv_format(k_name), parse_kv_format(v_name or k_name), best["d"],
                                    best["hq"] // best["hkv"], torch.bfloat16, layout, capacity)
            entries[key] = {"config": config.to_dict(), "time_us": best["time_us"],
                            "default_time_us": default["time_us"], "context": capacity}
            if capacity != context:
                entries[key]["lengths"] = context
    return entries


def write_tuned(rows: list[dict], directory: Path, context: int = 4096) -> Path:
    """Merge tuned_entries(rows, context) into directory/paged_decode_<device>.json (version 1); its path."""
    device = torch.cuda.get_device_name()
    path = decode_config_path(device, directory)
    data = json.loads(path.read_text()) if path.is_file() else {"shapes": {}}
    data.update(version=DecodeConfig.VERSION, device=device, torch=torch.__version__,
                triton=__import__("triton").__version__)
    data["shapes"].update(tuned_entries(rows, context))
    path.write_text(json.dumps(data, indent=1))
    return path


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'format':>18} {'ctx':>6} {'kernel':>6} {'time_us':>9} {'sdpa_us':>9} {'speedup':>8} {'GB/s':>7} "
          f"{'%copy':>6} {'max|diff|':>9}  sdpa variant")
    for r in rows:
        if r["config"] != "default":
            continue
        print(f"{r['format']:>18} {r['context']:>6} {r['kernel']:>6} {r['time_us']:>9.1f} {r['sdpa_us']:>9.1f} "
              f"{r['speedup_vs_sdpa']:>8.2f} {r['effective_bw_GBps']:>7.0f} {r['pct_of_copy_bw']:>6.1f} "
              f"{r['max_abs_diff']:>9.2e}  {r['sdpa_variant']}")
    best = {}
    for r in rows:
        key = (r["format"], r["context"])
        if "ablate" in r:
            continue
        if key not in best or r["time_us"] < best[key]["time_us"]:
            best[key] = r
    if any(r["config"] != "default" for r in rows):
        print("\nfastest kernel and config per (format, context):")
        for (fmt, ctx), r in best.items():
            print(f"{fmt:>18} {ctx:>6} {r['time_us']:>9.1f} us x{r['speedup_vs_sdpa']:.2f} "
                  f"{r['pct_of_copy_bw']:.1f}% copy  {r['kernel']} {r['config']}")


# SASS opcodes counted per loop iteration by --sass (tensor-core, memory, barrier, shuffle, ALU, decode)
# (LDL/STL: register spills to local memory)
SASS_OPS = ("HGMMA", "IGMMA", "HMMA", "LDG", "LDGSTS", "LDS", "STS", "LDSM", "LDL", "STL", "BAR", "SHFL", "HFMA2", "FFMA",
            "FMUL", "FADD", "PRMT", "LOP3", "IMAD", "I2F", "MUFU")


def sass_summary(kernel: str, k_format: str, v_format: str, group: int = 4, head_dim: int = 128,
                 q_dtype=torch.bfloat16, asm: bool = True, **config) -> dict:
    """Compile one decode kernel for sm_90 without a GPU (triton.compile, the ptxas and cuobjdump that
    ship with Triton) and count what one iteration of its main loop issues per thread: {"registers",
    "loop_instructions", opcode: count}. Static facts of this Triton's code, not timings."""
    import re
    import subprocess
    import tempfile
    from collections import Counter

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, constexprs, pointers = paged_attention.decode_kernel_spec(kernel, parse_kv_format(k_format),
                                                                  parse_kv_format(v_format), head_dim, group,
                                                                  q_dtype, DecodeConfig(kernel=kernel, **config), asm)
    if "stride_vd_col" in fn.arg_names:  # i8k / i8t: V's layout (Triton specializes strides of 1 as constants)
        ones = ("stride_vd_slot", "stride_vs_slot") if kernel == "i8t" else ("stride_vd_col", "stride_vs_col")
        constexprs = {**constexprs, **dict.fromkeys(ones, 1)}
    scalar = {"qk_scale": "fp32"}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, scalar.get(name, "i32"))
                 for name in fn.arg_names}
    # pointers and strides taken as multiples of 16 (as Triton specializes them at the benchmark's
    # shapes), except the scale bytes' per-head strides (head_dim / block)
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name not in constexprs
               and (name in pointers or (name.startswith("stride") and not name.endswith("s_head")))}
    source = ASTSource(fn=fn, signature=signature, attrs=aligned,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    options = dict(num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2))
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    tools = Path(triton.backends.nvidia.__file__).parent / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin.name], capture_output=True, text=True).stdout
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)",
                                                    sass)]
    jumps = [(int(a, 16), int(t, 16)) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/[^;]*?BRA\s+(?:\S+\s+)?0x([0-9a-f]+)",
                                                             sass)]
    first, last = max(((t, a) for a, t in jumps if t < a), key=lambda loop: loop[1] - loop[0])  # the main loop
    ops = Counter(op.split(".")[0] for a, op in code if first <= a <= last)
    registers = re.search(r"REG:(\d+)", usage)
    return {"registers": int(registers.group(1)) if registers else None, "loop_instructions": sum(ops.values()),
            **{op: ops[op] for op in SASS_OPS if ops[op]}}


def _print_sass(json_path: str, formats, kernels, group: int, head_dim: int) -> None:
    """--sass: sass_summary of each kernel that runs each format, printed and written to json_path."""
    rows = []
    for fmt in formats:
        k_name, _, v_name = fmt.partition("/")
        v_name = v_name or k_name
        for kernel in kernels:
            if paged_attention.decode_kernel_supports(kernel, parse_kv_format(k_name), parse_kv_format(v_name),
                                                      head_dim):
                rows.append(dict(format=fmt, kernel=kernel, **sass_summary(kernel, k_name, v_name, group, head_dim)))
                print(rows[-1], flush=True)
    Path(json_path).write_text(json.dumps(dict(triton=__import__("triton").__version__, rows=rows), indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json_path", help="where to write the rows as JSON")
    parser.add_argument("--sweep", action="store_true", help="also time kernel variants at --sweep-context")
    parser.add_argument("--sweep-context", type=int, default=4096, help="the context of --sweep and --tune "
                        "(one of --contexts; default 4096)")
    parser.add_argument("--variants", type=json.loads, default=None, metavar="JSON",
                        help="with --sweep: these launch variants (a JSON list of paged_decode_attention keywords, "
                        "e.g. '[{\"num_warps\": 2}]') for every kernel instead of SWEEP")
    parser.add_argument("--tune", type=Path, default=None, metavar="DIR",
                        help="with --sweep: write the fastest config per format to DIR/paged_decode_<device>.json")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--table-tokens", type=int, default=None, metavar="N",
                        help="each page table N tokens wide (>= every context), as an engine's decode graphs are "
                        "as wide as the longest sequence they serve: configs and split counts follow the width; "
                        "tuned entries are keyed by it")
    parser.add_argument("--formats", nargs="+", default=["bfp12_32", "bfp16_32", "bfloat16"])
    parser.add_argument("--kernels", nargs="+", default=list(DECODE_KERNELS), choices=list(DECODE_KERNELS))
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 32, 8, 128], metavar=("B", "HQ", "HKV", "D"),
                        help="sequences, query heads, KV heads, head_dim (default: the Llama-3-8B decode shape)")
    parser.add_argument("--ablate", action="store_true", help="also time the fastest tiles / i8k / i8t configs "
                        "with stages left out (tiles: loads only, loads + decode; i8k / i8t: no V stage, no K stage; "
                        "each: no loop), and an empty launch of the decode grid")
    parser.add_argument("--sass", action="store_true", help="no GPU needed: compile each kernel for sm_90 and print "
                        "its registers and per-iteration SASS mix per format (json_path gets the rows)")
    args = parser.parse_args()
    if args.sass:
        _print_sass(args.json_path, args.formats, args.kernels, args.shape[1] // args.shape[2], args.shape[3])
        return
    if args.sweep and args.sweep_context not in args.contexts:
        parser.error(f"--sweep-context {args.sweep_context} must be one of --contexts {args.contexts}")
    if args.table_tokens is not None and args.table_tokens < max(args.contexts):
        parser.error(f"--table-tokens {args.table_tokens} must be >= every context (--contexts {args.contexts})")
    if args.tune is not None and not (args.sweep and "tiles" in args.kernels):
        parser.error("--tune needs --sweep and the tiles kernel (its default is the baseline)")
    torch.cuda.set_device(0)
    props = torch.cuda.get_device_properties(0)
    batch, hq, hkv, d = args.shape
    rows = bench_decode(batch, hq, hkv, d, contexts=tuple(args.contexts), formats=tuple(args.formats), sweep=args.sweep,
                        kernels=tuple(args.kernels), ablate=args.ablate, variants=args.variants,
                        sweep_context=args.sweep_context, table_tokens=args.table_tokens)
    _print_table(rows)
    with open(args.json_path, "w") as f:
        json.dump(dict(version=1, device=props.name, torch=torch.__version__,
                       triton=__import__("triton").__version__, rows=rows), f, indent=1)
    if args.tune is not None:
        print(f"tuned configs: {write_tuned(rows, args.tune, args.sweep_context)}")


if __name__ == "__main__":
    main()
