"""Layer-tied models in the runtime: lockstep (the unrolled graph) and depth-wise batching (one pass of
the shared stack per step, rows at mixed loop iterations) both give the reference decoder's tokens,
under chunked prefill, preemption and staggered arrivals; the depth-wise KV pages of loop j hold
exactly what depth j*K + b of the unrolled graph caches."""

import dataclasses
import json

import pytest
import torch

import fxforge
from fxforge.ir.model import build_batch
from fxforge.ir.recursive import DepthwiseModel
from fxforge.passes import LayerTying, Lower
from fxforge.runtime.config import EngineConfig
from fxforge.runtime.engine import Engine
from fxforge.runtime.scheduler import RunnerOutput, Scheduler
from fxforge.runtime.sequence import SamplingParams, Sequence
from tests.passes.test_layer_tying import deep_model

POLICIES = ("lockstep", "depthwise")
MAX_NEW = 10


@pytest.fixture(scope="module")
def relaxed():
    """6 depths over 2 blocks (3 loops), rank-3 LoRA at every depth."""
    return fxforge.optimize(deep_model(), passes=[LayerTying(unique_layers=2, init="average", rank=3)])


def prompts(lengths=(5, 17, 3, 40, 9)):
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 97, (n,), generator=gen).tolist() for n in lengths]


def engine(model, policy, **settings):
    base = dict(max_num_batched_tokens=24, num_pages=64, page_size=4, max_model_len=128)
    return Engine(model, loop_policy=policy, **{**base, **settings})


def generate(eng, token_lists):
    return [o.token_ids for o in eng.generate(token_lists, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))]


@pytest.mark.parametrize("policy", POLICIES)
def test_both_policies_give_the_reference_tokens(relaxed, policy):
    """Chunked prefill (a 24-token budget against a 40-token prompt) and mixed lengths."""
    assert generate(engine(relaxed, policy), prompts()) == relaxed.generate(prompts(), max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("policy", POLICIES)
def test_under_preemption(relaxed, policy):
    """11 pages of 4 slots for 5 sequences: the youngest are preempted and recomputed."""
    eng = engine(relaxed, policy, num_pages=14)
    assert generate(eng, prompts()) == relaxed.generate(prompts(), max_new_tokens=MAX_NEW)
    assert eng.stats.preemptions > 0


def test_depthwise_shares_one_call_between_loop_iterations_and_refills(relaxed):
    """Requests arriving one step apart sit at different loop iterations in the same step, and a
    chunk leaving the stack is replaced at iteration 0 in the next step."""
    eng = engine(relaxed, "depthwise")
    seqs = [eng.add_request(p, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)) for p in prompts((4,))]
    eng.step()
    seqs.append(eng.add_request(prompts((6,))[0], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)))
    out = eng.scheduler.schedule()
    assert sorted(s.loop for s in out.scheduled) == [0, 1]
    eng.scheduler.update(out, eng.runner.execute(out))
    loops_seen = set()
    while eng.scheduler.has_unfinished():
        out = eng.scheduler.schedule()
        loops_seen.add(tuple(sorted(s.loop for s in out.scheduled)))
        eng.scheduler.update(out, eng.runner.execute(out))
    assert (0, 2) in loops_seen or (1, 2) in loops_seen or (0, 1) in loops_seen
    references = relaxed.generate([s.prompt_token_ids for s in seqs], max_new_tokens=MAX_NEW)
    assert [s.output_token_ids for s in seqs] == references


def test_depthwise_kv_pages_are_keyed_by_depth(relaxed):
    """After a prefill, block b's pages of loop j equal the unrolled graph's depth j*K + b cache."""
    looped = DepthwiseModel(relaxed)
    ids = prompts((7,))[0]
    reference = relaxed.new_kv_cache(2, 4)
    relaxed.forward(build_batch([ids], [0], [[0, 1]], 4, "cpu"), reference)
    eng = engine(relaxed, "depthwise", num_pages=8)
    eng.generate([ids], SamplingParams(max_new_tokens=1))
    pages, per_loop = eng.scheduler.pool.num_pages, eng.runner.pages_per_loop
    assert per_loop == pages + 1 and looped.loops == 3
    for depth in range(relaxed.spec.num_layers):
        loop, block = divmod(depth, looped.blocks)
        first = loop * per_loop  # the sequence held pages 0 and 1 of each loop (freed, not cleared)
        cached = eng.runner.kv_cache[4 * block][first:first + 2].flatten(0, 1)[:7]
        assert torch.equal(cached, reference[4 * depth].flatten(0, 1)[:7]), f"depth {depth}"


def test_depthwise_runs_a_lowered_graph(relaxed):
    lowered = fxforge.optimize(relaxed, passes=[Lower(backend="triton")])  # CPU: bound, runs the references
    assert generate(engine(lowered, "depthwise"), prompts()[:2]) == relaxed.generate(prompts()[:2], max_new_tokens=MAX_NEW)


def test_depthwise_needs_a_tied_cycle_model():
    with pytest.raises(ValueError, match="needs a layer-tied model"):
        engine(deep_model(), "depthwise")
    sequence = fxforge.optimize(deep_model(), passes=[LayerTying(unique_layers=2, strategy="sequence")])
    with pytest.raises(ValueError, match="needs strategy 'cycle'"):
        engine(sequence, "depthwise")
    with pytest.raises(ValueError, match="loop_policy must be one of"):
        EngineConfig(loop_policy="spiral")


