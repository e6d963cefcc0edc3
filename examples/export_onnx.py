"""Export SmolLM2-135M (default pipeline: BFP16 K and V cache) to ONNX and generate greedily with ONNX
Runtime alone: the paged KV cache goes in and comes back out of every step.

    python examples/export_onnx.py [OUT_DIR]
"""

import sys
import tempfile

import onnxruntime as ort

import fxforge
from fxforge.ir.model import build_batch
from fxforge.onnx_export import export_onnx, input_names
from fxforge.optimizer import DEFAULT_PASSES

model = fxforge.optimize(fxforge.load("smollm2-135m"), passes=DEFAULT_PASSES)
path = export_onnx(model, sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
session = ort.InferenceSession(str(path))
print(f"wrote {path}")

prompt = model.encode_prompt("What is 7 * 6?")
page_size, max_new = 16, 8
pages = list(range((len(prompt) + max_new) // page_size + 1))
cache = [t.numpy() for t in model.new_kv_cache(len(pages), page_size)]
names = input_names(model.spec.num_layers)
tokens, past, chunk = [], 0, prompt
for _ in range(max_new):
    batch = build_batch([chunk], [past], [pages], page_size, "cpu")
    logits, *cache = session.run(None, dict(zip(names, [t.numpy() for t in batch.args()] + cache)))
    past, chunk = past + len(chunk), [int(logits[-1].argmax())]
    tokens += chunk
print("ONNX Runtime:", repr(model.tokenizer.decode(tokens)))
print("fxforge:     ", repr(model.tokenizer.decode(model.generate([prompt], max_new_tokens=max_new)[0])))
