"""End-to-end generation benchmark: the fxforge engine vs HF transformers `generate`, in one run.

Every request generates exactly `max_new_tokens` tokens on both sides (fxforge ignore_eos, HF
min_new_tokens), so tokens/s compare like for like. HF runs at its best settings: bf16, batched,
`cache_implementation="static"` (which compiles the decode step), warmed up at the same shapes; where
the static cache fails for a model (an MoE block transformers cannot compile), its dynamic cache, and
the result says which ran and why (`run_hf_best`). HF MoE models keep transformers' default experts
implementation (grouped GEMMs in transformers 5), recorded with the run.

The roofline of a run is the sum over its forward passes (the timed run's only) of
max(FLOPs / matmul peak, bytes / copy bandwidth), both ceilings measured in the same run
(`matmul_peak`, `copy_bandwidth`; on a CPU smoke run, whatever the CPU gives). A pass's bytes are
what it must read at least: every weight once, except that an MoE layer reads only the experts its
tokens were routed to (the runner's `expert_passes`, as a run-wide share), plus the KV of every
useful row's context in the cache's format. Its FLOPs are 2 per weight per row (the LM head only
for the rows that sample, experts at top-k / E), plus 4 * Hq * head_dim per (query, key) pair per
layer for attention (`FlopModel`). Every e2e row records the FLOPs and bytes (weights, KV) it used
and both ceilings, so a reader can recompute it; `roofline_bytes_only_pct` keeps the bytes-only
figure earlier runs reported.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field

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
    """Copy bandwidth in bytes/s (bytes read + written), median of reps: device to device on CUDA; on
    a CPU, a 64 MiB memory copy (a smoke run's ceiling, whatever the CPU gives)."""
    if torch.device(device).type != "cuda":
        src = torch.randn((64 << 20) // 4)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), torch.device("cpu"), reps)
    n = int(gib * (1 << 30)) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 4 / _median_seconds(lambda: dst.copy_(src), torch.device(device), reps)


def matmul_peak(device="cuda", n: int = 8192, reps: int = 10) -> float:
    """Dense matmul rate in FLOP/s, median of reps on random n x n x n operands: bf16 on CUDA; on a CPU
    float32 at n = 512 (a smoke run's ceiling, whatever the CPU gives)."""
    device = torch.device(device)
    if device.type != "cuda":
        n, dtype = min(n, 512), torch.float32
    else:
        dtype = torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _median_seconds(lambda: a @ b, device, reps)


def _median_seconds(fn, device: torch.device, reps: int) -> float:
    """Median wall time of fn over reps calls after 3 warm-ups (CUDA events on CUDA)."""
    times = []
    for i in range(reps + 3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            fn()
            seconds = time.perf_counter() - begin
        if i >= 3:
            times.append(seconds)
    return statistics.median(times)


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


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of a model's forward rows: 2 per weight per row for every matmul weight but the LM head
    (each alias of a tied weight counted at each use; MoE experts at top-k / E of theirs), 2 per LM
    head weight per logit row (the rows that sample), and 4 * Hq * head_dim per (query, key) pair
    and layer for attention (QK^T and PV)."""

    row_flops: int
    logit_row_flops: int
    pair_flops: int
    sliding_window: int = 0

    @classmethod
    def of(cls, model) -> "FlopModel":
        spec = model.spec
        body = head = 0
        for name, p in model.module.named_parameters(remove_duplicate=False):
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() < 2 or name.endswith("embed.weight"):  # norms, biases; the embedding is a gather
                continue
            if name.endswith("lm_head.weight"):
                head += p.numel()
            elif leaf in ("w_gate", "w_up", "w_down"):  # [E, ...]: a token runs top-k of the E experts
                body += p.numel() * spec.num_experts_per_tok // spec.num_experts
            else:
                body += p.numel()
        return cls(2 * body, 2 * head, 4 * spec.num_heads * spec.head_dim * spec.num_layers,
                   getattr(spec, "sliding_window", 0) or 0)

    def keys_seen(self, start: int, count: int) -> int:
        """(query, key) pairs of `count` queries at positions start.. (causal, sliding window)."""
        total = count * start + count * (count + 1) // 2
        window = self.sliding_window
        if window and start + count > window:  # positions p >= window see `window` keys, not p + 1
            over = range(max(start, window), start + count)
            total -= sum(p + 1 - window for p in over)
        return total


@dataclass
class PassLog:
    """What each forward pass of an engine did, read off every SchedulerOutput as the scheduler hands
    it out (`attach`): (rows, logit rows, attention (query, key) pairs, KV tokens read) per pass, a
    decode window of K steps being K passes (a row counts while its tokens count), and the most
    sequences scheduled in one step. KV tokens read match EngineStats.kv_tokens_read."""

    flop_model: FlopModel
    passes: list[tuple[int, int, int, int]] = field(default_factory=list)
    max_scheduled: int = 0

    def attach(self, engine) -> "PassLog":
        """Record every SchedulerOutput of schedule(), and of chain() (the windows overlap_windows chains)."""
        schedule, chain = engine.scheduler.schedule, engine.scheduler.chain

        def logged():
            out = schedule()
            self.record(out)
            return out

        def logged_chain(output):
            out = chain(output)
            if out is not None:
                self.record(out)
            return out

        engine.scheduler.schedule, engine.scheduler.chain = logged, logged_chain
        return self

    def clear(self) -> None:
        self.passes, self.max_scheduled = [], 0

    def record(self, out) -> None:
        if out.is_empty:
            return
        self.max_scheduled = max(self.max_scheduled, len(out.scheduled))
        keys = self.flop_model.keys_seen
        if out.num_steps == 1:
            self.passes.append((sum(s.num_tokens for s in out.scheduled), sum(s.sample for s in out.scheduled),
                                sum(keys(s.start_position, s.num_tokens) for s in out.scheduled),
                                sum(s.end_position for s in out.scheduled)))
            return
        for step in range(out.num_steps):  # step j of a decode window: the rows whose j-th token counts
            live = [s for s in out.scheduled if s.num_steps > step]
            self.passes.append((len(live), len(live), sum(keys(s.start_position + step, 1) for s in live),
                                sum(s.end_position + step for s in live)))


def roofline(model, passes: list[tuple[int, int, int, int]], flop_model: FlopModel, peak_flops: float,
             bandwidth: float, routed_expert_fraction: float | None = None) -> dict:
    """Sum over passes of max(FLOPs / peak_flops, bytes / bandwidth) (seconds), with the FLOPs and
    bytes (weights, KV) summed over the passes. An MoE model's weight bytes per pass count its
    experts at the run's routed share."""
    weights = weight_bytes(model)
    if routed_expert_fraction is not None:
        experts = expert_weight_bytes(model)
        weights += round(experts * routed_expert_fraction) - experts
    kv_per_token = model.kv_bytes_per_token()
    seconds = flops = kv_bytes = 0
    for rows, logit_rows, pairs, kv_tokens in passes:
        pass_flops = (rows * flop_model.row_flops + logit_rows * flop_model.logit_row_flops
                      + pairs * flop_model.pair_flops)
        seconds += max(pass_flops / peak_flops, (weights + kv_tokens * kv_per_token) / bandwidth)
        flops += pass_flops
        kv_bytes += kv_tokens * kv_per_token
    return {"roofline_seconds": seconds, "flops": flops, "weight_bytes": weights * len(passes), "kv_bytes": kv_bytes,
            "weight_bytes_per_pass": weights, "kv_bytes_per_token": kv_per_token}


def run_fxforge(model, prompts: list[list[int]], max_new_tokens: int, max_num_seqs: int, bandwidth: float | None,
                name: str, warmup: bool = True, num_decode_steps: int = 8,
                max_num_batched_tokens: int = 8192, repeats: int = 3, peak_flops: float | None = None,
                num_pages: int | None = None, v_layout: str = "auto", overlap_windows: bool | None = None) -> E2EResult:
    """Timed offline generation: the median of `repeats` timed runs after a warm-up. The counts
    (steps, forward passes, FLOPs, bytes) are the last timed run's; roofline_pct = its `roofline`
    at the measured ceilings over the median wall time (needs bandwidth and peak_flops). A profiled
    re-run of the same workload afterwards gives gpu_busy_pct (None on a CPU) and counts nowhere.
    num_pages: the KV pool (None: the engine's default); v_layout, overlap_windows: as EngineConfig's (None:
    the engine's default)."""
    from fxforge.runtime.engine import Engine, EngineStats
    from fxforge.runtime.sequence import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    max_len = max(len(p) for p in prompts) + max_new_tokens + 16
    settings = dict(max_num_seqs=max_num_seqs, max_model_len=max_len, num_decode_steps=num_decode_steps,
                    max_num_batched_tokens=max(max_num_batched_tokens, max_len), v_layout=v_layout,
                    overlap_windows=overlap_windows)
    if num_pages is not None:
        settings["num_pages"] = num_pages
    engine = Engine(model, **settings)
    flop_model = FlopModel.of(model)
    log = PassLog(flop_model).attach(engine)
    device = model.device
    if warmup:
        engine.generate(prompts[: min(len(prompts), max_num_seqs)], SamplingParams(max_new_tokens=8, ignore_eos=True))
    times, expert_passes = [], engine.runner.expert_passes
    for _ in range(repeats):
        engine.stats = EngineStats()
        log.clear()
        if expert_passes is not None:
            expert_passes.zero_()
        _sync(device)
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    stats = dataclasses.replace(engine.stats)  # the last timed run's counts; the profiled re-run adds its own
    passes, max_scheduled = list(log.passes), log.max_scheduled
    tokens = sum(len(o.token_ids) for o in outputs)
    ideal = roofline_bytes(model, stats, expert_passes)
    routed = _routed_fraction(stats, expert_passes)
    costs = roofline(model, passes, flop_model, peak_flops or float("inf"), bandwidth or float("inf"), routed)
    busy, profiled_seconds = _gpu_busy_pct(engine, prompts, params)  # the timed workload again, profiled
    result = E2EResult(name, tokens, seconds, stats.steps,
                       100 * costs["roofline_seconds"] / seconds if bandwidth and peak_flops else None, busy)
    result.roofline_bytes_only_pct = 100 * ideal / bandwidth / seconds if bandwidth else None
    result.profiled_seconds = profiled_seconds
    result.forward_passes = stats.forward_passes
    result.preemptions = stats.preemptions
    # where the timed run's wall time went (the last run): steps carrying prefill vs decode-only steps
    result.prefill_steps = stats.prefill_steps
    result.prefill_step_seconds = stats.prefill_step_seconds
    result.decode_step_seconds = stats.decode_step_seconds
    result.chained_windows = stats.chained_windows
    result.num_decode_steps = num_decode_steps
    result.max_num_seqs = max_num_seqs
    result.max_scheduled_seqs = max_scheduled
    result.num_pages = engine.config.num_pages
    result.kv_pool_bytes = engine.config.num_pages * engine.config.page_size * model.kv_bytes_per_token()
    result.all_seconds = times
    result.max_num_batched_tokens = engine.scheduler.config.max_num_batched_tokens
    result.cuda_graphs = bool(engine.runner.graphs)
    result.graph_error = engine.runner.graph_error
    result.roofline_bytes = ideal
    result.routed_expert_fraction = routed
    result.decode_kernel = os.environ.get("FXFORGE_DECODE_KERNEL") or "config"  # forced, or the launch config's
    result.copy_bandwidth_GBps = bandwidth / 1e9 if bandwidth else None
    result.matmul_peak_tflops = peak_flops / 1e12 if peak_flops else None
    result.__dict__.update(costs)
    return result


def seats_in_kv_memory(model, kv_memory_bytes: int, seq_len: int, page_size: int = 16) -> tuple[int, int]:
    """(pages, sequences of seq_len tokens that fit in them at full length) of a KV pool of
    kv_memory_bytes in `model`'s cache format (the runner's scratch page comes on top)."""
    pages = kv_memory_bytes // (model.kv_bytes_per_token() * page_size)
    return pages, pages // -(-seq_len // page_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _routed_fraction(stats, expert_passes) -> float | None:
    """Of all (pass, layer, expert) triples of a run, the share whose expert got tokens (MoE only)."""
    if expert_passes is None or not stats.forward_passes:
        return None
    return int(expert_passes.sum()) / (stats.forward_passes * expert_passes.numel())


def _gpu_busy_pct(engine, prompts, params) -> tuple[float | None, float]:
    """(% of wall time with GPU kernels running: the union of kernel intervals, CUDA-graph kernels
    included; that generation's wall seconds) over one profiled generation; on a CPU, (None, the
    wall seconds of an unprofiled one)."""
    from torch.profiler import ProfilerActivity, profile

    if engine.model.device.type != "cuda":
        start = time.perf_counter()
        engine.generate(prompts, params)
        return None, time.perf_counter() - start

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
