"""lower's step fusions on real weights: logits of the plainly lowered model and of the one lowered with
fuse_projections, fuse_add_norm and fuse_rope_kv, on the same random token ids (float32, references).

    python benchmarks/fused_step_check.py [--model smollm2-135m] [--kv bfp16] [--tokens 96] [--device cpu]

Prints whether the logits are bit-identical, their largest difference and how many sites each fusion took.
"""
import argparse

import torch

import fxforge
from fxforge.passes import Lower

STEP_FUSIONS = dict(fuse_projections=True, fuse_add_norm=True, fuse_rope_kv=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kv", default="bfp16", help="K and V format of the bfp-kv pass (block 32)")
    parser.add_argument("--tokens", type=int, default=96, help="tokens in each of 2 sequences")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    backend = "triton" if args.device == "cuda" else "torch"
    base = fxforge.load(args.model, device=args.device)
    ids = torch.randint(0, base.spec.vocab_size, (2, args.tokens), generator=torch.Generator().manual_seed(0))
    kv = {"name": "bfp-kv", "k_format": args.kv, "v_format": args.kv, "block": 32}
    plain = fxforge.optimize(base, passes=[kv, Lower(backend=backend)])
    fused = fxforge.optimize(base, passes=[kv, Lower(backend=backend, **STEP_FUSIONS)])
    a, b = plain.logits(ids), fused.logits(ids)
    print(f"bit-identical: {torch.equal(a, b)}, max |diff| {(a - b).abs().max().item():.3g}")
    print({key: sum(r.get("fused", True) for r in records)
           for key, records in fused.passes[-1]["report"].items() if key.startswith("fused_")})


if __name__ == "__main__":
    with torch.no_grad():
        main()
