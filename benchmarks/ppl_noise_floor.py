"""How much the BFP perplexity moves when attention outputs change by float32 noise alone.

The reference path's attention output is multiplied by (1 + eps * N(0, 1)) (a fresh seed per run)
and perplexity is measured on the same tokens as `fxforge.cli._ppl_check`. If eps of 1e-7
(float32 rounding, the size of the Triton-vs-reference kernel differences) already moves
perplexity by more than the Triton-vs-reference gap, that gap is noise, not a kernel error.

    python benchmarks/ppl_noise_floor.py --device cuda --json-out noise.json
"""
import argparse
import json
import math

import torch

import fxforge
from fxforge.data import load_texts
from fxforge.evaluate import perplexity
from fxforge.ir.tokenizer import token_windows
from fxforge.ir import ops

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cuda")
ap.add_argument("--max-tokens", type=int, default=16384)
ap.add_argument("--eps", default="1e-7,1e-6")
ap.add_argument("--seeds", type=int, default=3)
ap.add_argument("--json-out")
args = ap.parse_args()

base = fxforge.load("smollm2-135m", device=args.device, dtype="float32")
windows = token_windows(base.tokenizer, load_texts("gsm8k", "eval"), 512, args.max_tokens)
reference_attention = ops.REFERENCES["attention"]
results = {"tokens": int(windows[:, 1:].numel()), "dtype": "float32", "formats": {}}
for k_format in ("bfp16", "bfp12"):
    model = fxforge.optimize(base, passes=[{"name": "bfp-kv", "k_format": k_format, "v_format": "bfp16"}])
    rows = {}
    for eps in [0.0] + [float(e) for e in args.eps.split(",")]:
        values = []
        for seed in range(args.seeds if eps else 1):
            gen = torch.Generator(device=args.device).manual_seed(seed)

            def noisy(*a, eps=eps, gen=gen):
                out = reference_attention(*a)
                if not eps:
                    return out
                noise = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32)
                return (out.float() * (1 + eps * noise)).to(out.dtype)

            ops.REFERENCES["attention"] = noisy  # the model is unlowered: its attention nodes run the reference
            values.append(perplexity(model, windows, show_progress=False).perplexity)
        ops.REFERENCES["attention"] = reference_attention
        rows[str(eps)] = values
    clean = rows["0.0"][0]
    results["formats"][f"K {k_format} V bfp16"] = {
        "clean": clean, "by_eps": rows,
        "max_rel_change_pct": {e: 100 * max(abs(v / clean - 1) for v in vs) for e, vs in rows.items() if e != "0.0"}}
    print(k_format, json.dumps(results["formats"][f"K {k_format} V bfp16"]), flush=True)
if args.json_out:
    open(args.json_out, "w").write(json.dumps(results, indent=1))
assert not math.isnan(clean)
