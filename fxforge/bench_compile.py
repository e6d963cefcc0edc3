"""`fxforge bench compile`: Hugging Face models under eager, Inductor and backend="fxforge", one run.

Workloads per model: a prefill forward (batch x prompt tokens, no cache) and single decode steps over
a transformers StaticCache (batch 1 and 64 by default) after a prefill of `context` tokens. Each
compiler compiles each workload once (compile time reported), then the median of `repeats` timed
calls is reported, with the speed-up over backend="inductor" at default settings. Models are built
from fxforge's named shapes with random weights (speed does not depend on the values).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

BACKENDS = {  # name -> torch.compile kwargs (None: eager)
    "eager": None,
    "inductor": {"backend": "inductor"},
    "inductor-max-autotune": {"backend": "inductor", "mode": "max-autotune-no-cudagraphs"},
    "fxforge": {"backend": "fxforge"},
}


@dataclass
class Row:
    model: str
    workload: str
    backend: str
    ms: float
    tokens_per_s: float
    compile_s: float
    replaced: dict
    speedup_vs_inductor: float | None = None


def _hf_model(spec, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                         num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                         head_dim=spec.head_dim, rope_theta=spec.rope_theta, rms_norm_eps=spec.rms_norm_eps,
                         max_position_embeddings=max(spec.max_position_embeddings, 4096),
                         tie_word_embeddings=spec.tie_word_embeddings)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def _timed(fn, repeats: int, device) -> tuple[float, float]:
    """(seconds of the first call, which compiles; median seconds of `repeats` calls after one more warm-up)."""
    def run():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = run()
    run()
    return first, statistics.median(run() for _ in range(repeats))


def _compiled(fn, backend: str, options: dict):
    kwargs = BACKENDS[backend]
    if kwargs is None:
        return fn, None
    kwargs = dict(kwargs)
    counter = None
    if backend == "fxforge":
        from fxforge.compile_backend import FxforgeBackend

        counter = FxforgeBackend(options)
        kwargs["backend"] = counter
    return torch.compile(fn, **kwargs), counter


def bench_model(name: str, spec, backends: list[str], options: dict, prefill: tuple[int, int],
                decode_batches: list[int], context: int, repeats: int, dtype, device, progress=print) -> list[Row]:
    from transformers import StaticCache

    model = _hf_model(spec, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    batch, length = prefill
    ids = torch.randint(0, spec.vocab_size, (batch, length), generator=gen).to(device)
    workloads = [(f"prefill b{batch}x{length}", batch * length, lambda: lambda: model(ids, use_cache=False).logits)]
    for b in decode_batches:
        def make_step(b=b):
            cache = StaticCache(config=model.config, max_batch_size=b, max_cache_len=context + 16)
            prompt = torch.randint(0, spec.vocab_size, (b, context), generator=gen).to(device)
            with torch.no_grad():
                model(prompt, past_key_values=cache, cache_position=torch.arange(context, device=device))
            token = prompt[:, -1:]
            position = torch.tensor([context], device=device)
            return lambda: model(token, past_key_values=cache, cache_position=position).logits
        workloads.append((f"decode b{b} ctx{context}", b, make_step))
    for workload, tokens, make in workloads:
        for backend in backends:
            torch._dynamo.reset()
            fn, counter = _compiled(make(), backend, options)
            with torch.no_grad():
                compile_s, seconds = _timed(fn, repeats, device)
            row = Row(name, workload, backend, 1e3 * seconds, tokens / seconds, compile_s,
                      dict(counter.counts) if counter is not None else {})
            rows.append(row)
            progress(asdict(row))
    for row in rows:
        peer = next((r for r in rows if r.workload == row.workload and r.model == row.model
                     and r.backend == "inductor"), None)
        row.speedup_vs_inductor = peer.ms / row.ms if peer else None
    return rows
