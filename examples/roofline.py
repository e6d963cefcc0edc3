"""Where a decode step of Llama-3-8B spends its time: per-layer FLOPs, bytes and Op/B at batch 64 and a
4k context on an H100, which ops a memory-side device (Logic-PIM) would run faster, and a roofline plot.

    python examples/roofline.py [PLOT.png]

Built from the shape alone (meta tensors): no weights are downloaded or allocated.
"""

import sys

import torch

from fxforge.analyze import analyze
from fxforge.ir.cost import BatchDesc
from fxforge.ir.importers.named import NAMED_SHAPES
from fxforge.ir.model import Model

model = Model.from_state_dict(NAMED_SHAPES["llama-3-8b"], None, device="meta", dtype=torch.bfloat16)
summary = analyze(model, BatchDesc(phase="decode", batch=64, context=4096, dtype="bfloat16"), "h100",
                  sys.argv[1] if len(sys.argv) > 1 else "roofline.png")
print({key: value for key, value in summary["totals"].items()})
