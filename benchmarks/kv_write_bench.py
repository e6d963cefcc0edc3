"""Time the fused RoPE + KV write (kernels/rope_kv_write.py) of one decode pass's layer, per KV format and
grid cut (rope_kv_write_triton(launch=)): median us over CUDA-graph replays (attention_bench's timing).

    python benchmarks/kv_write_bench.py out.json --shape 256 3 64 --formats bfloat16 bfp16 bfp12/bfp16 \\
        --launches '[{}, {"split_kv": true}, {"values_per_program": 64, "split_kv": true, "num_warps": 1}]'

--shape is tokens, KV heads, head_dim (SmolLM2's decode batch: 256 3 64; Llama-3-8B's: 64 8 128).
"""
import argparse
import json

import torch

from fxforge.kernels.attention_bench import _time_rotating, empty_launch_us
from fxforge.kernels.kv_cache import allocate_kv_pair
from fxforge.kernels.rope_kv_write import WRITE_LAUNCH, rope_kv_write_triton


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json_out")
    ap.add_argument("--shape", type=int, nargs=3, default=(256, 3, 64), metavar=("TOKENS", "HKV", "D"))
    ap.add_argument("--formats", nargs="+", default=["bfloat16", "bfp16", "bfp12/bfp16"], help="K format, K/V for two")
    ap.add_argument("--launches", default="[{}]", help="JSON list of launch dicts (keys of WRITE_LAUNCH)")
    ap.add_argument("--page-size", type=int, default=16)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kv_write_bench.py needs a CUDA device")
    tokens, heads, head_dim = args.shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    k, v = (torch.randn(tokens, heads, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    num_pages = 4 * tokens  # slots scattered over 64x as many as the tokens write
    slots = torch.randperm(num_pages * args.page_size, generator=gen, device="cuda")[:tokens].to(torch.int32)
    positions = torch.randint(0, 4096, (tokens,), generator=gen, device="cuda", dtype=torch.int32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    empty = empty_launch_us((tokens,))
    print(f"empty launch over {tokens} programs: {empty:.2f} us", flush=True)
    rows = []
    for fmt in args.formats:
        k_format, _, v_format = fmt.partition("/")
        v_format = v_format or k_format
        cache = allocate_kv_pair(num_pages, args.page_size, heads, head_dim, k_format, v_format, device="cuda")
        for launch in json.loads(args.launches):
            def write(launch=launch):
                rope_kv_write_triton(k, v, *cache, slots, positions, inv_freq, False, None, k_format, v_format,
                                     launch=launch)
            time_us = _time_rotating([write])
            row = dict(format=fmt, tokens=tokens, hkv=heads, d=head_dim, launch={**WRITE_LAUNCH, **launch},
                       time_us=round(time_us, 2))
            rows.append(row)
            print(f"{fmt:>12} {json.dumps(row['launch']):<72} {time_us:7.2f} us", flush=True)
    with open(args.json_out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, empty_launch_us=round(empty, 2),
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
