"""torch.compile(model, backend="fxforge") on a Hugging Face Llama model: RMSNorm, SwiGLU, RoPE and
attention become fxforge ops (BFP16 K and V here, as fxforge's default pipeline stores them), the rest
is compiled by Inductor.

    python examples/torch_compile_hf.py

The model has SmolLM2-135M's shape with random weights and 2 of its 30 layers, so Inductor's CPU
compile stays short; on a GPU the ops run fxforge's Triton kernels.
"""

import dataclasses

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxforge  # registers backend="fxforge" (the torch_dynamo_backends entry point does too)
from fxforge.compile_backend import FxforgeBackend
from fxforge.ir.importers.named import NAMED_SHAPES

spec = dataclasses.replace(NAMED_SHAPES["smollm2-135m"], num_layers=2)
config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                     num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                     num_key_value_heads=spec.num_kv_heads, rope_theta=spec.rope_theta, tie_word_embeddings=True)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()

backend = FxforgeBackend({"k_format": "bfp16", "v_format": "bfp16"})  # or backend="fxforge", options={...}
compiled = torch.compile(model, backend=backend)
ids = torch.randint(0, spec.vocab_size, (1, 64))
with torch.no_grad():
    eager, ours = model(ids).logits, compiled(ids).logits
print("replaced:", dict(backend.counts))
print(f"max |logit difference| vs eager: {(eager - ours).abs().max():.4f} (BFP16 K and V)")
