"""Fused-MoE benchmark on the GPU: fused_moe vs the eager per-expert loop of the canonical MoE block.

    python -m fxforge.kernels.moe_bench --json-out PATH [--shapes mixtral-8x7b qwen3-30b-a3b] [--tokens 1 8 64]
    fxforge bench moe --json-out PATH [--shapes mixtral-8x7b,qwen3-30b-a3b] [--tokens 1,8,64]   (the same)

For each shape and tokens per step: random bf16 expert weights, activations and router logits, routed
by moe_route; fused_moe (launch config as pick_config gives it) is checked against fused_moe_ref, then
it and the eager loop (what ir.modules.MoEExperts ran before fxforge::moe, reimplemented here) are timed. Timing:
triton.testing.do_bench, median, warm-up excluded; do_bench zeroes a 256 MB buffer before every timed
call, so each call starts with a cold L2. fused_moe is replayed from a CUDA graph (it never syncs the
host, so it captures; the Python launch cost stays out); the eager loop cannot be captured (it reads
the routing back to the host) and is timed as it runs.
Bandwidth counts the weights of the experts actually routed to (3 * H * I * 2 bytes each), against
the measured device-to-device copy bandwidth; TFLOP/s counts 2 * T * k * 3 * H * I, against a bf16
torch.matmul (8192^3) timed in the same run.
"""

from __future__ import annotations

import argparse
import json
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fxforge.kernels.attention_bench import copy_bandwidth
from fxforge.kernels.moe import (fused_moe, fused_moe_ref, moe_align, moe_route, pick_config, shape_key,
                                 tuned_configs)


class MoEShape(NamedTuple):
    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int


SHAPES = {shape.name: shape for shape in (MoEShape("mixtral-8x7b", 8, 2, 4096, 14336),
                                          MoEShape("qwen3-30b-a3b", 128, 8, 2048, 768))}
TOKENS = (1, 8, 64, 256, 2048)


def eager_moe(x, w_gate, w_up, w_down, weights, expert_ids):
    """The canonical block's per-expert loop before fxforge::moe (MoEExperts.forward then; kernels import
    no IR): a host sync per call, to learn which experts got tokens."""
    out = torch.zeros_like(x)
    for expert in expert_ids.unique().tolist():
        token, slot = (expert_ids == expert).nonzero(as_tuple=True)
        xe = x[token]
        ye = F.linear(F.silu(F.linear(xe, w_gate[expert])) * F.linear(xe, w_up[expert]), w_down[expert])
        out.index_add_(0, token, ye * weights[token, slot, None])
    return out


