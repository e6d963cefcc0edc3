"""SkipDecode serving: every token runs the depth the model's schedule gives its generated position
(ir/skip.py), while continuous batching puts sequences at different positions in one step.

A prompt token runs all N layers; the token fed back at generated position t runs the warm-up layers
and the top a(t). Two policies (EngineConfig.skip_policy):

  bucket  rows are grouped by depth and each group runs one depth (the paper's single exit point
          per batch, per group): one call of embed, the group's layers and head per distinct depth
          in the step. Pure-decode groups replay a CUDA graph captured per (depth, batch bucket),
          lazily, on first use. A chunk whose tokens have several depths (a preempted sequence
          recomputing its generated tokens) runs as under `mask`.
  mask    one call per step over all rows: each layer runs on the rows whose depth includes it,
          gathered with their own attention metadata; rows that skip it keep their hidden state and
          write no KV there (SkipModel.forward). Eager.

Decode windows are supported: positions advance on the host (known in advance), the sampled tokens
are fed back on the device, and the host syncs once per window; a row past its last step recomputes
its last position into the scratch page. Both policies give the reference decoder's tokens
(ir/skip.py skip_greedy) under the same schedule.

KV pages per layer group (runtime/skip_pages.py): the runner's `pool`, which the engine gives the
scheduler, holds the always-run layers' pages plus, per group of skippable layers, pages only for
the positions those layers run (prompt + the first T generated tokens); each layer's cache tensor
has its group's pool size (+1 scratch page), `EngineConfig.skip_kv_fraction` of the main pool's.
Each layer reads and writes through its group's page table and slots. `kv_memory_saving()` is the
share of KV bytes the layered cache saves against one pool of every layer; `kv_saving()` counts, per
layer, the KV slots tokens wrote against the slots a shared pool would reserve for them.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fxforge.ir.model import BatchInputs
from fxforge.ir.skip import SkipModel

from .config import EngineConfig
from .model_runner import ModelRunner
from .scheduler import RunnerOutput, SchedulerOutput
from .skip_pages import LayeredPagePool, layer_groups


@dataclass
class _Rows:
    """One model step's rows on the host: per entry its chunk, start, depth(s), slots' page or scratch."""

    index: np.ndarray  # entry index in out.scheduled, per entry of this step
    starts: np.ndarray  # cached tokens before the chunk
    counts: np.ndarray  # tokens in the chunk
    scratch: np.ndarray  # bool: the row is past its window and writes to the scratch page
    depths: np.ndarray  # per token
    sample: np.ndarray  # bool per entry: its last token's logits are wanted


class SkipRunner(ModelRunner):
    """ModelRunner that runs each token at its SkipDecode depth, under the `bucket` or `mask` policy."""

    def __init__(self, model, config: EngineConfig):
        self.skip = SkipModel(model)
        if self.skip.schedule is None:
            raise ValueError("skip-decode serving needs a model compiled with the skip-decode pass")
        self.depth_graphs: dict[tuple[int, int], tuple] = {}
        schedule, layers = self.skip.schedule, model.spec.num_layers
        groups = layer_groups(layers, schedule.warmup, schedule.top_layers, config.num_pages, config.skip_kv_fraction)
        self.pool = LayeredPagePool(config, model.kv_bytes_per_token(), groups)
        self.group_of_layer = [None] * layers  # None: an always-run layer (the main pool's pages)
        for index, group in enumerate(groups):
            for layer in group.layers:
                self.group_of_layer[layer] = index
        super().__init__(model, config)
        self.use_graphs = config.use_cuda_graphs and self.device.type == "cuda"
        layers = model.spec.num_layers
        self.kv_slots_written = np.zeros(layers, dtype=np.int64)  # per layer: KV slots tokens wrote
        self.kv_slots_reserved = 0  # per layer: slots of every token that got KV (all layers share pages)

    def _new_kv_cache(self) -> list[torch.Tensor]:
        """Each layer's cache sized to its pool: the main pool's pages, or its group's (+1 scratch page)."""
        pages = [self._scratch(layer) + 1 for layer in range(self.model.spec.num_layers)]
        return self.model.new_kv_cache(pages, self.config.page_size, self.device, self.v_layout)

    def _scratch(self, layer: int) -> int:
        """The scratch page of a layer's cache: the page after its pool's."""
        group = self.group_of_layer[layer]
        return self.config.num_pages if group is None else self.pool.groups[group].num_pages

    def kv_memory_saving(self) -> float:
        """Share of KV cache bytes the per-group pools save against every layer holding the main pool's pages."""
        pages = [self._scratch(layer) + 1 for layer in range(len(self.group_of_layer))]
        return 1.0 - sum(pages) / (len(pages) * (self.config.num_pages + 1))

    def _capture_graphs(self) -> None:
        """Nothing up front: graphs are captured per (depth, batch bucket) when a decode group first needs one."""

    def kv_saving(self) -> float:
        """Fraction of the KV slots reserved so far that no layer wrote (what per-layer pages would free)."""
        reserved = self.kv_slots_reserved * len(self.kv_slots_written)
        return 1.0 - self.kv_slots_written.sum() / reserved if reserved else 0.0

    # -- one engine step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if out.is_empty:
            return RunnerOutput()
        sample_fn = self._sampler([s.seq for s in out.scheduled if s.sample])
        ids, produced = None, []
        for step in range(out.num_steps):
            ids = sample_fn(self._step_logits(out, step, ids))
            produced.append(ids)
        columns = torch.stack(produced, dim=1).tolist()
        sampling = [s for s in out.scheduled if s.sample]
        return RunnerOutput([column[: s.num_steps] for s, column in zip(sampling, columns)])

    def _rows(self, out: SchedulerOutput, step: int) -> _Rows:
        scheduled = out.scheduled
        n = len(scheduled)
        done = np.fromiter((step >= s.num_steps for s in scheduled), dtype=bool, count=n)
        moved = np.fromiter((min(step, s.num_steps - 1) for s in scheduled), dtype=np.int64, count=n)
        starts = np.fromiter((s.start_position for s in scheduled), dtype=np.int64, count=n) + moved
        counts = np.fromiter((s.num_tokens for s in scheduled), dtype=np.int64, count=n)
        prompt = np.fromiter((s.seq.num_prompt_tokens for s in scheduled), dtype=np.int64, count=n)
        seq_index = np.repeat(np.arange(n), counts)
        positions = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + starts[seq_index]
        depths = self.skip.schedule.token_depths(positions - prompt[seq_index], 0)  # prompt tokens: all layers
        sample = np.fromiter((s.sample for s in scheduled), dtype=bool, count=n)
        return _Rows(np.arange(n), starts, counts, done, depths, sample)

    def _step_logits(self, out: SchedulerOutput, step: int, fed_back: torch.Tensor | None) -> torch.Tensor:
        """Logits [entries that sample, V] of one model step (step > 0: a window step, ids fed back)."""
        rows = self._rows(out, step)
        self._count_kv(rows)
        if self.config.skip_policy == "mask":
            return self._run(out, rows, fed_back, None)
        bounds = np.concatenate([[0], np.cumsum(rows.counts)])
        chunk_depths = [rows.depths[b:e] for b, e in zip(bounds[:-1], bounds[1:])]
        uniform = np.array([d.min() == d.max() for d in chunk_depths])
        key = np.where(uniform, np.array([d[0] for d in chunk_depths]), -1)  # -1: mixed depths, run masked
        logits = [None] * int(rows.sample.sum())
        sample_order = np.cumsum(rows.sample) - 1
        for depth in sorted(set(key.tolist()), reverse=True):
            group = np.flatnonzero(key == depth)
            part = self._run(out, self._subset(rows, group), fed_back, None if depth < 0 else depth)
            for row, entry in enumerate(group[rows.sample[group]]):
                logits[sample_order[entry]] = part[row]
        return torch.stack(logits) if logits else torch.empty(0, self.model.spec.vocab_size, device=self.device)

    @staticmethod
    def _subset(rows: _Rows, entries: np.ndarray) -> _Rows:
        bounds = np.concatenate([[0], np.cumsum(rows.counts)])
        tokens = np.concatenate([np.arange(bounds[e], bounds[e + 1]) for e in entries])
        return _Rows(rows.index[entries], rows.starts[entries], rows.counts[entries], rows.scratch[entries],
                     rows.depths[tokens], rows.sample[entries])

    def _count_kv(self, rows: _Rows) -> None:
        live = np.repeat(~rows.scratch, rows.counts)
        depths = rows.depths[live]
        self.kv_slots_reserved += len(depths)
        for layer in range(len(self.kv_slots_written)):
            self.kv_slots_written[layer] += int(self.skip._runs(layer, depths).sum())

    # -- running a set of rows ---------------------------------------------------------------------------
    def _run(self, out: SchedulerOutput, rows: _Rows, fed_back: torch.Tensor | None, depth: int | None) -> torch.Tensor:
        """Logits of rows' sampling entries: at one `depth` for all (graph replay when it can), or per token."""
        batch, groups = self._inputs(out, rows, fed_back)
        layer_batches = [batch if g is None else groups[g] for g in self.group_of_layer]
        if depth is None:
            return self.skip.forward(batch, self.kv_cache, rows.depths, rows.starts, rows.counts, layer_batches)
        decode = bool((rows.counts == 1).all() and rows.sample.all())
        n = len(rows.index)
        if self.use_graphs and decode and n <= self._buckets()[-1]:
            try:
                return self._replay_depth(batch, groups, n, depth)
            except RuntimeError as exc:  # an op that syncs with the host cannot be captured: run eagerly
                self.use_graphs, self.graph_error = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
                torch.cuda.synchronize()
        return self.skip.forward_depth(batch, self.kv_cache, depth, layer_batches)

    def _inputs(self, out: SchedulerOutput, rows: _Rows, fed_back: torch.Tensor | None):
        """Flat inputs of `rows` (a step's entries or a group of them), and per layer group the same with
        that group's slots and page table; window steps read their ids from `fed_back` (the last step's
        tokens, one per entry of out.scheduled)."""
        scheduled, n = out.scheduled, len(rows.index)
        seqs = [scheduled[e].seq for e in rows.index]
        query_start = np.concatenate([[0], np.cumsum(rows.counts)])
        seq_index = np.repeat(np.arange(n), rows.counts)
        positions = np.arange(query_start[-1]) - query_start[:-1][seq_index] + rows.starts[seq_index]
        scratch_rows = np.repeat(rows.scratch, rows.counts)
        to = self._to_device
        table, slots = self._paged([s.page_ids for s in seqs], positions, seq_index, scratch_rows, self.scratch_page)
        if fed_back is None:
            ids = to(np.concatenate([s.token_slice(a, a + c) for s, a, c in zip(seqs, rows.starts, rows.counts)]))
        else:
            ids = fed_back.index_select(0, to(rows.index))
        logits_indices = (query_start[1:] - 1)[rows.sample]
        batch = BatchInputs(ids, to(positions), to(slots), to(table, torch.int32), to(query_start, torch.int32),
                            to(rows.starts + rows.counts, torch.int32), to(logits_indices))
        prompts = np.fromiter((s.num_prompt_tokens for s in seqs), dtype=np.int64, count=n)[seq_index]
        groups = []
        for index, group in enumerate(self.pool.groups):
            beyond = scratch_rows | (positions >= prompts + group.horizon)  # no KV of this group there
            pages = [self.pool.group_pages(s, index) for s in seqs]
            table, slots = self._paged(pages, positions, seq_index, beyond, group.num_pages)
            groups.append(dataclasses.replace(batch, slot_mapping=to(slots), page_table=to(table, torch.int32)))
        return batch, groups

    def _paged(self, page_lists: list[list[int]], positions: np.ndarray, seq_index: np.ndarray, scratch: np.ndarray,
               scratch_page: int) -> tuple[np.ndarray, np.ndarray]:
        """(page table [rows, width], cache slot per token) over `page_lists`; tokens marked `scratch` (and
        page-table padding) point at the scratch page."""
        ps = self.config.page_size
        table = np.full((len(page_lists), max(1, max(map(len, page_lists)))), scratch_page, dtype=np.int64)
        for row, pages in enumerate(page_lists):
            table[row, :len(pages)] = pages
        page_index = np.where(scratch, 0, positions // ps)
        slots = np.where(scratch, scratch_page * ps, table[seq_index, page_index] * ps + positions % ps)
        return table, slots

    # -- CUDA graphs per depth -----------------------------------------------------------------------------
    def _replay_depth(self, batch: BatchInputs, groups: list[BatchInputs], n: int, depth: int) -> torch.Tensor:
        """Replay (capturing on first use) the graph of `depth` at the smallest batch bucket holding n rows."""
        buckets = self._buckets()
        bucket = buckets[bisect.bisect_left(buckets, n)]
        if (depth, bucket) not in self.depth_graphs:
            self.depth_graphs[(depth, bucket)] = self._capture_depth(depth, bucket)
        graph, static, static_groups, logits = self.depth_graphs[(depth, bucket)]
        ps = self.config.page_size
        static.input_ids[:n].copy_(batch.input_ids)
        static.positions[:n].copy_(batch.positions)
        static.seq_lens[:n].copy_(batch.seq_lens)
        static.seq_lens[n:].fill_(1)
        scratch_pages = [self.scratch_page] + [g.num_pages for g in self.pool.groups]
        for source, target, scratch in zip([batch, *groups], [static, *static_groups], scratch_pages):
            target.slot_mapping[:n].copy_(source.slot_mapping)
            target.slot_mapping[n:].fill_(scratch * ps)
            target.page_table[:n, :source.page_table.shape[1]].copy_(source.page_table)
            target.page_table[:n, source.page_table.shape[1]:].fill_(scratch)
            target.page_table[n:].fill_(scratch)
        graph.replay()
        return logits[:n]

    def _capture_depth(self, depth: int, bucket: int) -> tuple:
        static = self._static_inputs(bucket)
        ps = self.config.page_size
        static_groups = [dataclasses.replace(static, page_table=torch.full_like(static.page_table, g.num_pages),
                                             slot_mapping=torch.full_like(static.slot_mapping, g.num_pages * ps))
                         for g in self.pool.groups]
        layer_batches = [static if g is None else static_groups[g] for g in self.group_of_layer]
        forward: Callable = lambda: self.skip.forward_depth(static, self.kv_cache, depth, layer_batches)  # noqa: E731
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compilation happens outside capture
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        if not hasattr(self, "_graph_pool"):
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = forward()
        return graph, static, static_groups, logits
