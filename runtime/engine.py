"""Engine: continuous batching over a model or artifact. `step()` = schedule, run, sample, update.

    engine = Engine(fxforge.load("smollm2-135m"))
    outputs = engine.generate(["What is 2+2?"], SamplingParams(max_new_tokens=32))
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fxforge.runtime.block_manager import BlockManager
from fxforge.runtime.model_runner import ModelRunner, RunnerConfig
from fxforge.runtime.sampling import make_generator, sample
from fxforge.runtime.scheduler import Scheduler, SchedulerConfig
from fxforge.runtime.sequence import SamplingParams, Sequence


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

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class Engine:
    """Continuous-batching generation. KV pool size: `num_pages`, or a fraction of free GPU memory.

    `num_decode_steps` K: when only decodes can run, one step() runs up to K decode steps with
    the sampled tokens fed back on the device and one host sync (a sequence that stops mid-window
    finishes at its end); 1 makes every step a single model step.
    """

    def __init__(self, model, *, page_size: int = 16, num_pages: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, max_model_len: int | None = None,
                 use_cuda_graphs: bool | None = None, gpu_memory_fraction: float = 0.5, chat: bool = True,
                 num_decode_steps: int = 8):
        self.model, self.chat = model, chat
        max_model_len = max_model_len or min(model.spec.max_position_embeddings, 4096)
        num_pages = num_pages or self._default_pages(page_size, max_num_seqs, max_model_len, gpu_memory_fraction)
        if use_cuda_graphs is None:
            use_cuda_graphs = model.device.type == "cuda" and model.kernel_bindings().get("attention") == "triton"
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            max_model_len=max_model_len, page_size=page_size,
                            num_decode_steps=num_decode_steps),
            BlockManager(num_pages, page_size, model.kv_bytes_per_token()))
        self.runner = ModelRunner(model, RunnerConfig(num_pages, page_size, max_model_len, max_num_seqs,
                                                      use_cuda_graphs))
        self.eos_token_id = model.spec.eos_token_ids[0] if model.spec.eos_token_ids else None
        self.generators: dict[int, torch.Generator] = {}
        self.stats = EngineStats()

    def _default_pages(self, page_size, max_num_seqs, max_model_len, fraction) -> int:
        bytes_per_page = self.model.kv_bytes_per_token() * page_size
        if self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            return max(1, int(free * fraction) // bytes_per_page)
        return max(1, min(max_num_seqs * max_model_len, 1 << 16) // page_size)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None) -> Sequence:
        """Queue one request; bad prompts or parameters raise ValueError and leave the engine as it was."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        token_ids = self.model.encode_prompt(prompt, self.chat) if isinstance(prompt, str) else list(prompt)
        vocab = self.model.spec.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        seq = Sequence(token_ids, params)
        self.scheduler.add(seq)  # validates length; raises before anything is stored
        if params.seed is not None and not params.is_greedy:
            self.generators[seq.seq_id] = make_generator(params.seed, self.model.device)
        self.stats.prompt_tokens += len(token_ids)
        return seq

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Schedule, run the model, sample, update; returns the sequences that finished."""
        out = self.scheduler.schedule()
        if out.is_empty:
            self.scheduler.update(out, [], self.eos_token_id)
            return []
        to_sample = [s.seq for s in out.scheduled if s.sample]
        params = [s.sampling_params for s in to_sample]
        generators = [self.generators.get(s.seq_id) for s in to_sample]
        before = [s.num_output_tokens for s in to_sample]
        if out.num_steps > 1:
            if all(p.is_greedy for p in params):
                def sample_fn(logits):
                    return logits.argmax(dim=-1)
            else:
                def sample_fn(logits):
                    return sample(logits, params, generators)
            tokens = self.runner.run_window(out, sample_fn)
        else:
            tokens = sample(self.runner.run(out), params, generators).tolist()
        finished = self.scheduler.update(out, tokens, self.eos_token_id)
        self._count(out, [s.num_output_tokens - b for s, b in zip(to_sample, before)])
        for seq in finished:
            self.generators.pop(seq.seq_id, None)
        return finished

    def _count(self, out, new_tokens: list[int]) -> None:
        """new_tokens: tokens each sampling entry of `out` kept."""
        stats = self.stats
        stats.steps += 1
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
        while self.scheduler.has_unfinished():
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
