"""Continuous batching: which tokens of which sequences the next model step computes.

Policy (vLLM v1 style), one `schedule()` per model step:

1. Decode first. Every running sequence whose only uncomputed token is its last sampled one gets
   one token, oldest arrival first, while the token budget lasts. When its token needs a page and
   none is free, the most recently arrived running sequence is preempted by recompute (pages
   freed, KV forgotten, pushed to the front of the waiting queue), repeatedly, until the page fits
   or the sequence itself was the one preempted.
2. Chunked prefill with the remaining budget: first the running sequence whose prefill was cut
   short by the budget last step, then waiting sequences in FCFS order. A prefill takes
   min(uncomputed tokens, remaining budget); admission stops at the first waiting sequence whose
   chunk does not fit in the free pages, when `max_num_seqs` are running, or for this step once
   anything was preempted.

Decode windows (multi-step): when `num_decode_steps` K > 1, every running sequence is decoding
and no waiting sequence could be admitted (none waits, or all `max_num_seqs` seats are taken), one
`schedule()` covers up to K decode steps: each sequence gets pages ahead for the steps it may still
take (`num_steps`, at most K, cut at its max_new_tokens / max_model_len) and the runner feeds each
sampled token back on the device, syncing with the host once per window. Without the pages for
the whole window the step falls back to the single-step policy above (which may preempt). A
sequence that samples EOS or a stop token mid-window finishes at the window's end; the tokens it
computed after that are dropped. `chain(out)` schedules the window after `out` before `out`'s tokens
are known (EngineConfig.overlap_windows: the runner launches it at once, so the host reads `out`
while the device runs it), only where the batch cannot change by what the host does not know yet:
every running sequence in `out`, no waiting sequence that could take a seat, and the pages for both
windows free. Sequences that stop by length in `out` are known to stop, so the chained window leaves
them out; a sequence that stops on EOS or a stop token in `out` runs the chained window too, and
update() drops what it sampled there.

Depth-wise batching (`loop_policy="depthwise"`, a layer-tied model of L loops over one shared
stack): a chunk (a decode token or a prefill chunk) passes through the stack L times, one loop
iteration per step, and rows at different iterations share each step's call of the stack. Every
step first continues the chunks already inside the stack at their next iteration (they hold their
pages), then fills the remaining budget with new chunks at iteration 0 by the policy above; a
sequence has at most one chunk inside the stack, and it samples (or counts as computed) when that
chunk leaves after iteration L-1. There are no decode windows in this mode. A preempted sequence
leaves the stack with its chunk.

Order: every running sequence arrived before every waiting one, and both lists are sorted by
arrival (admission is FCFS from the front; victims are the youngest running and go back to the
front), so "most recently arrived running" is simply the end of `running`.

Only running sequences hold pages, and `add()` refuses a request whose longest possible length
cannot fit in the whole pool, so the oldest running sequence can always make progress: no
deadlock. Per-step host work is linear in the number of running sequences.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections import deque
from dataclasses import dataclass, field

from .config import EngineConfig
from .page_pool import PagePool
from .sequence import Sequence, SequenceStatus


def _token_id(token) -> int:
    try:
        value = operator.index(token)  # int, numpy integer or one-element integer tensor
    except TypeError:
        value = -1
    if value < 0 or isinstance(token, bool):
        raise ValueError(f"sampled token ids must be integers >= 0, got {token!r}")
    return value


@dataclass(frozen=True)
class ScheduledSeq:
    """`num_tokens` tokens of `seq`, at positions start_position.., computed in this step."""

    seq: Sequence
    num_tokens: int
    start_position: int  # seq.num_computed_tokens before the step
    is_prefill: bool  # False: a one-token decode of the last sampled token
    sample: bool  # all of seq's tokens are computed after this step: sample its next token
    num_steps: int = 1  # decode window: steps whose tokens count (<= SchedulerOutput.num_steps)
    loop: int = 0  # depth-wise batching: the loop iteration this step runs for the chunk
    final_loop: bool = True  # the chunk leaves the loop stack after this step (always, outside depth-wise mode)

    @classmethod
    def decode(cls, seq: Sequence, num_steps: int, ahead: int = 0) -> "ScheduledSeq":
        """A decode window's entry for `seq`: equal to ScheduledSeq(seq, 1, seq.num_computed_tokens +
        ahead, is_prefill=False, sample=True, num_steps=num_steps), built with one dict update instead of the
        frozen __init__'s setattr per field: a window makes one per running sequence, on the host
        between windows (BENCHMARKS.md, "host work between windows": schedule 2.11 -> 1.63 ms).
        ahead: positions the window before it computes (a chained window, Scheduler.chain)."""
        entry = object.__new__(cls)
        entry.__dict__.update(seq=seq, num_tokens=1, start_position=seq.num_computed_tokens + ahead,
                              is_prefill=False, sample=True, num_steps=num_steps, loop=0, final_loop=True)
        return entry

    @property
    def end_position(self) -> int:
        return self.start_position + self.num_tokens

    @property
    def positions(self) -> range:
        return range(self.start_position, self.start_position + self.num_tokens)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_slice(self.start_position, self.start_position + self.num_tokens)


@dataclass
class SchedulerOutput:
    """One model step: decodes first, then prefill chunks; plus who was preempted to make room."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_steps: int = 1  # > 1: a decode window of this many model steps (every entry a decode)

    @property
    def num_decode(self) -> int:
        return sum(not s.is_prefill for s in self.scheduled)

    @property
    def num_prefill(self) -> int:
        return sum(s.is_prefill for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class RunnerOutput:
    """What the model runner sampled for one `SchedulerOutput`.

    `sampled_token_ids[i]` belongs to the i-th entry of `scheduled` whose `sample` is True: the
    token ids it drew, one per model step, so exactly that entry's `num_steps` of them (1 outside a
    decode window).
    """

    sampled_token_ids: list[list[int]] = field(default_factory=list)


class Scheduler:
    """Decode-first, chunked-prefill continuous batching with preemption by recompute.

    Drive it as `out = schedule()`, let the model runner execute `out`, then
    `update(out, runner_output)`; alternate strictly. The scheduler owns the page pool of its
    config (`pool`); `bytes_per_token` of KV only feeds the pool's memory accounting.
    """

    def __init__(self, config: EngineConfig, bytes_per_token: int = 0, num_loops: int = 1,
                 pool: PagePool | None = None):
        if not isinstance(num_loops, int) or num_loops < 1:
            raise ValueError(f"num_loops must be an int >= 1, got {num_loops!r}")
        self.config = config
        self.loops = num_loops if config.loop_policy == "depthwise" else 1  # loop iterations a chunk takes
        self.in_flight: dict[int, ScheduledSeq] = {}  # seq_id -> its chunk inside the loop stack
        self.pool = PagePool(config, bytes_per_token) if pool is None else pool  # a skip-decode model's: per layer group
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival, all older than any waiting sequence
        self.num_preemptions = 0
        self._unfinished: dict[int, Sequence] = {}
        self._arrivals = itertools.count()
        self._pending: SchedulerOutput | None = None
        self._chained: SchedulerOutput | None = None  # a window scheduled by chain(), launched before _pending's update

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._unfinished)

    def add(self, seq: Sequence) -> None:
        """Queue a new request; refuse, without touching the queues, one that could never run."""
        if seq.seq_id in self._unfinished or seq.status is not SequenceStatus.WAITING or seq.num_output_tokens:
            raise ValueError(f"sequence {seq.seq_id} is not a new request ({seq!r})")
        num_prompt = seq.num_prompt_tokens
        max_len = self.config.max_model_len
        if num_prompt == 0:
            raise ValueError(f"prompt is empty (sequence {seq.seq_id}): at least one token is needed")
        if num_prompt > max_len - 1:
            raise ValueError(
                f"prompt of sequence {seq.seq_id} has {num_prompt} tokens but max_model_len is {max_len}: "
                f"at most {max_len - 1} prompt tokens leave room for one generated token"
            )
        # KV of the final token is never computed, so the longest sequence needs one slot less.
        max_slots = min(num_prompt + seq.sampling_params.max_new_tokens, max_len) - 1
        pool = self.pool
        if not pool.fits(seq, max_slots):
            raise ValueError(
                f"sequence {seq.seq_id} ({num_prompt} prompt tokens, up to {max_slots + 1} tokens in all) can need "
                f"{pool.pages_for(max_slots)} KV pages but the pool has {pool.num_pages} pages of {pool.page_size}; "
                "lower max_new_tokens or enlarge the pool"
            )
        seq.arrival = next(self._arrivals)
        self._unfinished[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish an unfinished sequence now (reason "abort") and free its pages; None if unknown."""
        seq = self._unfinished.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.pool.free(seq)
            self.in_flight.pop(seq.seq_id, None)
        else:
            self.waiting.remove(seq)
        seq.finish("abort")
        return seq

    def schedule(self) -> SchedulerOutput:
        if self._pending is not None:
            raise RuntimeError("schedule() called again before update() consumed the previous SchedulerOutput")
        out = self._schedule_window()
        if out is not None:
            self._pending = out
            return out
        out = SchedulerOutput()
        budget = self._continue_loops(out, self.config.max_num_batched_tokens)
        budget, prefilling = self._schedule_decodes(out, budget)
        budget = self._schedule_running_prefills(out, budget, prefilling)
        if not out.preempted:
            self._admit_waiting(out, budget)
        out.num_batched_tokens = sum(s.num_tokens for s in out.scheduled)
        self._pending = out
        return out

    def update(self, output: SchedulerOutput, result: RunnerOutput) -> list[Sequence]:
        """Apply the executed `output`; return the sequences that finished in it (pages freed).

        A sequence keeps its sampled tokens up to the first that stops it: a decode window's tokens
        after an EOS or stop token are dropped. A malformed `result` raises ValueError and changes nothing.
        """
        if output is not self._pending:
            raise RuntimeError("update() needs the SchedulerOutput of the latest schedule(), applied once")
        sampled = iter(self._checked_tokens(output, result))
        self._pending, self._chained = self._chained, None  # a chained window is the next to update
        finished = []
        for sched in output.scheduled:
            tokens = next(sampled) if sched.sample else []
            seq = sched.seq
            if seq.is_finished:  # aborted after schedule()
                continue
            if not sched.final_loop:  # depth-wise: the chunk stays in the loop stack
                self.in_flight[seq.seq_id] = sched
                continue
            self.in_flight.pop(seq.seq_id, None)
            if not sched.sample:  # a prefill chunk short of the last prompt token
                seq.num_computed_tokens += sched.num_tokens
                continue
            kept = self._until_stop(seq, tokens)
            # Every window step after the first computed the KV of the token the step before sampled.
            seq.num_computed_tokens += sched.num_tokens + len(kept) - 1
            seq.extend_tokens(kept)
            if self._stop(seq):
                finished.append(seq)
        return self._retire(finished)

    @staticmethod
    def _checked_tokens(output: SchedulerOutput, result: RunnerOutput) -> list[list[int]]:
        """`result`'s token ids as ints, once they are known to be what `output` asked for."""
        sampling = [s for s in output.scheduled if s.sample]
        token_lists = result.sampled_token_ids
        if len(token_lists) != len(sampling):
            raise ValueError(f"RunnerOutput has sampled tokens for {len(token_lists)} sequences but "
                             f"{len(sampling)} sequences sample in this step")
        for sched, tokens in zip(sampling, token_lists):
            if len(tokens) != sched.num_steps:
                raise ValueError(f"RunnerOutput has {len(tokens)} sampled tokens for sequence {sched.seq.seq_id}, "
                                 f"which ran {sched.num_steps} model steps: one token per step")
        flat = list(itertools.chain.from_iterable(token_lists))
        if set(map(type, flat)) <= {int} and (not flat or min(flat) >= 0):
            return token_lists  # plain ints >= 0 (a runner's tensor.tolist()): nothing to convert
        return [[_token_id(token) for token in tokens] for tokens in token_lists]

    def _until_stop(self, seq: Sequence, tokens: list[int]) -> list[int]:
        """`tokens` up to and including the first that stops `seq` (its stop ids, or EOS unless ignored)."""
        params = seq.sampling_params
        eos = None if params.ignore_eos else self.config.eos_token_id
        if (eos is None or eos not in tokens) and params.stop_token_ids == ():
            return tokens
        for i, token in enumerate(tokens):
            if token == eos or token in params.stop_token_ids:
                return tokens[: i + 1]
        return tokens

    def _retire(self, finished: list[Sequence]) -> list[Sequence]:
        if finished:
            self.running = [s for s in self.running if not s.is_finished]
        return finished

    def _stop(self, seq: Sequence) -> bool:
        reason = seq.stop_reason(self.config.eos_token_id, self.config.max_model_len)
        if reason is None:
            return False
        self.pool.free(seq)
        seq.finish(reason)
        del self._unfinished[seq.seq_id]
        return True

    def _tokens_left(self, seq: Sequence) -> int:
        """Tokens `seq` may still sample: to its max_new_tokens or max_model_len, whichever comes first."""
        params = seq.sampling_params
        return min(params.max_new_tokens - seq.num_output_tokens, self.config.max_model_len - seq.num_tokens)

    def chain(self, output: SchedulerOutput) -> SchedulerOutput | None:
        """The decode window after `output` (a window not yet updated), scheduled before its tokens are
        known, so the runner can launch it while the host reads `output` (EngineConfig.overlap_windows).
        It is the window schedule() would give after update(output) if no sequence stops on EOS or a stop
        token in `output`: every running sequence that has tokens left after `output`, in the same order.
        A sequence that stops by length in `output` is left out (the runner drops its row), and so is one
        that `output` still carried after it had stopped; None when no sequence is left, when a waiting
        sequence could take a seat (its prefill goes first), when `output` holds a sequence that is not
        running or ran fewer steps with tokens left, or when the pages do not fit. A sequence that does
        stop on EOS or a stop token in `output` still runs the chained window; update() drops what it
        sampled there (it is finished), and its pages, these included, are freed when it stops."""
        k_max = self.config.num_decode_steps
        if output is not self._pending or self._chained is not None or output.num_steps == 1:
            return None
        rows = [s for s in output.scheduled if not s.seq.is_finished]  # (finished: stopped in the window before)
        if len(rows) != len(self.running) or any(s.seq is not seq for s, seq in zip(rows, self.running)):
            return None
        k, kept, steps = output.num_steps, [], []
        for sched in rows:
            left = self._tokens_left(sched.seq) - sched.num_steps
            if left < 1:  # stops by length inside `output`
                continue
            if sched.num_steps != k:
                return None
            kept.append(sched.seq)
            steps.append(min(k_max, left))
        seats_free = self.config.max_num_seqs - len(kept)
        if not kept or (self.waiting and seats_free > 0) or max(steps) == 1:
            return None
        if not self.pool.can_allocate_all([(seq, k + n) for seq, n in zip(kept, steps)]):
            return None
        out = SchedulerOutput(num_steps=max(steps), num_batched_tokens=len(kept))
        for seq, n in zip(kept, steps):
            self.pool.allocate(seq, k + n)
            out.scheduled.append(ScheduledSeq.decode(seq, n, ahead=k))
        self._chained = out
        return out

    def _schedule_window(self) -> SchedulerOutput | None:
        """A decode window of up to num_decode_steps steps, or None for the single-step policy."""
        k_max, running = self.config.num_decode_steps, self.running
        if k_max == 1 or self.loops > 1 or not running or len(running) > self.config.max_num_batched_tokens:
            return None
        if self.waiting and len(running) < self.config.max_num_seqs:
            return None  # a waiting sequence may be admitted: its prefill goes first
        if not all(seq.is_decoding for seq in running):
            return None
        pool = self.pool
        steps = [max(1, min(k_max, self._tokens_left(seq))) for seq in running]
        k = max(steps)
        if k == 1 or not pool.can_allocate_all(list(zip(running, steps))):
            return None
        out = SchedulerOutput(num_steps=k)
        for seq, n in zip(running, steps):
            pool.allocate(seq, n)
            out.scheduled.append(ScheduledSeq.decode(seq, n))
        out.num_batched_tokens = len(running)
        return out

    def _continue_loops(self, out: SchedulerOutput, budget: int) -> int:
        """Depth-wise: every chunk inside the loop stack runs its next iteration (oldest first)."""
        for seq in self.running:
            chunk = self.in_flight.get(seq.seq_id)
            if chunk is None:
                continue
            final = chunk.loop + 2 == self.loops
            out.scheduled.append(dataclasses.replace(chunk, loop=chunk.loop + 1, final_loop=final,
                                                     sample=final and chunk.end_position == seq.num_tokens))
            budget -= chunk.num_tokens
        return budget

    def _schedule_decodes(self, out: SchedulerOutput, budget: int) -> tuple[int, list[Sequence]]:
        """One token for each decoding sequence, oldest first; also list the running prefills."""
        prefilling = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.seq_id in self.in_flight:
                pass  # its chunk is inside the loop stack (continued above)
            elif not seq.is_decoding:
                prefilling.append(seq)
            elif self._make_room(seq, 1, out):
                self.pool.allocate(seq, 1)
                out.scheduled.append(ScheduledSeq(seq, 1, seq.num_computed_tokens, is_prefill=False,
                                                  sample=self.loops == 1, final_loop=self.loops == 1))
                budget -= 1
            else:
                break  # seq preempted itself: it was the last running sequence
            i += 1
        return budget, prefilling

    def _make_room(self, seq: Sequence, num_new_tokens: int, out: SchedulerOutput) -> bool:
        """Preempt the youngest running sequences until seq's tokens fit; False if seq went itself.

        Called while visiting `running` oldest first, so the youngest is never one already
        scheduled this step.
        """
        while not self.pool.can_allocate(seq, num_new_tokens):
            victim = self.running.pop()
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        if self.in_flight.pop(seq.seq_id, None) is not None:  # its chunk leaves the loop stack, unrun
            out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        self.pool.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _schedule_running_prefills(self, out: SchedulerOutput, budget: int, prefilling: list[Sequence]) -> int:
        """Continue prefills cut short by the budget, shrunk to the free pages if need be."""
        for seq in prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted by a decode above
                continue
            num_tokens = min(seq.num_uncomputed, budget, self.pool.max_new_tokens(seq))
            if num_tokens == 0:
                continue
            self._schedule_prefill(seq, num_tokens, out)
            budget -= num_tokens
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Start prefills of waiting sequences, FCFS, while budget, pages and seat limit allow."""
        chunked = self.config.enable_chunked_prefill
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_tokens = min(seq.num_uncomputed, budget)
            if num_tokens < seq.num_uncomputed and not chunked:
                break
            if not self.pool.can_allocate(seq, num_tokens):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._schedule_prefill(seq, num_tokens, out)
            budget -= num_tokens

    def _schedule_prefill(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> None:
        start = seq.num_computed_tokens
        self.pool.allocate(seq, num_tokens)
        final = self.loops == 1
        sample = final and start + num_tokens == seq.num_tokens
        out.scheduled.append(ScheduledSeq(seq, num_tokens, start, is_prefill=True, sample=sample, final_loop=final))