# ----------------------------------------------------------------------------------------------
# The scheduler's loop bookkeeping, without a model
# ----------------------------------------------------------------------------------------------


def loop_scheduler(loops=3, **settings):
    config = EngineConfig(**{"num_pages": 32, "page_size": 4, "max_model_len": 64, "max_num_batched_tokens": 16,
                             "loop_policy": "depthwise", **settings})
    return Scheduler(config, num_loops=loops)


def step(scheduler, token=5):
    out = scheduler.schedule()
    scheduler.update(out, RunnerOutput([[token] for s in out.scheduled if s.sample]))
    return out


def test_a_chunk_takes_one_step_per_loop_and_samples_when_it_leaves():
    scheduler = loop_scheduler()
    seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=2))
    scheduler.add(seq)
    outs = [step(scheduler) for _ in range(3)]
    assert [(s.loop, s.final_loop, s.sample) for o in outs for s in o.scheduled] == [
        (0, False, False), (1, False, False), (2, True, True)]
    assert seq.num_computed_tokens == 3 and seq.output_token_ids == [5]
    assert [s.num_tokens for o in outs for s in o.scheduled] == [3, 3, 3]


def test_one_chunk_per_sequence_inside_the_stack_and_budget_for_new_work():
    scheduler = loop_scheduler(max_num_batched_tokens=8)
    long, short = Sequence(list(range(12)), SamplingParams(max_new_tokens=1)), Sequence([1, 2], SamplingParams(max_new_tokens=1))
    scheduler.add(long)
    scheduler.add(short)
    first = step(scheduler)
    assert [(s.seq is long, s.num_tokens) for s in first.scheduled] == [(True, 8)]
    second = step(scheduler)  # long's chunk continues (8 tokens): no budget left; no second chunk of long
    assert [(s.seq is long, s.loop) for s in second.scheduled] == [(True, 1)]


def test_preempting_a_sequence_inside_the_stack_drops_its_chunk():
    scheduler = loop_scheduler()
    seq = Sequence([1, 2, 3])
    scheduler.add(seq)
    step(scheduler)
    out = scheduler.schedule()
    assert [s.loop for s in out.scheduled] == [1]
    scheduler.running.remove(seq)  # as _make_room does before preempting
    scheduler._preempt(seq, out)
    assert seq.seq_id not in scheduler.in_flight and out.scheduled == [] and seq.num_computed_tokens == 0
    scheduler.update(out, RunnerOutput())
    assert [(s.loop, s.start_position) for s in scheduler.schedule().scheduled] == [(0, 0)]


def test_abort_inside_the_stack_and_no_decode_windows():
    scheduler = loop_scheduler(num_decode_steps=8)
    seq = Sequence([1, 2], SamplingParams(max_new_tokens=4))
    scheduler.add(seq)
    for _ in range(5):  # the prompt's chunk leaves after step 3; the first decode is inside the stack
        assert step(scheduler).num_steps == 1
    assert seq.seq_id in scheduler.in_flight
    scheduler.abort(seq.seq_id)
    assert not scheduler.in_flight and not scheduler.has_unfinished()


def test_lockstep_ignores_loops():
    scheduler = Scheduler(dataclasses.replace(EngineConfig(num_pages=8, max_model_len=64)), num_loops=3)
    scheduler.add(Sequence([1, 2, 3]))
    assert [(s.final_loop, s.sample) for s in scheduler.schedule().scheduled] == [(True, True)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    def test_depthwise_on_the_triton_kernels_gives_the_lockstep_tokens(self, relaxed):
        """Depth-wise steps through the Triton attention, KV write and segmented LoRA kernels (float32)."""
        cuda = fxforge.optimize(relaxed, passes=[Lower(backend="triton")])
        cuda.module.to("cuda")
        lockstep = generate(engine(cuda, "lockstep", use_cuda_graphs=False), prompts())
        assert generate(engine(cuda, "depthwise"), prompts()) == lockstep
        assert lockstep == relaxed.generate(prompts(), max_new_tokens=MAX_NEW)



def test_cli_run_serves_a_tied_artifact_depthwise(tmp_path):
    from typer.testing import CliRunner

    from fxforge.cli import app
    from tests.fxforge.test_recover import write_checkpoint

    runner = CliRunner()
    source = write_checkpoint(tmp_path / "hf")
    for name, passes in (("tied", ["--passes", "layer-tying", "--option", "loops=2"]), ("plain", ["--passes", ""])):
        done = runner.invoke(app, ["compile", str(source), "--random-init", *passes, "--no-eval", "-o", str(tmp_path / name)])
        assert done.exit_code == 0, done.output
    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text('{"prompt": "Tom has 3 apples."}\n{"prompt": "How many?"}\n')
    args = ["--prompts", str(prompts_file), "--max-new-tokens", "3", "--loop-policy", "depthwise"]
    done = runner.invoke(app, ["run", str(tmp_path / "tied"), "--out", str(tmp_path / "r.jsonl"), *args])
    assert done.exit_code == 0, done.output
    assert [json.loads(line)["tokens"] for line in (tmp_path / "r.jsonl").read_text().splitlines()] == [3, 3]
    done = runner.invoke(app, ["run", str(tmp_path / "plain"), "--out", str(tmp_path / "plain.jsonl"), *args])
    assert done.exit_code == 2 and "needs a layer-tied model" in done.output
    assert not (tmp_path / "plain.jsonl").exists()
