"""Which decode launch variants fault on this GPU: each variant's paged_decode_attention launch runs in a
process of its own (CUDA_LAUNCH_BLOCKING=1), so an illegal memory access ends that process only, and
the probe says which launches did and what the others computed against attention_ref. A launch already
known to fault (paged_attention.known_decode_fault) is refused before it runs: its row names DecodeLaunchFault.

    python benchmarks/decode_variant_probe.py out.json --format bfloat16 --context 224 --table-tokens 464 \\
        --shape 256 9 3 64 --kernel tiles --variants '[{"block_n": 128, "num_warps": 4, "num_stages": 1}]'
"""
import argparse
import json
import os
import subprocess
import sys

ONE = r"""
import json, sys, torch
from fxforge.kernels.attention import attention_ref
from fxforge.kernels.attention_bench import paged_cache
from fxforge.kernels.paged_attention import paged_decode_attention
(b, hq, hkv, d), ctx, table, fmt, kernel, variant = json.loads(sys.argv[1])
k_name, _, v_name = fmt.partition("/")
v_name = v_name or k_name
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(*s, generator=gen, device="cuda", dtype=torch.bfloat16)
           for s in ((b, hq, d), (b, ctx, hkv, d), (b, ctx, hkv, d)))
cache, page_table = paged_cache(k, v, (k_name, v_name), 16, gen, table)
seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
ref = attention_ref(q, *cache, page_table, torch.arange(b + 1, dtype=torch.int32, device="cuda"), seq_lens,
                    k_name, v_name, d ** -0.5, 0)
out = paged_decode_attention(q, *cache, page_table, seq_lens, k_name, v_name, d ** -0.5, kernel=kernel, num_splits=1,
                             **variant)
torch.cuda.synchronize()
print(json.dumps({"max_abs_diff": (out.float() - ref.float()).abs().max().item()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json_out")
    ap.add_argument("--format", default="bfloat16", help="KV format, K/V for two")
    ap.add_argument("--context", type=int, default=224)
    ap.add_argument("--table-tokens", type=int, default=None)
    ap.add_argument("--shape", type=int, nargs=4, default=(256, 9, 3, 64), metavar=("B", "HQ", "HKV", "D"))
    ap.add_argument("--kernel", default="tiles")
    ap.add_argument("--variants", required=True, help="JSON list of paged_decode_attention keywords per launch")
    args = ap.parse_args()
    rows = []
    for variant in json.loads(args.variants):
        spec = json.dumps([args.shape, args.context, args.table_tokens, args.format, args.kernel, variant])
        proc = subprocess.run([sys.executable, "-c", ONE, spec], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"))
        row = dict(format=args.format, context=args.context, capacity=args.table_tokens, kernel=args.kernel,
                   variant=variant, returncode=proc.returncode)
        if proc.returncode == 0:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            row["error"] = [line for line in proc.stderr.strip().splitlines() if "Error" in line][-1:] or \
                proc.stderr.strip().splitlines()[-1:]
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.json_out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
