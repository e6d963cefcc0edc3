"""Scheduler tests, driven by a fake model that really reads and writes a paged KV cache.

The fake model stores (owner, position, token) in every cache slot it is told to fill and, to
sample, reads a sequence's whole context back through its page table. Its next token,
(31 * last + 7 + sum((pos + 1) * token)) % 1000, depends on every cached entry, so a lost,
shared or misplaced page, a wrong position or a skipped chunk changes the output; `reference`
computes the same tokens from the token list alone, with no scheduler at all.
"""

import dataclasses
import random

import numpy as np
import pytest

from fxforge.runtime.config import EngineConfig
from fxforge.runtime.page_pool import PagePool
from fxforge.runtime.scheduler import RunnerOutput, ScheduledSeq, Scheduler, SchedulerOutput
from fxforge.runtime.sequence import SamplingParams, Sequence, SequenceStatus

EOS = 0
VOCAB = 1000


def _next(last: int, context_hash: int) -> int:
    return (31 * last + 7 + context_hash) % VOCAB


def reference(prompt: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    """The fake model's output for one request, computed without any cache or scheduler."""
    tokens = list(prompt)
    context_hash = sum((pos + 1) * tok for pos, tok in enumerate(tokens)) % VOCAB
    out = []
    while True:
        tok = _next(tokens[-1], context_hash)
        tokens.append(tok)
        out.append(tok)
        context_hash = (context_hash + len(tokens) * tok) % VOCAB
        if (tok == EOS and not params.ignore_eos) or tok in params.stop_token_ids:
            return out
        if len(out) >= params.max_new_tokens or len(tokens) >= max_model_len:
            return out


class FakeModel:
    """Returns what the model runner would: a RunnerOutput for each SchedulerOutput."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        size = pool.capacity_tokens
        self.owner = np.full(size, -1, dtype=np.int64)
        self.position = np.full(size, -1, dtype=np.int64)
        self.token = np.full(size, -1, dtype=np.int64)
        self.page_offsets = np.arange(pool.page_size)

    def _context_slots(self, seq: Sequence, stop: int) -> np.ndarray:
        pages = np.asarray(seq.page_ids, dtype=np.int64)
        return (pages[:, None] * self.pool.page_size + self.page_offsets).ravel()[:stop]

    def step(self, out: SchedulerOutput) -> RunnerOutput:
        return self.window(out) if out.num_steps > 1 else self.single(out)

    def window(self, out: SchedulerOutput) -> RunnerOutput:
        """A decode window as the runner runs it: each entry feeds its sampled token back for its
        `num_steps` steps, writing the KV of its input token at each."""
        columns = []
        for s in out.scheduled:
            token, column = s.seq.last_token_id, []
            for pos in range(s.start_position, s.start_position + s.num_steps):
                slot = self.pool.slot(s.seq, pos)
                self.owner[slot], self.position[slot], self.token[slot] = s.seq.seq_id, pos, token
                slots = self._context_slots(s.seq, pos + 1)
                assert (self.owner[slots] == s.seq.seq_id).all(), f"sequence {s.seq.seq_id} reads another's KV"
                assert (self.position[slots] == np.arange(pos + 1)).all(), "KV positions out of order"
                context_hash = int((self.token[slots] * (np.arange(pos + 1) + 1)).sum()) % VOCAB
                token = _next(token, context_hash)
                column.append(token)
            columns.append(column)
        return RunnerOutput(columns)

    def single(self, out: SchedulerOutput) -> RunnerOutput:
        written = []
        for s in out.scheduled:  # write every chunk's KV first, as the model's kv_write does
            slots = np.asarray(self.pool.slots(s.seq, s.start_position, s.end_position))
            self.owner[slots] = s.seq.seq_id
            self.position[slots] = np.arange(s.start_position, s.end_position)
            self.token[slots] = s.token_ids
            written.append(slots)
        if written:
            slots = np.concatenate(written)
            assert len(np.unique(slots)) == len(slots), "two tokens written to one cache slot in a step"
        sampled = []
        for s in out.scheduled:  # then attend over the whole context through the page table
            if not s.sample:
                continue
            slots = self._context_slots(s.seq, s.end_position)
            assert (self.owner[slots] == s.seq.seq_id).all(), f"sequence {s.seq.seq_id} reads another's KV"
            assert (self.position[slots] == np.arange(s.end_position)).all(), "KV positions out of order"
            context_hash = int((self.token[slots] * (np.arange(s.end_position) + 1)).sum()) % VOCAB
            sampled.append([_next(int(self.token[slots[-1]]), context_hash)])
        return RunnerOutput(sampled)


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """Invariants of one schedule(), checked before the model runs."""
    cfg, pool = sched.config, sched.pool
    assert out.num_batched_tokens == sum(s.num_tokens for s in out.scheduled) <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    kinds = [s.is_prefill for s in out.scheduled]
    assert kinds == sorted(kinds), "a prefill is scheduled before a decode"
    assert len({s.seq.seq_id for s in out.scheduled}) == len(out.scheduled)
    for s in out.scheduled:
        seq = s.seq
        assert seq.status is SequenceStatus.RUNNING and s.num_tokens >= 1
        assert s.start_position == seq.num_computed_tokens
        assert len(seq.page_ids) * pool.page_size >= s.end_position
        assert s.sample == (s.end_position == seq.num_tokens)
        if not s.is_prefill:
            assert s.num_tokens == 1 and s.sample
        assert 1 <= s.num_steps <= out.num_steps
        assert len(seq.page_ids) * pool.page_size >= s.start_position + s.num_steps
        assert s.num_steps == 1 or not s.is_prefill
    if out.num_steps > 1:
        assert not out.preempted and all(not s.is_prefill for s in out.scheduled)
        assert out.scheduled and [s.seq for s in out.scheduled] == sched.running
        assert not sched.waiting or sched.num_running == cfg.max_num_seqs, "a window kept a waiting sequence out"
        assert max(s.num_steps for s in out.scheduled) == out.num_steps <= cfg.num_decode_steps
    if out.preempted:
        assert list(sched.waiting)[: len(out.preempted)] == out.preempted[::-1], "preempted not at the front"
        assert all(p.page_ids == [] and p.num_computed_tokens == 0 for p in out.preempted)
        youngest_kept = max((s.arrival for s in sched.running), default=-1)
        assert youngest_kept < min(p.arrival for p in out.preempted), "preempted an older sequence"
    # Running sequences are sorted by arrival and all older than the waiting ones (which are sorted too).
    arrivals = [s.arrival for s in sched.running]
    assert arrivals == sorted(arrivals)
    if sched.running and sched.waiting:
        assert sched.running[-1].arrival < sched.waiting[0].arrival
    if len(sched.waiting) > 1:
        assert sched.waiting[0].arrival < sched.waiting[1].arrival and sched.waiting[-2].arrival < sched.waiting[-1].arrival
    # Only running sequences hold pages (no sharing here), and no page is lost.
    assert pool.num_used_pages == sum(len(s.page_ids) for s in sched.running)


def drive(sched: Scheduler, arrivals: list[list[Sequence]] = (), max_steps: int = 1_000_000):
    """Run to completion, adding arrivals[i] before step i. Returns (steps, outputs by seq_id)."""
    model = FakeModel(sched.pool)
    outputs = {}
    step = 0
    while sched.has_unfinished() or step < len(arrivals):
        for seq in arrivals[step] if step < len(arrivals) else ():
            sched.add(seq)
        out = sched.schedule()
        check_step(sched, out)
        assert out.scheduled or not sched.has_unfinished(), "no progress: scheduler stalled"
        for seq in sched.update(out, model.step(out)):
            outputs[seq.seq_id] = seq.output_token_ids
        step += 1
        assert step < max_steps
    return step, outputs


def make_scheduler(num_pages=64, page_size=4, num_decode_steps=1, **config) -> Scheduler:
    return Scheduler(EngineConfig(num_pages=num_pages, page_size=page_size, num_decode_steps=num_decode_steps,
                                  eos_token_id=EOS, **config))


def sampled(*token_lists: list[int]) -> RunnerOutput:
    return RunnerOutput(list(token_lists))


def test_one_config_feeds_scheduler_and_pool():
    config = EngineConfig(num_pages=10, page_size=8, max_model_len=100, eos_token_id=EOS)
    sched = Scheduler(config, bytes_per_token=6)
    assert sched.config is config and sched.pool.config is config
    assert (sched.pool.num_pages, sched.pool.page_size, sched.pool.bytes_per_token) == (10, 8, 6)
    seq = Sequence([1] * 9)
    sched.add(seq)
    sched.update(sched.schedule(), sampled([EOS]))  # the config's EOS ends it
    assert seq.finish_reason == "stop" and sched.pool.num_free_pages == 10


def test_single_request_matches_reference_and_frees_pages():
    sched = make_scheduler()
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    seq = Sequence([5, 6, 7], params)
    _, outputs = drive(sched, [[seq]])
    assert outputs[seq.seq_id] == reference([5, 6, 7], params, 8192)
    assert seq.finish_reason == "length" and seq.num_output_tokens == 20
    assert sched.pool.num_free_pages == 64 and not sched.has_unfinished()


def test_decode_first_then_prefill_with_leftover_budget():
    sched = make_scheduler(max_num_batched_tokens=10)
    a, b = Sequence([1, 2, 3]), Sequence([4, 5])
    sched.add(a)
    sched.add(b)
    model = FakeModel(sched.pool)
    out = sched.schedule()
    assert [(s.seq, s.num_tokens, s.is_prefill, s.sample) for s in out.scheduled] == [
        (a, 3, True, True), (b, 2, True, True)]
    sched.update(out, model.step(out))
    late = Sequence(list(range(1, 31)))
    sched.add(late)
    out = sched.schedule()
    check_step(sched, out)
    assert [(s.seq, s.num_tokens, s.is_prefill) for s in out.scheduled] == [(a, 1, False), (b, 1, False), (late, 8, True)]
    assert (out.num_decode, out.num_prefill, out.num_batched_tokens) == (2, 1, 10)
    assert not out.scheduled[2].sample


def test_chunked_prefill_splits_long_prompt_with_contiguous_positions():
    sched = make_scheduler(max_num_batched_tokens=16)
    prompt = [(7 * i) % 97 + 1 for i in range(50)]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    seq = Sequence(prompt, params)
    sched.add(seq)
    model = FakeModel(sched.pool)
    chunks = []
    while sched.has_unfinished():
        out = sched.schedule()
        check_step(sched, out)
        (s,) = out.scheduled
        chunks.append((s.start_position, s.num_tokens, s.is_prefill, s.sample))
        sched.update(out, model.step(out))
    assert chunks == [(0, 16, True, False), (16, 16, True, False), (32, 16, True, False), (48, 2, True, True),
                      (50, 1, False, True), (51, 1, False, True)]
    assert seq.output_token_ids == reference(prompt, params, 8192)


def test_no_chunking_keeps_prefills_whole_and_fcfs():
    sched = make_scheduler(max_num_batched_tokens=20, max_model_len=20, enable_chunked_prefill=False)
    a, b, c = Sequence([1] * 12), Sequence([2] * 12), Sequence([3] * 3)
    for seq in (a, b, c):
        sched.add(seq)
    out = sched.schedule()
    # b does not fit in the 8 tokens left; c may not overtake it.
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(a, 12)]
    sched.update(out, sampled([5]))
    out = sched.schedule()
    assert [(s.seq, s.num_tokens) for s in out.scheduled] == [(a, 1), (b, 12), (c, 3)]


def test_max_num_seqs_limits_running_sequences():
    sched = make_scheduler(max_num_seqs=2)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    seqs = [Sequence([i + 1, i + 2], params) for i in range(5)]
    model = FakeModel(sched.pool)
    for seq in seqs:
        sched.add(seq)
    running_counts = []
    while sched.has_unfinished():
        out = sched.schedule()
        check_step(sched, out)
        running_counts.append(sched.num_running)
        sched.update(out, model.step(out))
    assert max(running_counts) == 2
    assert [seq.output_token_ids for seq in seqs] == [reference(s.prompt_token_ids, params, 8192) for s in seqs]


def test_preemption_recomputes_youngest_and_output_is_unchanged():
    # 6 pages of 4: both sequences fit at first, then grow until the younger must give way.
    sched = make_scheduler(num_pages=6, page_size=4)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    old, young = Sequence([3, 1, 4, 1, 5, 9], params), Sequence([2, 7, 1, 8, 2, 8], params)
    model = FakeModel(sched.pool)
    sched.add(old)
    sched.add(young)
    preempted = []
    while sched.has_unfinished():
        out = sched.schedule()
        check_step(sched, out)
        preempted += out.preempted
        sched.update(out, model.step(out))
    assert preempted and all(p is young for p in preempted)
    assert sched.num_preemptions == len(preempted)
    assert old.output_token_ids == reference(old.prompt_token_ids, params, 8192)
    assert young.output_token_ids == reference(young.prompt_token_ids, params, 8192)
    assert sched.pool.num_free_pages == 6


def test_decoder_preempts_itself_when_it_is_the_youngest():
    sched = make_scheduler(num_pages=4, page_size=4)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    old, young = Sequence([1] * 8, params), Sequence([2] * 4, params)
    sched.add(old)
    sched.add(young)
    model = FakeModel(sched.pool)
    out = sched.schedule()  # prefills: old takes 2 pages, young 1
    sched.update(out, model.step(out))
    # Position 8 of old takes the last free page; position 4 of young then finds none, and young
    # is the youngest running sequence, so it preempts itself.
    out = sched.schedule()
    check_step(sched, out)
    assert out.preempted == [young] and [s.seq for s in out.scheduled] == [old]
    assert young.status is SequenceStatus.WAITING and sched.waiting[0] is young
    assert young.all_token_ids[:4] == [2] * 4 and young.num_tokens == 5 and young.num_computed_tokens == 0
    sched.update(out, model.step(out))
    while sched.has_unfinished():
        out = sched.schedule()
        check_step(sched, out)
        sched.update(out, model.step(out))
    assert old.output_token_ids == reference(old.prompt_token_ids, params, 8192)
    assert young.output_token_ids == reference(young.prompt_token_ids, params, 8192)


def test_add_rejects_bad_requests_without_disturbing_queue():
    sched = make_scheduler(num_pages=8, page_size=4, max_model_len=30)
    ok = Sequence([1, 2, 3])
    sched.add(ok)
    with pytest.raises(ValueError, match="prompt is empty"):
        sched.add(Sequence([]))
    with pytest.raises(ValueError, match="30 tokens but max_model_len is 30"):
        sched.add(Sequence([1] * 30))
    longest = Sequence([1] * 20, SamplingParams(max_new_tokens=10))  # 29 KV slots: just fits 8 pages of 4
    sched.add(longest)
    with pytest.raises(ValueError, match="need 9 KV pages but the pool has 8"):
        make_scheduler(num_pages=8, page_size=4, max_model_len=100).add(
            Sequence([1] * 20, SamplingParams(max_new_tokens=14)))
    with pytest.raises(ValueError, match="not a new request"):
        sched.add(ok)
    assert list(sched.waiting) == [ok, longest] and sched.num_running == 0
    assert [s.arrival for s in sched.waiting] == [0, 1]


def _update_state(sched: Scheduler, *seqs: Sequence):
    """Everything update() may change."""
    return ([(s.all_token_ids, s.num_computed_tokens, s.status, list(s.page_ids)) for s in seqs],
            list(sched.running), list(sched.waiting), list(sched.pool._free_pages), sched.has_unfinished())


def test_update_and_schedule_contract_errors():
    sched = make_scheduler()
    a, b = Sequence([1, 2]), Sequence([3])
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="before update"):
        sched.schedule()
    before = _update_state(sched, a, b)
    with pytest.raises(ValueError, match="sampled tokens for 1 sequences but 2 sequences sample"):
        sched.update(out, sampled([4]))
    with pytest.raises(ValueError, match=f"2 sampled tokens for sequence {b.seq_id}, which ran 1 model steps"):
        sched.update(out, sampled([4], [5, 6]))
    with pytest.raises(ValueError, match="integers >= 0, got -1"):
        sched.update(out, sampled([4], [-1]))
    with pytest.raises(ValueError, match="integers >= 0, got 4.0"):
        sched.update(out, sampled([4.0], [5]))
    with pytest.raises(ValueError, match="integers >= 0, got True"):
        sched.update(out, sampled([True], [5]))
    assert _update_state(sched, a, b) == before  # rejected updates changed nothing
    sched.update(out, sampled([np.int64(4)], [5]))  # aligned with sampling entries; numpy ints accepted
    assert a.all_token_ids == [1, 2, 4] and b.all_token_ids == [3, 5]
    with pytest.raises(RuntimeError, match="latest schedule"):
        sched.update(out, sampled([4], [5]))


def test_eos_and_stop_ids_finish_and_free():
    sched = make_scheduler()
    a = Sequence([1, 2], SamplingParams(max_new_tokens=10))
    b = Sequence([3], SamplingParams(max_new_tokens=10, stop_token_ids=(42,)))
    c = Sequence([4], SamplingParams(max_new_tokens=10, ignore_eos=True))
    for seq in (a, b, c):
        sched.add(seq)
    out = sched.schedule()
    finished = sched.update(out, sampled([EOS], [42], [EOS]))
    assert finished == [a, b] and a.finish_reason == b.finish_reason == "stop"
    assert sched.num_running == 1 and sched.pool.num_used_pages == 1
    assert c.status is SequenceStatus.RUNNING


def test_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=6)
    seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=50, ignore_eos=True))
    drive(sched, [[seq]])
    assert seq.num_tokens == 6 and seq.finish_reason == "length"


def test_abort_waiting_running_and_in_flight():
    sched = make_scheduler()
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    a, b, c = Sequence([1, 2], params), Sequence([3, 4], params), Sequence([5], params)
    for seq in (a, b, c):
        sched.add(seq)
    out = sched.schedule()
    sched.update(out, FakeModel(sched.pool).step(out))
    assert sched.abort(a.seq_id) is a and a.finish_reason == "abort" and a.page_ids == []
    out = sched.schedule()
    assert sched.abort(b.seq_id) is b  # aborted between schedule() and update()
    finished = sched.update(out, sampled([1], [2]))
    assert finished == [] and b.num_output_tokens == 1 and c.num_output_tokens == 2
    assert sched.abort(a.seq_id) is None and sched.abort(10**9) is None
    waiting = Sequence([9])
    sched.add(waiting)
    assert sched.abort(waiting.seq_id) is waiting and not sched.waiting
    assert [s.seq_id for s in sched.running] == [c.seq_id]
    assert sched.pool.num_used_pages == 1


def _random_request(rng: random.Random) -> tuple[list[int], SamplingParams]:
    prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 200))]
    stop = (rng.randrange(VOCAB),) if rng.random() < 0.3 else ()
    params = SamplingParams(max_new_tokens=rng.randint(1, 64), stop_token_ids=stop, ignore_eos=rng.random() < 0.5)
    return prompt, params


def _run_stress(requests, arrival_steps, num_pages, bad_at=(), num_decode_steps=1):
    sched = make_scheduler(num_pages=num_pages, page_size=8, max_num_seqs=32, max_num_batched_tokens=128,
                           max_model_len=512, num_decode_steps=num_decode_steps)
    arrivals = [[] for _ in range(max(arrival_steps) + 1)]
    seqs = []
    for (prompt, params), step in zip(requests, arrival_steps):
        seq = Sequence(prompt, params)
        arrivals[step].append(seq)
        seqs.append(seq)
    preempted_before_bad = []

    class BadAdder(list):  # arrivals that also throw bad requests at the scheduler mid-flight
        def __getitem__(self, step):
            if step in bad_at:
                preempted_before_bad.append(sched.num_preemptions)
                running, waiting = list(sched.running), list(sched.waiting)
                with pytest.raises(ValueError, match="prompt is empty"):
                    sched.add(Sequence([]))
                with pytest.raises(ValueError, match="max_model_len is 512"):
                    sched.add(Sequence([1] * 600))
                with pytest.raises(ValueError, match="pool has"):
                    sched.add(Sequence([1] * 500, SamplingParams(max_new_tokens=5)))
                with pytest.raises(ValueError, match="SamplingParams.top_p"):
                    sched.add(Sequence([1, 2], SamplingParams(top_p=0.0)))
                assert sched.running == running and list(sched.waiting) == waiting
            return super().__getitem__(step)

    steps, outputs = drive(sched, BadAdder(arrivals))
    return sched, seqs, steps, outputs


@pytest.mark.parametrize("num_decode_steps", [1, 6])
def test_stress_preemption_matches_unpressured_run(num_decode_steps):
    rng = random.Random(1234)
    requests = [_random_request(rng) for _ in range(2000)]
    arrival_steps = sorted(rng.randrange(3000) for _ in requests)

    small, small_seqs, _, small_out = _run_stress(requests, arrival_steps, num_pages=48, bad_at={100, 1500},
                                                  num_decode_steps=num_decode_steps)
    big, big_seqs, _, big_out = _run_stress(requests, arrival_steps, num_pages=4096)

    assert small.num_preemptions > 50, "the small pool was meant to force preemption"
    assert big.num_preemptions == 0
    assert len(small_out) == len(big_out) == 2000
    for (prompt, params), s, b in zip(requests, small_seqs, big_seqs):
        assert s.is_finished and b.is_finished
        expected = reference(prompt, params, 512)
        assert small_out[s.seq_id] == big_out[b.seq_id] == expected, f"request {prompt[:4]}... diverged"
        assert s.finish_reason == b.finish_reason
    assert small.pool.num_free_pages == 48 and big.pool.num_free_pages == 4096
    assert not small.waiting and not small.running


def _window_scheduler(num_pages=64, **config):
    return make_scheduler(num_pages=num_pages, page_size=4, num_decode_steps=5, **config)


def test_window_runs_only_when_nothing_can_be_admitted():
    sched = _window_scheduler(max_num_seqs=2)
    model = FakeModel(sched.pool)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    a, b, c = (Sequence([i + 1, i + 2], params) for i in range(3))
    sched.add(a)
    out = sched.schedule()  # a's prefill
    assert out.num_steps == 1
    sched.update(out, model.step(out))
    sched.add(b)
    out = sched.schedule()  # b could be admitted: single step (a decodes, b prefills)
    assert out.num_steps == 1 and [s.is_prefill for s in out.scheduled] == [False, True]
    sched.update(out, model.step(out))
    sched.add(c)  # both seats taken: c waits, a and b decode in a window
    out = sched.schedule()
    check_step(sched, out)
    assert out.num_steps == 5 and [s.num_steps for s in out.scheduled] == [5, 5]
    assert len(a.page_ids) == 2  # positions 0..7 (2 prompt + 1 + 5 new ones) in pages of 4
    sched.update(out, model.step(out))
    assert a.num_output_tokens == 7 and a.num_computed_tokens == 8 and b.num_output_tokens == 6
    assert a.output_token_ids == reference([1, 2], params, 512)[:7]


def test_window_falls_back_to_single_steps_without_pages_for_it():
    sched = _window_scheduler(num_pages=4, max_model_len=16)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    a, b = Sequence([1, 2, 3], params), Sequence([4, 5, 6], params)
    kinds, outputs = [], {}
    model = FakeModel(sched.pool)
    sched.add(a)
    sched.add(b)
    while sched.has_unfinished():
        out = sched.schedule()
        check_step(sched, out)
        kinds.append(out.num_steps)
        for seq in sched.update(out, model.step(out)):
            outputs[seq.seq_id] = seq.output_token_ids
    # prefills, one window of 5 each (8 positions in 2 of the 4 pages each), then no pages for a
    # second window: single steps, which preempt b; a finishes in windows, then b
    assert kinds[:2] == [1, 5] and kinds[2] == 1 and sched.num_preemptions > 0
    for seq in (a, b):
        assert outputs[seq.seq_id] == reference(seq.prompt_token_ids, params, 16) and seq.num_tokens == 16
    assert sched.pool.num_free_pages == 4


def test_window_cuts_at_lengths_and_drops_tokens_after_a_stop():
    sched = _window_scheduler(max_model_len=9)
    short = Sequence([1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    capped = Sequence([1, 2, 3, 4], SamplingParams(max_new_tokens=50, ignore_eos=True))  # max_model_len 9
    stopper = Sequence([7], SamplingParams(max_new_tokens=50, stop_token_ids=(77,)))
    for seq in (short, capped, stopper):
        sched.add(seq)
    out = sched.schedule()
    sched.update(out, sampled([10], [11], [12]))
    out = sched.schedule()
    assert out.num_steps == 5 and [s.num_steps for s in out.scheduled] == [2, 4, 5]
    finished = sched.update(out, sampled([20, 30], [21, 31, 41, 51], [22, 77, 42, 52, 62]))
    assert finished == [short, capped, stopper]
    assert short.output_token_ids == [10, 20, 30] and short.finish_reason == "length"
    assert capped.all_token_ids == [1, 2, 3, 4, 11, 21, 31, 41, 51] and capped.finish_reason == "length"
    assert stopper.output_token_ids == [12, 22, 77] and stopper.finish_reason == "stop"
    assert sched.pool.num_free_pages == 64 and not sched.running


def test_window_update_checks_the_token_counts():
    sched = _window_scheduler()
    seq = Sequence([1], SamplingParams(max_new_tokens=9, ignore_eos=True))
    sched.add(seq)
    sched.update(sched.schedule(), sampled([5]))
    out = sched.schedule()
    assert out.num_steps == 5
    before = _update_state(sched, seq)
    for wrong in ([1] * 4, [1] * 6):
        with pytest.raises(ValueError, match=f"{len(wrong)} sampled tokens for sequence {seq.seq_id}, which ran 5"):
            sched.update(out, sampled(wrong))
    with pytest.raises(ValueError, match="for 0 sequences but 1 sequences sample"):
        sched.update(out, sampled())
    with pytest.raises(ValueError, match="integers >= 0"):
        sched.update(out, sampled([1, 1, 1, 1, -3]))
    assert _update_state(sched, seq) == before  # rejected updates changed nothing
    sched.update(out, sampled([np.int64(t) for t in range(5)]))
    assert seq.output_token_ids == [5, 0, 1, 2, 3, 4]


def test_decode_entry_equals_the_constructors():
    """ScheduledSeq.decode (the decode window's fast path) sets every field, as the frozen __init__
    would, and stays frozen."""
    seq = Sequence([1, 2, 3])
    seq.num_computed_tokens = 2
    entry = ScheduledSeq.decode(seq, 5)
    assert entry == ScheduledSeq(seq, 1, 2, is_prefill=False, sample=True, num_steps=5)
    assert set(vars(entry)) == {f.name for f in dataclasses.fields(ScheduledSeq)}
    assert hash(entry) == hash(ScheduledSeq(seq, 1, 2, is_prefill=False, sample=True, num_steps=5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.num_steps = 1


def test_chain_schedules_the_next_window_before_the_tokens_are_known():
    """Scheduler.chain(out): the window schedule() would give after update(out) had no sequence
    stopped early: positions num_steps on, pages for both windows, and it is the next to update. A
    sequence that does stop (EOS) in `out` keeps its place in the chained window, whose tokens for
    it update() drops; its pages are freed when it stops."""
    sched = make_scheduler(num_decode_steps=4)
    params = SamplingParams(max_new_tokens=30)
    a, b = Sequence([1, 2, 3], params), Sequence([4, 5], params)
    sched.add(a)
    sched.add(b)
    sched.update(sched.schedule(), sampled([7], [8]))  # both prompts prefilled
    out = sched.schedule()
    assert out.num_steps == 4
    chained = sched.chain(out)
    assert sched.chain(out) is None  # one window ahead at most
    assert [(s.seq, s.start_position, s.num_steps) for s in chained.scheduled] == [(a, 3 + 4, 4), (b, 2 + 4, 4)]
    assert len(a.page_ids) == sched.pool.pages_for(3 + 4 + 4) and len(b.page_ids) == sched.pool.pages_for(2 + 4 + 4)
    with pytest.raises(RuntimeError, match="needs the SchedulerOutput of the latest schedule"):
        sched.update(chained, sampled([9] * 4, [9] * 4))  # `out` first
    assert sched.update(out, sampled([9, 9, 9, 9], [9, EOS, 9, 9])) == [b]  # b stops on EOS in `out`
    assert b.output_token_ids == [8, 9, EOS] and b.page_ids == [] and a.num_computed_tokens == 3 + 4
    after = sched.chain(chained)  # b, stopped, still has a row in `chained`: the next window leaves it out
    assert [(s.seq, s.start_position, s.num_steps) for s in after.scheduled] == [(a, 3 + 8, 4)]
    assert sched.update(chained, sampled([10] * 4, [10] * 4)) == []  # b's chained tokens dropped
    assert a.output_token_ids == [7] + [9] * 4 + [10] * 4 and b.output_token_ids == [8, 9, EOS]
    assert a.num_computed_tokens == 3 + 8
    assert sched.update(after, sampled([11] * 4)) == [] and a.num_computed_tokens == 3 + 12


def test_chain_leaves_out_what_stops_by_length_and_declines_when_the_batch_would_change():
    """A sequence that stops by length inside the window is left out of the chained window (known
    on the host); no chained window when every sequence stops, when a waiting sequence could take a
    free seat (one a sequence stopping by length frees, too), or when the pages for it do not fit."""
    def windowed(max_new, num_pages=64, max_num_seqs=256):
        sched = make_scheduler(num_pages=num_pages, num_decode_steps=4, max_num_seqs=max_num_seqs)
        seqs = [Sequence([1, 2, 3], SamplingParams(max_new_tokens=n)) for n in max_new]
        for seq in seqs:
            sched.add(seq)
        sched.update(sched.schedule(), sampled(*[[7]] * len(seqs)))
        out = sched.schedule()
        assert out.num_steps == 4
        return sched, out

    sched, out = windowed([30, 5])  # the second stops by length in this window (1 + 4 of 5 tokens)
    chained = sched.chain(out)
    assert [s.seq for s in chained.scheduled] == [sched.running[0]] and chained.num_batched_tokens == 1
    second = sched.running[1]
    assert sched.update(out, sampled([9] * 4, [9] * 4)) == [second] and second.finish_reason == "length"
    assert sched.update(chained, sampled([9] * 4)) == [] and sched.running[0].num_output_tokens == 9
    sched, out = windowed([5, 5])  # every sequence stops in this window
    assert sched.chain(out) is None
    sched, out = windowed([30, 5], max_num_seqs=2)
    sched.add(Sequence([1, 2], SamplingParams(max_new_tokens=3)))  # no seat now, but the second frees one
    assert sched.chain(out) is None
    sched, out = windowed([30, 30], max_num_seqs=3)
    sched.add(Sequence([1, 2], SamplingParams(max_new_tokens=3)))  # arrives during the window, a seat free
    assert sched.chain(out) is None
    sched, out = windowed([30, 30], max_num_seqs=2)
    sched.add(Sequence([1, 2], SamplingParams(max_new_tokens=3)))  # arrives, but no seat is free
    assert sched.chain(out) is not None
    sched, out = windowed([12, 12], num_pages=5)  # 2 pages each hold this window, the next needs 3 each
    assert sched.chain(out) is None and sched.pool.num_free_pages == 1
