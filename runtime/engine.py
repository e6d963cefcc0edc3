"""Engine: continuous batching over a model. `step()` = schedule, execute (run and sample), update.

    engine = Engine(fxforge.load("smollm2-135m"))
    outputs = engine.generate(["What is 2+2?"], SamplingParams(max_new_tokens=32))
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fxforge.ir.skip import skip_schedule

from .config import EngineConfig
from .loop_runner import DepthwiseRunner
from .model_runner import ModelRunner
from .scheduler import Scheduler, SchedulerOutput
from .sequence import SamplingParams, Sequence
from .skip_runner import SkipRunner

# Settings whose None means "the model's default", as Engine's keywords always took them.
_MODEL_DEFAULTS = ("max_model_len", "num_pages", "use_cuda_graphs", "overlap_windows")


def config_for_model(model, *, gpu_memory_fraction: float = 0.5, **settings) -> EngineConfig:
    """The EngineConfig for `model`: `settings` are EngineConfig fields; the model decides those left
    out (or None): max_model_len = min(its max positions, 4096); num_pages = what
    `gpu_memory_fraction` of free GPU memory holds, or on CPU enough for max_num_seqs full sequences
    up to 65,536 positions; use_cuda_graphs = on CUDA with the attention (and MoE experts) bound to Triton;
    eos_token_id = the spec's first EOS id; overlap_windows = on CUDA where the plain model runner serves
    (no depth-wise loop, no skip-decode schedule): launching the next decode window before this one's
    tokens are read took SmolLM2 from 117k to 137k tokens/s on the H200 (BENCHMARKS.md), while on a CPU
    every launch runs to its end, so chaining would only add a window for sequences that stop early."""
    settings = {k: v for k, v in settings.items() if not (k in _MODEL_DEFAULTS and v is None)}
    spec = model.spec
    settings.setdefault("max_model_len", min(spec.max_position_embeddings, 4096))
    bound = model.kernel_bindings()  # the torch references sync the host (MoE) or are slow to replay
    settings.setdefault("use_cuda_graphs", model.device.type == "cuda" and bound.get("attention") == "triton"
                        and bound.get("moe", "triton") == "triton")
    settings.setdefault("eos_token_id", spec.eos_token_ids[0] if spec.eos_token_ids else None)
    policies = [settings.get(name, getattr(EngineConfig, name)) for name in ("loop_policy", "skip_policy")]
    settings.setdefault("overlap_windows", default_overlap_windows(model, *policies))
    config = EngineConfig(**settings)
    if "num_pages" not in settings:
        config = dataclasses.replace(config, num_pages=_default_num_pages(model, config, gpu_memory_fraction))
    return config


def runner_class(model, loop_policy: str, skip_policy: str) -> type[ModelRunner]:
    """The runner Engine serves `model` with: DepthwiseRunner for a depth-wise loop, SkipRunner for a
    skip-decode schedule (unless skip_policy is "full"), else the plain ModelRunner."""
    depthwise = loop_policy == "depthwise"
    skipping = skip_schedule(model) is not None and skip_policy != "full"
    if depthwise and skipping:
        raise ValueError("a skip-decode model cannot be served depth-wise (one pass of a shared block stack per "
                         "step cannot skip depths); use loop_policy='lockstep' or skip_policy='full'")
    return DepthwiseRunner if depthwise else SkipRunner if skipping else ModelRunner


def default_overlap_windows(model, loop_policy: str = EngineConfig.loop_policy,
                            skip_policy: str = EngineConfig.skip_policy) -> bool:
    """EngineConfig.overlap_windows when the settings leave it out: on for a model on CUDA that the plain
    ModelRunner serves (the runner that chains decode windows: no depth-wise loop, no skip schedule)."""
    return model.device.type == "cuda" and runner_class(model, loop_policy, skip_policy) is ModelRunner


def _default_num_pages(model, config: EngineConfig, gpu_memory_fraction: float) -> int:
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return max(1, int(free * gpu_memory_fraction) // (model.kv_bytes_per_token() * config.page_size))
    return max(1, min(config.max_num_seqs * config.max_model_len, 1 << 16) // config.page_size)


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    text: str | None = None


@dataclass
class EngineStats:
    steps: int = 0  # engine steps (a decode window is one)
    forward_passes: int = 0  # model steps (a decode window of K steps is K)
    kv_tokens_read: int = 0  # cached tokens the useful forward rows attended to, summed over passes
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    seconds: float = 0.0
    # wall time of step() (scheduling, the model, sampling and update, each step ending in a host sync)
    # by kind: steps that carry any prefill chunk, and decode-only steps (a decode window is one)
    prefill_steps: int = 0
    prefill_step_seconds: float = 0.0
    decode_step_seconds: float = 0.0
    chained_windows: int = 0  # overlap_windows: decode windows launched before the previous one was read

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class Engine:
    """Continuous-batching generation over `model`.

    Settings come either as one `config=EngineConfig(...)`, used as it is, or as EngineConfig
    fields by keyword (page_size=, num_pages=, max_num_seqs=, max_num_batched_tokens=,
    max_model_len=, use_cuda_graphs=, num_decode_steps=, chat=, ...) plus gpu_memory_fraction=,
    the model deciding the rest (`config_for_model`).

    `num_decode_steps` K: when only decodes can run, one step() runs up to K decode steps with
    the sampled tokens fed back on the device and one host sync (a sequence that stops mid-window
    finishes at its end); 1 makes every step a single model step. With `overlap_windows` (the default
    on CUDA for the plain runner, `default_overlap_windows`) the next
    window is launched before this one's tokens are read (Scheduler.chain), so the host's reading,
    update and scheduling overlap the device's work; a sequence that stops on EOS or a stop token
    then runs one window more, whose tokens are dropped.

    `loop_policy` for a layer-tied model: "lockstep" runs every token through all depths in one
    step (the unrolled graph); "depthwise" runs the shared block stack once per step for rows at
    every loop iteration (runtime/loop_runner.py).

    `skip_policy` for a model compiled with skip-decode: "bucket" (rows grouped by depth, one depth
    per group, CUDA graphs per depth) or "mask" (per-row layer masks in one call), both in
    runtime/skip_runner.py; "full" ignores the schedule and runs every layer.
    """

    def __init__(self, model, *, config: EngineConfig | None = None, **settings):
        if config is None:
            config = config_for_model(model, **settings)
        elif settings:
            raise TypeError(f"Engine takes either config or settings by keyword, got both (config and {sorted(settings)})")
        self.model, self.config = model, config
        runner = runner_class(model, config.loop_policy, config.skip_policy)
        depthwise, skipping = runner is DepthwiseRunner, runner is SkipRunner
        if config.overlap_windows and runner is not ModelRunner:
            raise ValueError("EngineConfig.overlap_windows needs the plain model runner: a depth-wise or skip-decode "
                             "model runs no chained decode windows; leave overlap_windows off for it")
        self.runner = runner(model, config)
        self._ahead = None  # (SchedulerOutput, launched window) chained after the window being read
        self.scheduler = Scheduler(config, model.kv_bytes_per_token(), self.runner.looped.loops if depthwise else 1,
                                   pool=self.runner.pool if skipping else None)
        self.stats = EngineStats()

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None) -> Sequence:
        """Queue one request; bad prompts or parameters raise ValueError and leave the engine as it was."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        token_ids = self.model.encode_prompt(prompt, self.config.chat) if isinstance(prompt, str) else list(prompt)
        vocab = self.model.spec.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        seq = Sequence(token_ids, params)
        self.scheduler.add(seq)  # validates length; raises before anything is stored
        self.stats.prompt_tokens += len(token_ids)
        return seq

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Schedule, run the model and sample, update; returns the sequences that finished."""
        start = time.perf_counter()
        if self._ahead is not None:  # a chained window, launched during the previous step
            (out, window), self._ahead = self._ahead, None
        else:
            out, window = self.scheduler.schedule(), None
        sampling = [s.seq for s in out.scheduled if s.sample]
        num_before = [seq.num_output_tokens for seq in sampling]
        if self.config.overlap_windows and out.num_steps > 1:
            # launch the next window before reading this one: the host reads and updates while it runs
            window = window or self.runner.launch_window(out)
            chained = self.scheduler.chain(out)
            if chained is not None:
                self._ahead = (chained, self.runner.launch_chained(chained, window))
                self.stats.chained_windows += 1
            result = self.runner.collect(window)
        else:
            result = self.runner.execute(out)
        finished = self.scheduler.update(out, result)
        self.runner.release(finished)
        self._count(out, [seq.num_output_tokens - n for seq, n in zip(sampling, num_before)],
                    time.perf_counter() - start)
        return finished

    def _count(self, out: SchedulerOutput, new_tokens: list[int], seconds: float) -> None:
        """new_tokens: tokens each sampling entry of `out` kept; seconds: the step's wall time."""
        if out.is_empty:  # nothing ran
            return
        stats = self.stats
        stats.steps += 1
        if out.num_prefill:
            stats.prefill_steps += 1
            stats.prefill_step_seconds += seconds
        else:
            stats.decode_step_seconds += seconds
        stats.preemptions += len(out.preempted)
        stats.generated_tokens += sum(new_tokens)
        if out.num_steps == 1:
            stats.forward_passes += 1
            stats.kv_tokens_read += sum(s.end_position for s in out.scheduled)
            return
        stats.forward_passes += out.num_steps
        for s, r in zip(out.scheduled, new_tokens):  # r kept steps attend to start+1, start+2, ... tokens
            stats.kv_tokens_read += r * s.end_position + r * (r - 1) // 2

    # -- batch APIs -------------------------------------------------------------------------------
    def stream(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
               progress=None) -> Iterator[RequestOutput]:
        """Yield each request's output as soon as it finishes (in finishing order)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        index = {s.seq_id: i for i, s in enumerate(seqs)}
        start = time.perf_counter()
        while self.scheduler.has_unfinished() or self._ahead is not None:  # (a chained window still to read)
            finished = self.step()
            for seq in finished:
                if progress is not None:
                    progress(seq)
                yield self._output(index[seq.seq_id], seq)
        self.stats.seconds += time.perf_counter() - start

    def generate(self, prompts: list, params=None, progress=None) -> list[RequestOutput]:
        """Outputs in prompt order."""
        results = sorted(self.stream(prompts, params, progress), key=lambda r: r.request_id)
        return results

    def _output(self, request_id: int, seq: Sequence) -> RequestOutput:
        tokens = seq.output_token_ids
        text = self.model.tokenizer.decode(tokens) if self.model.tokenizer is not None else None
        return RequestOutput(request_id, seq.prompt_token_ids, tokens, seq.finish_reason, text)
