"""End-to-end generation benchmark: the fxforge engine vs HF transformers `generate`, in one run.

Every request generates exactly `max_new_tokens` tokens on both sides (fxforge ignore_eos, HF
min_new_tokens), so tokens/s compare like for like. HF runs at its best settings: bf16, batched,
`cache_implementation="static"` (which compiles the decode step), warmed up at the same shapes; where
the static cache fails for a model (an MoE block transformers cannot compile), its dynamic cache, and
the result says which ran and why (`run_hf_best`). HF MoE models keep transformers' default experts
implementation (grouped GEMMs in transformers 5), recorded with the run.

The roofline counts the bytes a run must read at least: every weight once per forward pass, except
that an MoE layer reads only the experts its tokens were routed to in that pass (the runner's
`expert_passes`), plus the KV of every useful row's context.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class E2EResult:
    name: str
    tokens: int
    seconds: float
    steps: int = 0
    roofline_pct: float | None = None
    gpu_busy_pct: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def to_dict(self) -> dict:
        return {**self.__dict__, "tokens_per_second": self.tokens_per_second}


def copy_bandwidth(device="cuda", gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of reps."""
    n = int(gib * (1 << 30)) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * n * 4 / statistics.median(times)


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def expert_weight_bytes(model) -> int:
    """Bytes of every MoE expert's weights (0 for a dense model)."""
    return sum(p.numel() * p.element_size() for name, p in model.module.named_parameters()
               if name.rsplit(".", 1)[-1] in ("w_gate", "w_up", "w_down"))


def roofline_bytes(model, stats, expert_passes=None) -> int:
    """The bytes a run must read at least: every weight once per forward pass, for an MoE model only
    the experts routed to (expert_passes [MoE layers, E]: passes in which each expert got tokens),
    plus the KV of every useful row's context (the engine's stats)."""
    weights = stats.forward_passes * weight_bytes(model)
    if expert_passes is not None:
        experts = expert_weight_bytes(model)
        weights += int(expert_passes.sum()) * experts // expert_passes.numel() - stats.forward_passes * experts
    return weights + stats.kv_tokens_read * model.kv_bytes_per_token()


def run_fxforge(model, prompts: list[list[int]], max_new_tokens: int, max_num_seqs: int, bandwidth: float | None,
                name: str, warmup: bool = True, num_decode_steps: int = 8,
                max_num_batched_tokens: int = 8192, repeats: int = 3) -> E2EResult:
    """Timed offline generation: the median of `repeats` timed runs after a warm-up. Roofline =
    roofline_bytes of the last timed run at the copy bandwidth, over the median wall time."""
    from fxforge.runtime.engine import Engine
    from fxforge.runtime.sequence import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    max_len = max(len(p) for p in prompts) + max_new_tokens + 16
    engine = Engine(model, max_num_seqs=max_num_seqs, max_model_len=max_len,
                    max_num_batched_tokens=max(max_num_batched_tokens, max_len), num_decode_steps=num_decode_steps)
    if warmup:
        engine.generate(prompts[: min(len(prompts), max_num_seqs)], SamplingParams(max_new_tokens=8, ignore_eos=True))
    times, expert_passes = [], engine.runner.expert_passes
    for _ in range(repeats):
        engine.stats = type(engine.stats)()
        if expert_passes is not None:
            expert_passes.zero_()
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    stats = engine.stats
    tokens = sum(len(o.token_ids) for o in outputs)
    ideal = roofline_bytes(model, stats, expert_passes)
    roofline = 100 * ideal / bandwidth / seconds if bandwidth else None
    routed = _routed_fraction(stats, expert_passes)
    busy, profiled_seconds = _gpu_busy_pct(engine, prompts, params)  # the timed workload again, profiled
    result = E2EResult(name, tokens, seconds, stats.steps, roofline, busy)
    result.profiled_seconds = profiled_seconds
    result.forward_passes = stats.forward_passes
    result.num_decode_steps = num_decode_steps
    result.max_num_seqs = max_num_seqs
    result.all_seconds = times
    result.max_num_batched_tokens = engine.scheduler.config.max_num_batched_tokens
    result.cuda_graphs = bool(engine.runner.graphs)
    result.graph_error = engine.runner.graph_error
    result.roofline_bytes = ideal
    result.routed_expert_fraction = routed
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _routed_fraction(stats, expert_passes) -> float | None:
    """Of all (pass, layer, expert) triples of a run, the share whose expert got tokens (MoE only)."""
    if expert_passes is None or not stats.forward_passes:
        return None
    return int(expert_passes.sum()) / (stats.forward_passes * expert_passes.numel())