def _do_bench_us(fn, warmup_ms: int, rep_ms: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def graph_time_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of one call of fn, replayed from a CUDA graph (capture fails if fn syncs the host)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compiles and allocator warm-up stay out of the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _do_bench_us(graph.replay, warmup_ms, rep_ms)


def eager_time_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of one call of fn as it runs (host syncs included)."""
    return _do_bench_us(fn, warmup_ms, rep_ms)


def matmul_tflops(n: int = 8192) -> float:
    """bf16 torch.matmul rate on random n x n x n operands, TFLOP/s."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (eager_time_us(lambda: a @ b) * 1e-6) / 1e12


def expert_weights(shape: MoEShape, generator: torch.Generator, dtype=torch.bfloat16):
    """Random (w_gate, w_up, w_down), std 0.02 as MoEExperts initialises them."""
    e, h, i = shape.num_experts, shape.hidden, shape.intermediate
    return tuple((0.02 * torch.randn(*dims, generator=generator, device="cuda")).to(dtype)
                 for dims in ((e, i, h), (e, i, h), (e, h, i)))


def routed_inputs(shape: MoEShape, tokens: int, generator: torch.Generator, dtype=torch.bfloat16):
    """(x [T, H], weights [T, k] float32, expert_ids [T, k] int32) from random router logits."""
    x = torch.randn(tokens, shape.hidden, generator=generator, device="cuda").to(dtype)
    logits = torch.randn(tokens, shape.num_experts, generator=generator, device="cuda")
    return (x, *moe_route(logits, shape.top_k, renormalize=True))


def _measure(shape: MoEShape, tokens: int, w, generator, copy_bw: float, peak_tflops: float) -> dict:
    x, weights, expert_ids = routed_inputs(shape, tokens, generator)
    config = pick_config(shape.num_experts, shape.intermediate, shape.hidden, shape.top_k, tokens, x.dtype, x.device)
    out = fused_moe(x, *w, weights, expert_ids)
    max_diff = (out.float() - fused_moe_ref(x, *w, weights, expert_ids).float()).abs().max().item()
    experts_hit = int((moe_align(expert_ids, shape.num_experts, 16).expert_counts > 0).sum())
    fused_us = graph_time_us(lambda: fused_moe(x, *w, weights, expert_ids))
    eager_us = eager_time_us(lambda: eager_moe(x, *w, weights.to(x.dtype), expert_ids))
    weight_bytes = experts_hit * 3 * shape.hidden * shape.intermediate * x.element_size()
    flops = 2 * tokens * shape.top_k * 3 * shape.hidden * shape.intermediate
    bw, tflops = weight_bytes / (fused_us * 1e-6) / 1e9, flops / (fused_us * 1e-6) / 1e12
    return dict(shape=shape.name, tokens=tokens, num_experts=shape.num_experts, top_k=shape.top_k,
                hidden=shape.hidden, intermediate=shape.intermediate, experts_hit=experts_hit,
                weight_bytes=weight_bytes, fused_us=round(fused_us, 2), eager_us=round(eager_us, 2),
                speedup_vs_eager=round(eager_us / fused_us, 2), effective_bw_GBps=round(bw, 1),
                pct_of_copy_bw=round(100 * bw / copy_bw, 1), tflops=round(tflops, 2),
                pct_of_matmul_peak=round(100 * tflops / peak_tflops, 1),
                eager_effective_bw_GBps=round(weight_bytes / (eager_us * 1e-6) / 1e9, 1),
                max_abs_diff_vs_ref=max_diff, config=config.to_dict(),
                tuned=shape_key(shape.num_experts, shape.intermediate, shape.hidden, x.dtype)
                in tuned_configs(torch.cuda.get_device_name()))


def bench_moe(shapes=tuple(SHAPES.values()), tokens=TOKENS, seed: int = 0) -> list[dict]:
    """One row per (shape, tokens): fused and eager time, effective weight bandwidth (and % of copy
    bandwidth), TFLOP/s (and % of the bf16 matmul peak), max |fused - reference|, the config used."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_moe needs a CUDA device")
    generator = torch.Generator(device="cuda").manual_seed(seed)
    copy_bw, peak_tflops = copy_bandwidth(), matmul_tflops()
    print(f"copy {copy_bw:.0f} GB/s, bf16 matmul {peak_tflops:.0f} TFLOP/s", flush=True)
    rows = []
    for shape in shapes:
        w = expert_weights(shape, generator)
        for count in tokens:
            row = _measure(shape, count, w, generator, copy_bw, peak_tflops)
            rows.append(dict(row, copy_bw_GBps=round(copy_bw, 1), matmul_peak_tflops=round(peak_tflops, 1)))
            print(f"{shape.name:>14} T={count:<5} fused {row['fused_us']:9.1f} us  eager {row['eager_us']:9.1f} us "
                  f"x{row['speedup_vs_eager']:<6} {row['effective_bw_GBps']:6.0f} GB/s ({row['pct_of_copy_bw']:4.1f}% "
                  f"copy)  {row['tflops']:6.1f} TFLOP/s ({row['pct_of_matmul_peak']:4.1f}% peak)  "
                  f"experts hit {row['experts_hit']:>3}  max|diff| {row['max_abs_diff_vs_ref']:.2e}", flush=True)
        del w
        torch.cuda.empty_cache()
    return rows


def results_document(rows: list[dict]) -> dict:
    """The JSON file's content: the rows and what they ran on."""
    return dict(version=1, device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, rows=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out", required=True, help="where to write the rows as JSON")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    args = parser.parse_args(argv)
    rows = bench_moe([SHAPES[name] for name in args.shapes], tuple(args.tokens))
    with open(args.json_out, "w") as f:
        json.dump(results_document(rows), f, indent=1)


if __name__ == "__main__":
    main()
