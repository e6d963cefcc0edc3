"""Model runner: owns the device tensors (paged KV cache, static graph inputs), runs one engine
step and samples it: `execute(SchedulerOutput) -> RunnerOutput`.

Batch metadata is built with vectorized numpy from the scheduler's output and copied to the device
once per tensor. Pure-decode steps can replay CUDA graphs captured per batch-size bucket: padded
rows decode a dummy token into a reserved scratch page, so a replay never touches real KV.

Decode windows: the inputs of the first step are prepared once; after each step the sampled
tokens become the next input ids and positions, sequence lengths and cache slots advance on the
device, so the host only enqueues work and syncs once, to read the window's tokens. A row that has
taken its last step (its `num_steps`) stays where it is and writes to the scratch page. A window is
launched (`launch_window`) and read (`collect`) apart: with EngineConfig.overlap_windows the engine
launches the next window (`launch_chained`, continuing from this one's inputs on the device) before
it reads this one, so the host's reading, update and scheduling overlap the device's work.

Sampling happens here, on the device, with one generator per seeded sequence: made from
`SamplingParams.seed` on the sequence's first sample, dropped when the engine `release`s it.

MoE models: after every model step (eager or replayed) `expert_passes` [MoE layers, E] counts, on
the device, the steps in which each expert received tokens (from Model.expert_counts, which the
fxforge::moe ops fill), so the experts' weights a run had to read are known without a host sync."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable

import numpy as np
import torch

import torch.fx as fx

from fxforge.ir.model import BatchInputs
from fxforge.ir.ops import direct_module

from .config import EngineConfig
from .sampling import make_generator, sample
from .scheduler import RunnerOutput, SchedulerOutput
from .sequence import Sequence

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)


class ModelRunner:
    """Runs scheduled steps of `model` over a paged KV cache of `config.num_pages` (+1 scratch) pages
    and samples their tokens; keeps one generator per seeded sequence until `release`."""

    def __init__(self, model, config: EngineConfig):
        self.model, self.config = model, config
        # eager steps (those carrying prefill, and all steps without CUDA graphs) skip torch.library's
        # dispatch: the graph's custom ops call their bound implementations directly (ir/ops.py)
        direct = config.direct_dispatch and isinstance(model.module, fx.GraphModule)
        self._eager = direct_module(model.module) if direct else model.module
        self.device = model.device
        self.scratch_page = config.num_pages  # the reserved page for padded graph rows
        self.v_layout = model.resolve_v_layout(config.v_layout, self.device)  # "rows" or "channels"
        self.kv_cache = self._new_kv_cache()
        self.max_pages_per_seq = -(-config.max_model_len // config.page_size)
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> its seeded generator
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, BatchInputs, torch.Tensor]] = {}
        self.graph_error: str | None = None  # why decode runs eagerly although graphs were asked for
        counts = model.expert_counts()
        self.expert_passes = None if counts is None else torch.zeros(counts.shape, dtype=torch.int64, device=self.device)
        if config.use_cuda_graphs:
            try:
                self._capture_graphs()
            except RuntimeError as exc:  # an op that syncs with the host cannot be captured
                self.graphs.clear()
                self.graph_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                torch.cuda.synchronize()

    def _new_kv_cache(self) -> list[torch.Tensor]:
        return self.model.new_kv_cache(self.config.num_pages + 1, self.config.page_size, self.device, self.v_layout)

    # -- one engine step --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run `out` (one model step, or a decode window of out.num_steps) and sample each entry that samples."""
        if out.is_empty:
            return RunnerOutput()
        if out.num_steps == 1:
            sample_fn = self._sampler([s.seq for s in out.scheduled if s.sample])
            return RunnerOutput([[token] for token in sample_fn(self._logits(out)).tolist()])
        return self.collect(self.launch_window(out))

    # -- decode windows, launched and read apart (EngineConfig.overlap_windows) --------------------
    @torch.inference_mode()
    def launch_window(self, out: SchedulerOutput) -> "_Window":
        """Enqueue the decode window `out` on the device; its tokens are read by collect()."""
        sample_fn = self._sampler([s.seq for s in out.scheduled])
        batch, n = self.prepare(out)
        steps = self._to_device(np.fromiter((s.num_steps for s in out.scheduled), dtype=np.int64, count=n))
        graph = logits_out = None
        if self.graphs and n <= max(self.graphs):
            graph, batch, logits_out = self._load_static(batch, n)
            left = torch.zeros(batch.input_ids.shape[0], dtype=torch.int64, device=self.device)
            left[:n] = steps
        else:
            left = steps
        window = _Window(out, batch, n, left, graph, logits_out, sample_fn)
        self._run_steps(window, out.num_steps)
        return window

    @torch.inference_mode()
    def launch_chained(self, out: SchedulerOutput, previous: "_Window") -> "_Window":
        """Enqueue `out`, the window Scheduler.chain scheduled after `previous`, straight after it on the
        device: its inputs continue from `previous`'s on the device (its last tokens fed back, positions
        one on), with the page table re-read for the pages chain() added. Rows of sequences chain() left
        out (stopped by length, or stopped before `previous`) are dropped: the rows kept move up, in order.
        No host sync: the host reads `previous` while this one runs."""
        batch, n = previous.batch, previous.n
        tokens, sample_fn = previous.tokens[-1], previous.sample_fn
        table = self._to_device(_page_table(out.scheduled), torch.int32)
        rows = {id(s.seq): i for i, s in enumerate(previous.out.scheduled)}
        kept = [rows[id(s.seq)] for s in out.scheduled]
        if kept != list(range(n)):
            batch, tokens = self._keep_rows(previous, kept, table)
            n, sample_fn = len(kept), self._sampler([s.seq for s in out.scheduled])
        if previous.graph is not None:  # the static table is max_pages_per_seq wide
            batch.page_table[:n, : table.shape[1]].copy_(table)
        else:  # the eager batch's table is as wide as its pages were
            batch = BatchInputs(**{**vars(batch), "page_table": table})
        left = torch.zeros(batch.input_ids.shape[0], dtype=torch.int64, device=self.device)
        left[:n] = self._to_device(np.fromiter((s.num_steps + 1 for s in out.scheduled), dtype=np.int64, count=n))
        self._advance(batch, tokens, left)  # the last tokens in; `left` now the steps to take
        window = _Window(out, batch, n, left, previous.graph, previous.logits_out, sample_fn)
        self._run_steps(window, out.num_steps)
        return window

    def _keep_rows(self, previous: "_Window", kept: list[int], table: torch.Tensor) -> tuple[BatchInputs, torch.Tensor]:
        """`previous`'s device inputs and last tokens with only the rows `kept` (indices, in order), moved
        up to rows 0..len(kept)-1: in place in a graph's static inputs (the rows below become padding, as
        _load_static leaves them), else a new eager batch of len(kept) rows over `table`. Only what
        _advance does not rewrite moves: positions and sequence lengths (input ids and slots it writes;
        the kept rows' page table is `table`)."""
        batch, n, m = previous.batch, previous.n, len(kept)
        index = self._to_device(np.asarray(kept, dtype=np.int64))
        tokens = previous.tokens[-1][index]
        if previous.graph is None:
            arange = torch.arange(m + 1, device=self.device)
            return BatchInputs(input_ids=batch.input_ids[:m].clone(), positions=batch.positions[index],
                               slot_mapping=batch.slot_mapping[:m].clone(), page_table=table,
                               query_start=arange.to(torch.int32), seq_lens=batch.seq_lens[index],
                               logits_indices=arange[:m]), tokens
        for t in (batch.positions, batch.seq_lens):
            t[:m] = t[index]  # (the index reads a copy first)
        batch.page_table[m:n].fill_(self.scratch_page)
        batch.seq_lens[m:n].fill_(1)
        return batch, tokens

    def collect(self, window: "_Window") -> RunnerOutput:
        """The tokens of a launched window (the one host sync). A row that has taken its num_steps
        steps stays put; what it samples after them is padding, dropped here."""
        columns = window.host_tokens()
        return RunnerOutput([column[: s.num_steps] for s, column in zip(window.out.scheduled, columns)])

    def release(self, finished: list[Sequence]) -> None:
        """Forget the generators of sequences that will not sample again."""
        for seq in finished:
            self.generators.pop(seq.seq_id, None)

    def _sampler(self, seqs: list[Sequence]) -> Callable[[torch.Tensor], torch.Tensor]:
        """logits [len(seqs), V] -> their next tokens [len(seqs)], on the device."""
        params = [seq.sampling_params for seq in seqs]
        if all(p.is_greedy for p in params):
            return lambda logits: logits.argmax(dim=-1)
        generators = [self._generator(seq) for seq in seqs]
        return lambda logits: sample(logits, params, generators)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        """`seq`'s own generator, made from its seed on first use, so the seed fixes its whole stream."""
        params = seq.sampling_params
        if params.seed is None or params.is_greedy:
            return None
        if seq.seq_id not in self.generators:
            self.generators[seq.seq_id] = make_generator(params.seed, self.device)
        return self.generators[seq.seq_id]

    # -- inputs -----------------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> tuple[BatchInputs, int]:
        """Flat inputs for the scheduled sequences; returns (inputs, number of logit rows)."""
        scheduled = out.scheduled
        n_seq = len(scheduled)
        counts = np.fromiter((s.num_tokens for s in scheduled), dtype=np.int64, count=n_seq)
        starts = np.fromiter((s.start_position for s in scheduled), dtype=np.int64, count=n_seq)
        query_start = np.zeros(n_seq + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        total = int(query_start[-1])
        ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in scheduled), dtype=np.int64, count=total)
        seq_index = np.repeat(np.arange(n_seq), counts)
        positions = np.arange(total) - query_start[:-1][seq_index] + starts[seq_index]
        table = _page_table(scheduled)
        page_size = self.config.page_size
        slots = table[seq_index, positions // page_size] * page_size + positions % page_size
        sample_rows = np.fromiter((s.sample for s in scheduled), dtype=bool, count=n_seq)
        logits_indices = (query_start[1:] - 1)[sample_rows]
        to = self._to_device
        batch = BatchInputs(to(ids), to(positions), to(slots), to(table, torch.int32), to(query_start, torch.int32),
                            to(starts + counts, torch.int32), to(logits_indices))
        return batch, len(logits_indices)

    def _to_device(self, array: np.ndarray, dtype=torch.int64) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    # -- running ----------------------------------------------------------------------------------
    def _logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits [rows that sample, V] for one model step."""
        batch, _ = self.prepare(out)
        is_decode = out.num_prefill == 0 and all(s.sample for s in out.scheduled)
        if self.graphs and is_decode and len(out.scheduled) <= max(self.graphs):
            logits = self._replay(batch, len(out.scheduled))
        else:
            logits = self._eager(*batch.args(), self.kv_cache)
        self._tally_experts()
        return logits

    def _tally_experts(self) -> None:
        """Count the experts the last model step routed tokens to (device ops only)."""
        if self.expert_passes is not None:
            self.expert_passes += self.model.expert_counts() > 0

    def _run_steps(self, window: "_Window", k: int) -> None:
        """k decode steps of `window`, each step's sampled tokens fed back on the device."""
        batch, n = window.batch, window.n
        for i in range(k):
            if window.graph is not None:
                window.graph.replay()
                logits = window.logits_out[:n]
            else:
                logits = self._eager(*batch.args(), self.kv_cache)
            self._tally_experts()
            tokens = window.sample_fn(logits)
            window.tokens.append(tokens)
            if i + 1 < k:
                self._advance(batch, tokens, window.left)
        window.start_copy(self.device)

    def _advance(self, batch: BatchInputs, tokens: torch.Tensor, left: torch.Tensor) -> None:
        """Next decode step's inputs, in place: rows with steps left move one position on."""
        ps = self.config.page_size
        left.sub_(1)
        active = left > 0
        batch.input_ids[: tokens.shape[0]].copy_(tokens)
        batch.positions.add_(active)
        batch.seq_lens.add_(active)
        page = batch.page_table.gather(1, (batch.positions // ps)[:, None])[:, 0].to(torch.int64)
        slots = page * ps + batch.positions % ps
        batch.slot_mapping.copy_(torch.where(active, slots, self.scratch_page * ps))

    # -- CUDA graphs for decode -------------------------------------------------------------------
    def _buckets(self) -> list[int]:
        """Batch sizes with a decode graph: GRAPH_BATCH_SIZES below max_num_seqs, and max_num_seqs itself,
        so a full batch never runs eagerly (with 15 or 39 sequences, a capacity the KV memory sets, the
        largest bucket below was 8 or 32 and every decode step of a full batch ran eagerly)."""
        size = self.config.max_num_seqs
        return [b for b in GRAPH_BATCH_SIZES if b < size] + [size]

    def _static_inputs(self, batch_size: int) -> BatchInputs:
        dev, scratch, ps = self.device, self.scratch_page, self.config.page_size

        def full(shape, value, dtype):
            return torch.full(shape, value, dtype=dtype, device=dev)

        return BatchInputs(
            input_ids=full((batch_size,), 0, torch.int64),
            positions=full((batch_size,), 0, torch.int64),
            slot_mapping=full((batch_size,), scratch * ps, torch.int64),
            page_table=full((batch_size, self.max_pages_per_seq), scratch, torch.int32),
            query_start=torch.arange(batch_size + 1, dtype=torch.int32, device=dev),
            seq_lens=full((batch_size,), 1, torch.int32),
            logits_indices=torch.arange(batch_size, dtype=torch.int64, device=dev),
        )

    def _capture_graphs(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        with torch.inference_mode():
            for batch_size in reversed(self._buckets()):
                static = self._static_inputs(batch_size)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # warm-up: Triton compilation and autotuning happen outside capture
                        self.model.forward(static, self.kv_cache)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model.forward(static, self.kv_cache)
                self.graphs[batch_size] = (graph, static, logits)
        torch.cuda.synchronize()

    def _replay(self, batch: BatchInputs, n: int) -> torch.Tensor:
        graph, _, logits = self._load_static(batch, n)
        graph.replay()
        return logits[:n]

    def _load_static(self, batch: BatchInputs, n: int) -> tuple[torch.cuda.CUDAGraph, BatchInputs, torch.Tensor]:
        """Copy a decode batch of n rows into the static inputs of the smallest bucket that holds it."""
        bucket = self._buckets()[bisect.bisect_left(self._buckets(), n)]
        graph, static, logits = self.graphs[bucket]
        scratch, ps = self.scratch_page, self.config.page_size
        static.input_ids[:n].copy_(batch.input_ids)
        static.positions[:n].copy_(batch.positions)
        static.slot_mapping[:n].copy_(batch.slot_mapping)
        static.slot_mapping[n:].fill_(scratch * ps)
        static.page_table[:n, :batch.page_table.shape[1]].copy_(batch.page_table)
        static.page_table[n:].fill_(scratch)
        static.seq_lens[:n].copy_(batch.seq_lens)
        static.seq_lens[n:].fill_(1)
        return graph, static, logits


def _page_table(scheduled: list) -> np.ndarray:
    """The scheduled sequences' page ids [rows, most pages], rows padded with zeros, filled in one
    scatter (no per-row list conversion)."""
    num_pages = np.fromiter((len(s.seq.page_ids) for s in scheduled), dtype=np.int64, count=len(scheduled))
    table = np.zeros((len(scheduled), int(num_pages.max())), dtype=np.int64)
    page_rows = np.repeat(np.arange(len(scheduled)), num_pages)
    page_cols = np.arange(len(page_rows)) - np.repeat(np.cumsum(num_pages) - num_pages, num_pages)
    table[page_rows, page_cols] = np.fromiter(itertools.chain.from_iterable(s.seq.page_ids for s in scheduled),
                                              dtype=np.int64, count=len(page_rows))
    return table


class _Window:
    """A launched decode window: its SchedulerOutput, device inputs and per-step sampled tokens, and
    the copy of those tokens to pinned host memory (an event marks when it is done)."""

    def __init__(self, out: SchedulerOutput, batch: BatchInputs, n: int, left: torch.Tensor, graph, logits_out,
                 sample_fn: Callable[[torch.Tensor], torch.Tensor]):
        self.out, self.batch, self.n, self.left = out, batch, n, left
        self.graph, self.logits_out, self.sample_fn = graph, logits_out, sample_fn
        self.tokens: list[torch.Tensor] = []  # [n] per step, on the device
        self._host: torch.Tensor | None = None
        self._event = None

    def start_copy(self, device: torch.device) -> None:
        stacked = torch.stack(self.tokens, dim=1)
        if device.type != "cuda":
            self._host = stacked
            return
        self._host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
        self._host.copy_(stacked, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def host_tokens(self) -> list[list[int]]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()

