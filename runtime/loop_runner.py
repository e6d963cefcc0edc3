"""Depth-wise batching for layer-tied models: each step runs the shared block stack once, over rows
at every loop iteration (runtime/scheduler.py says which chunk is at which iteration).

The stack is the graph's first K depths (ir/recursive.py DepthwiseModel). Block b keeps one KV
cache for all L loops, keyed by depth through its pages: loop j owns pages
[j * P, (j + 1) * P) with P = num_pages + 1, so a row of loop j writes and reads its own depth's KV
at its sequence's page ids offset by j * P. Rows are ordered by loop iteration, and `loop_starts`
bounds them, so each LoRA node applies depth j * K + b's adapter to the rows of loop j in one
batched call (kernels/lora.py). A chunk's hidden state stays on the device between its iterations.
"""

from __future__ import annotations

import numpy as np
import torch

from fxforge.ir.recursive import DepthwiseModel

from .config import EngineConfig
from .model_runner import ModelRunner
from .scheduler import RunnerOutput, ScheduledSeq, SchedulerOutput
from .sequence import Sequence


class DepthwiseRunner(ModelRunner):
    """ModelRunner whose step is one pass of the loop stack for rows at mixed loop iterations."""

    def __init__(self, model, config: EngineConfig):
        self.looped = DepthwiseModel(model)
        super().__init__(model, config)
        self.pages_per_loop = config.num_pages + 1
        self.hidden: dict[int, torch.Tensor] = {}  # seq_id -> hidden rows of its chunk inside the stack

    def _new_kv_cache(self) -> list[torch.Tensor]:
        return self.looped.new_kv_cache(self.config.num_pages + 1, self.config.page_size, self.device, self.v_layout)

    def _capture_graphs(self) -> None:
        raise RuntimeError("depth-wise batching runs eagerly: its steps are not captured as CUDA graphs yet")

    def release(self, finished: list[Sequence]) -> None:
        super().release(finished)
        for seq in finished:
            self.hidden.pop(seq.seq_id, None)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """One pass of the stack; samples the chunks that leave it."""
        for seq in out.preempted:
            self.hidden.pop(seq.seq_id, None)
        if out.is_empty:
            return RunnerOutput()
        entries = sorted(out.scheduled, key=lambda s: s.loop)  # stable: rows grouped by loop iteration
        batch, _ = self.prepare(SchedulerOutput(scheduled=entries))
        self._offset_by_loop(batch, entries)
        hidden = self.looped.loop(self._hidden_in(batch, entries), batch, self._loop_starts(entries), self.kv_cache)
        self._keep(hidden, entries)
        sampling = [s for s in entries if s.sample]
        if not sampling:
            return RunnerOutput()
        tokens = self._sampler([s.seq for s in sampling])(self.looped.head(hidden, batch.logits_indices)).tolist()
        drawn = {s.seq.seq_id: token for s, token in zip(sampling, tokens)}
        return RunnerOutput([[drawn[s.seq.seq_id]] for s in out.scheduled if s.sample])

    def _offset_by_loop(self, batch, entries: list[ScheduledSeq]) -> None:
        """Slots and page tables of loop j's rows point at loop j's pages (in place)."""
        loops = np.fromiter((s.loop for s in entries), dtype=np.int64, count=len(entries))
        counts = np.fromiter((s.num_tokens for s in entries), dtype=np.int64, count=len(entries))
        page_offset = loops * self.pages_per_loop
        batch.slot_mapping.add_(self._to_device(np.repeat(page_offset, counts) * self.config.page_size))
        batch.page_table.add_(self._to_device(page_offset[:, None], torch.int32))

    def _loop_starts(self, entries: list[ScheduledSeq]) -> torch.Tensor:
        """[L+1] int32: loop j's rows are [starts[j], starts[j+1])."""
        rows = np.zeros(self.looped.loops + 1, dtype=np.int64)
        for s in entries:
            rows[s.loop + 1] += s.num_tokens
        return self._to_device(np.cumsum(rows), torch.int32)

    def _hidden_in(self, batch, entries: list[ScheduledSeq]) -> torch.Tensor:
        """Embeddings for chunks entering the stack, the kept hidden rows for chunks inside it."""
        embedded = self.looped.embed(batch.input_ids)
        pieces, begin = [], 0
        for s in entries:
            pieces.append(embedded[begin:begin + s.num_tokens] if s.loop == 0 else self.hidden[s.seq.seq_id])
            begin += s.num_tokens
        return torch.cat(pieces)

    def _keep(self, hidden: torch.Tensor, entries: list[ScheduledSeq]) -> None:
        begin = 0
        for s in entries:
            if s.final_loop:
                self.hidden.pop(s.seq.seq_id, None)
            else:
                self.hidden[s.seq.seq_id] = hidden[begin:begin + s.num_tokens]
            begin += s.num_tokens