def _gpu_busy_pct(engine, prompts, params) -> tuple[float, float]:
    """(% of wall time with GPU kernels running: the union of kernel intervals, CUDA-graph kernels
    included; that generation's wall seconds) over one profiled generation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # no CPU-op recording: it would slow the host
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate(prompts, params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, cursor = 0.0, float("-inf")
    for s, e in intervals:  # union of kernel intervals (µs)
        if e > cursor:
            busy += e - max(s, cursor)
            cursor = e
    return 100 * busy / 1e6 / wall, wall


def run_hf(hf_model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, pad_id: int,
           name: str = "hf-static", repeats: int = 3, cache: str = "static") -> E2EResult:
    """HF generate with its `cache` ("static" or "dynamic"), batches of batch_size left-padded to one
    global prompt length; the median of `repeats` timed passes over all batches, after a warm-up."""
    width = max(len(p) for p in prompts)
    device = next(hf_model.parameters()).device

    def batch(rows):
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids.to(device), mask.to(device)

    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  cache_implementation=cache, pad_token_id=pad_id)
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]  # one static shape
    ids, mask = batch(batches[0])
    for _ in range(2):  # warm-up: compiles the decode step at these shapes
        hf_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    times = []
    for _ in range(repeats):
        _sync(device)
        start, tokens = time.perf_counter(), 0
        for rows in batches:
            ids, mask = batch(rows)
            out = hf_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            tokens += (out.shape[1] - width) * out.shape[0]
        _sync(device)
        times.append(time.perf_counter() - start)
    result = E2EResult(name, tokens, statistics.median(times))
    result.all_seconds = times
    result.cache = cache
    result.experts_implementation = getattr(hf_model.config, "_experts_implementation", None) if _is_moe(hf_model) else None
    return result


def run_hf_best(hf_model, prompts: list[list[int]], max_new_tokens: int, batch_size: int, pad_id: int,
                repeats: int = 3) -> E2EResult:
    """run_hf with the static cache, or, where that fails for this model, with the dynamic cache; the
    result's name and `cache` say which ran, `static_cache_error` why the static one did not."""
    try:
        return run_hf(hf_model, prompts, max_new_tokens, batch_size, pad_id, f"hf-static-b{batch_size}", repeats)
    except Exception as exc:  # whatever transformers raises when it cannot compile or run this model's static cache
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    result = run_hf(hf_model, prompts, max_new_tokens, batch_size, pad_id, f"hf-dynamic-b{batch_size}", repeats,
                    cache="dynamic")
    result.static_cache_error = error
    return result


def _is_moe(hf_model) -> bool:
    return bool(getattr(hf_model.config, "num_local_experts", 0) or getattr(hf_model.config, "num_experts", 0))


def chat_prompts(model, n: int) -> list[list[int]]:
    """The first n GSM8K evaluation questions, in the model's chat template, as token ids."""
    import json

    from fxforge.data import gsm8k_path

    rows = [json.loads(line) for line in gsm8k_path().read_text().splitlines()[:n]]
    return [model.encode_prompt(r["question"], chat=True) for r in rows]


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def hf_config_from_spec(spec):
    """The transformers config of a named shape: Mixtral or Qwen3-MoE for those families, else Llama
    (dense families differ from Llama in nothing that changes speed)."""
    import transformers

    common = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                  num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                  rope_theta=spec.rope_theta, rms_norm_eps=spec.rms_norm_eps,
                  max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tie_word_embeddings)
    if spec.family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=spec.moe_intermediate_size,
                                          num_local_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                                          sliding_window=spec.sliding_window or None)
    if spec.family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, intermediate_size=spec.intermediate_size,
                                           moe_intermediate_size=spec.moe_intermediate_size, num_experts=spec.num_experts,
                                           num_experts_per_tok=spec.num_experts_per_tok,
                                           norm_topk_prob=spec.norm_topk_prob)
    return transformers.LlamaConfig(**common, intermediate_size=spec.intermediate_size)


def hf_from_spec(spec, dtype=torch.bfloat16, device="cuda"):
    """A random-init transformers model of the same shape (speed peer for named shapes), made in
    `dtype` on `device` directly (Mixtral-8x7B in float32 would not fit an H200)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config_from_spec(spec), dtype=dtype)
    return model.eval()


def greedy_agreement(model, prompts: list[list[int]], max_new_tokens: int = 64) -> dict:
    """Greedy tokens from the engine over the lowered model (Triton kernels on CUDA, CUDA graphs,
    decode windows), re-scored by `model`'s own reference forward."""
    import fxforge
    from fxforge.runtime.engine import Engine
    from fxforge.runtime.sequence import SamplingParams

    lowered = fxforge.optimize(model, passes=[{"name": "lower", "backend": "triton"}])
    outs = Engine(lowered, max_num_seqs=len(prompts)).generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
    return teacher_forced_agreement(model, prompts, [o.token_ids for o in outs])


def teacher_forced_agreement(model, prompts: list[list[int]], outputs: list[list[int]], tie_margin: float = 0.05) -> dict:
    """Re-score engine outputs with the model's reference full-sequence forward: each generated token
    must be the reference argmax, except where the reference's top two logits are within tie_margin."""
    agree = total = near_ties = 0
    for prompt, out in zip(prompts, outputs):
        ids = prompt + out
        logits = model.logits(torch.tensor(ids))[len(prompt) - 1:len(ids) - 1]
        top2 = logits.topk(2, dim=-1)
        chosen = torch.tensor(out, device=logits.device)
        match = top2.indices[:, 0] == chosen
        tie = (top2.values[:, 0] - logits.gather(1, chosen[:, None])[:, 0]) <= tie_margin
        agree += int(match.sum())
        near_ties += int((~match & tie).sum())
        total += len(out)
    return {"tokens": total, "argmax_agreement": agree / total, "mismatches_at_near_ties": near_ties,
            "mismatches_not_ties": total - agree - near_ties}
