"""Tune fused_moe's launch configs on this GPU; write kernels/configs/moe_<device>.json.

    python benchmarks/moe_tune.py --out kernels/configs/ [--shapes mixtral-8x7b qwen3-30b-a3b] [--tokens 1 8 64 256 2048]

Shapes (bf16): Mixtral-8x7B (E=8, top-2, H=4096, I=14336) and Qwen3-30B-A3B (E=128, top-8, H=2048,
I=768), at 1, 8, 64, 256 and 2048 tokens per step. For each (shape, tokens):
  1. BLOCK_M candidates from the rows an expert gets on average (decode: 16 only);
  2. for each BLOCK_M, the gate/up kernel's tiles and the down kernel's tiles are timed separately
     (they share only BLOCK_M), from nine candidates each, pruned to what fits in shared memory
     and registers, and the fastest of each kept;
  3. each BLOCK_M's pair of winners and default_config are timed end to end (fused_moe, alignment and
     slot sum included); the fastest is written, with its time and the default's.
Timing: triton.testing.do_bench, median over CUDA-graph replays, warm-up excluded, L2 cleared before
each call (kernels/moe_bench.py's graph_time_us). About a minute on an H200 (31-37 s measured), mostly compiles.
The file merges into an existing one of the same version (other shapes are kept).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from tqdm import tqdm

from fxforge.kernels.moe import (GemmTiles, MoEConfig, default_config, fused_moe, moe_align, moe_down,
                                 moe_gate_up_swiglu, config_path, shape_key)
from fxforge.kernels.moe_bench import SHAPES, TOKENS, MoEShape, expert_weights, graph_time_us, routed_inputs

# (block_n, block_k, num_warps, num_stages). Few rows per expert: the kernels stream weights, so many
# narrow n-tiles with long k steps keep every SM loading; many rows: wide tiles and more warps feed
# the tensor cores.
STREAMING_TILES = [(16, 256, 4, 3), (32, 64, 4, 5), (32, 128, 4, 4), (32, 256, 4, 3), (64, 64, 4, 4), (64, 128, 4, 4),
                   (64, 256, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3)]
COMPUTE_TILES = [(64, 64, 4, 4), (64, 128, 4, 3), (128, 32, 4, 5), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4),
                 (128, 128, 8, 3), (256, 32, 8, 4), (256, 64, 8, 3)]
SHARED_MEMORY_BYTES = 200 << 10  # of the 227 KB a Hopper block may take; Triton needs some for itself
ACCUMULATORS_PER_THREAD = 128  # float32 accumulator registers per thread before spills become likely
TIMING = dict(warmup_ms=10, rep_ms=40)


def block_m_candidates(rows_per_expert: float) -> list[int]:
    if rows_per_expert <= 8:
        return [16]
    if rows_per_expert <= 32:
        return [16, 32]
    return [32, 64] if rows_per_expert <= 64 else [64, 128]


def tile_candidates(block_m: int, weight_matrices: int) -> list[GemmTiles]:
    """Tiles whose staged operands fit in shared memory and whose accumulators fit in registers
    (the gate/up kernel stages and accumulates two weight matrices, the down kernel one)."""
    tiles = []
    for block_n, block_k, warps, stages in (STREAMING_TILES if block_m <= 32 else COMPUTE_TILES):
        staged = stages * (block_m * block_k + weight_matrices * block_k * block_n) * 2
        accumulators = weight_matrices * block_m * block_n / (warps * 32)
        if staged <= SHARED_MEMORY_BYTES and accumulators <= ACCUMULATORS_PER_THREAD:
            tiles.append(GemmTiles(block_n, block_k, group_m=1 if block_m <= 32 else 8, num_warps=warps,
                                   num_stages=stages))
    return tiles


def _fastest(candidates, time_one) -> tuple[object, float]:
    """(candidate, time) of the fastest candidate; those that fail to compile or launch are skipped."""
    best, best_us = None, float("inf")
    for candidate in candidates:
        try:
            us = time_one(candidate)
        except (triton.runtime.errors.OutOfResources, RuntimeError) as error:
            tqdm.write(f"  skipped {candidate}: {type(error).__name__}")
            continue
        if us < best_us:
            best, best_us = candidate, us
    return best, best_us


def tune_bucket(shape: MoEShape, tokens: int, w, generator) -> dict:
    x, weights, expert_ids = routed_inputs(shape, tokens, generator)
    w_gate, w_up, w_down = w
    finalists = []
    for block_m in block_m_candidates(tokens * shape.top_k / shape.num_experts):
        alignment = moe_align(expert_ids, shape.num_experts, block_m)
        gate_up, _ = _fastest(tile_candidates(block_m, 2), lambda tiles: graph_time_us(
            lambda: moe_gate_up_swiglu(x, w_gate, w_up, alignment, shape.top_k, tiles), **TIMING))
        h = moe_gate_up_swiglu(x, w_gate, w_up, alignment, shape.top_k, gate_up)
        down, _ = _fastest(tile_candidates(block_m, 1), lambda tiles: graph_time_us(
            lambda: moe_down(h, w_down, weights, alignment, tiles), **TIMING))
        finalists.append(MoEConfig(block_m, gate_up, down))
    default = default_config(tokens * shape.top_k / shape.num_experts, x.dtype)
    end_to_end = {config: graph_time_us(lambda: fused_moe(x, *w, weights, expert_ids, config), **TIMING)
                  for config in dict.fromkeys([*finalists, default])}
    best = min(end_to_end, key=end_to_end.get)
    return dict(config=best.to_dict(), time_us=round(end_to_end[best], 2), default_time_us=round(end_to_end[default], 2))


def tune(shapes: list[MoEShape], tokens: list[int], seed: int = 0) -> dict[str, dict]:
    """{shape_key: {str(tokens): {config, time_us, default_time_us}}} for bf16."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    results = {}
    progress = tqdm(total=len(shapes) * len(tokens), desc="moe tune")
    for shape in shapes:
        w = expert_weights(shape, generator)
        buckets = results.setdefault(shape_key(shape.num_experts, shape.intermediate, shape.hidden, torch.bfloat16), {})
        for count in tokens:
            progress.set_postfix_str(f"{shape.name} T={count}")
            buckets[str(count)] = entry = tune_bucket(shape, count, w, generator)
            tqdm.write(f"{shape.name:>14} T={count:<5} {entry['time_us']:9.1f} us (default {entry['default_time_us']:.1f})"
                       f"  {entry['config']}")
            progress.update()
        del w
        torch.cuda.empty_cache()
    return results


def write(results: dict, out_dir: Path) -> Path:
    device = torch.cuda.get_device_name()
    path = config_path(device, out_dir)
    data = json.loads(path.read_text()) if path.is_file() else {}
    shapes = data.get("shapes", {}) if data.get("version") == MoEConfig.VERSION else {}
    shapes.update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(version=MoEConfig.VERSION, device=device, torch=torch.__version__,
                                    triton=triton.__version__, shapes=shapes), indent=1) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the config file (kernels/configs/)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    args = parser.parse_args()
    results = tune([SHAPES[name] for name in args.shapes], args.tokens)
    print(f"wrote {write(results, args.out)}")


if __name__ == "__main__":
    main()
