"""passes/skip_decode.py and ir/skip.py: schedule invariants (bounds, monotone, valid KV over long
generations), the graph and plan.json carry the schedule, the reference forward (full depth equals the
model, per-token depths equal per-depth runs, KV never read where a token skipped it), bad input."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fxforge
from fxforge.artifact import load_artifact
from fxforge.cli import app
from fxforge.errors import PassConfigError
from fxforge.ir import nodes_by_role
from fxforge.ir.model import Model, build_batch
from fxforge.ir.skip import SkipModel, build_schedule, missing_kv, skip_greedy, skip_schedule
from fxforge.passes import LayerTying, Lower, SkipDecode
from tests.conftest import TINY_SPECS

SPEC = dataclasses.replace(TINY_SPECS["llama-gqa"], num_layers=6, eos_token_ids=())


def deep_model(seed: int = 0) -> Model:
    return Model.from_state_dict(SPEC, None, seed=seed)


def prompts(lengths=(5, 11, 3)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, SPEC.vocab_size, (n,), generator=gen).tolist() for n in lengths]


# -- the schedule ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", ["linear", "step"])
@pytest.mark.parametrize("layers,warmup,low,high,span", [(30, 1, 6, 29, 256), (30, 2, 3, 12, 64), (6, 0, 1, 6, 9),
                                                         (6, 1, 5, 5, 1)])
def test_schedule_invariants(decay, layers, warmup, low, high, span):
    schedule = SkipDecode(min_layers=low, max_layers=high, warmup_layers=warmup, decay=decay, span=span).plan(layers)
    a = [schedule.top(t) for t in range(3 * span + 5)]
    assert a[0] == high and a[-1] == low and all(x >= y for x, y in zip(a, a[1:]))
    assert all(low <= x <= high for x in a)
    assert missing_kv(schedule, prompt_len=7, generated=3 * span) is None
    for t in (0, span // 2, 5 * span):  # warm-up plus the top a(t): the skipped layers are the lower/middle ones
        layers_run = schedule.layers_at_depth(schedule.depth(t))
        assert layers_run == list(range(warmup)) + list(range(layers - schedule.top(t), layers))
    assert schedule.layers_at_depth(layers) == list(range(layers))


def test_linear_decay_is_the_papers_line():
    schedule = SkipDecode(min_layers=4, max_layers=20, warmup_layers=1, span=5).plan(24)
    assert schedule.top_layers == (20, 16, 12, 8, 4, 4)
    assert schedule.mean_depth() == pytest.approx(1 + 12) and schedule.speedup() == pytest.approx(24 / 13)


def test_step_decay_has_as_many_depths_as_levels():
    schedule = SkipDecode(min_layers=2, max_layers=26, warmup_layers=1, decay="step", levels=4, span=8).plan(30)
    assert schedule.top_layers == (26, 26, 18, 18, 10, 10, 2, 2, 2) and len(schedule.depths()) == 4
    assert SkipDecode(target_speedup=2.0, decay="step", levels=3, span=90).plan(30).speedup() == pytest.approx(2, rel=0.03)


@pytest.mark.parametrize("target", [1.5, 2.0, 3.0])
def test_target_speedup_becomes_min_and_max(target):
    schedule = SkipDecode(target_speedup=target).plan(30)
    assert schedule.speedup() == pytest.approx(target, rel=0.03)
    assert 1 <= schedule.min_layers < schedule.max_layers <= 29


def test_missing_kv_finds_a_rising_schedule():
    rising = dataclasses.replace(build_schedule(6, 0, 2, 5, "linear", 4), top_layers=(2, 3, 3))
    assert missing_kv(rising, prompt_len=2, generated=4) == (3, 3, 2)  # layer 3, position 3, skipped by position 2


# -- the pass ---------------------------------------------------------------------------------------------

def test_graph_and_plan_carry_the_schedule(tmp_path):
    model = deep_model()
    opt = fxforge.optimize(model, passes=[SkipDecode(target_speedup=1.5, warmup_layers=1, span=8)])
    schedule = skip_schedule(opt)
    record = opt.passes[-1]
    assert record["modified"] and record["config"]["target_speedup"] == 0  # resolved: min/max recorded
    config = record["config"]
    assert (config["min_layers"], config["max_layers"]) == (schedule.min_layers, schedule.max_layers)
    assert record["report"]["top_layers"] == list(schedule.top_layers) and record["report"]["target_speedup"] == 1.5
    notes = [n.meta["fxforge"].notes["skip_decode"]["runs_until"] for n in nodes_by_role(opt.module, "attention")]
    assert notes[0] == "always" and notes[-schedule.min_layers:] == ["always"] * schedule.min_layers
    assert all(isinstance(x, int) for x in notes[1:-schedule.min_layers])
    ids = torch.randint(0, SPEC.vocab_size, (1, 9))
    assert torch.equal(opt.logits(ids), model.logits(ids))  # the weights and the full forward are untouched
    opt.save(tmp_path / "art")
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())
    assert plan["passes"][-1]["report"]["top_layers"] == list(schedule.top_layers)
    assert skip_schedule(load_artifact(tmp_path / "art")) == schedule


def test_full_schedule_changes_nothing():
    opt = fxforge.optimize(deep_model(), passes=[SkipDecode(min_layers=6, warmup_layers=0)])
    assert not opt.passes[-1]["modified"] and skip_schedule(opt).speedup() == 1


@pytest.mark.parametrize("options,message", [
    (dict(min_layers=4, max_layers=3), "min_layers=4 is larger than max_layers=3"),
    (dict(min_layers=1, warmup_layers=6), "warmup_layers=6 leaves no layer to skip"),
    (dict(min_layers=1, max_layers=6, warmup_layers=1), "max_layers=6 exceeds the 5 layers"),
    (dict(schedule=(3, 4, 2), decay="custom"), "KV"),
    (dict(min_layers=2, target_speedup=2.0), "exactly one of"),
    (dict(target_speedup=5.9, warmup_layers=1), "fewer than the 1 warm-up"),
    (dict(min_layers=1, decay="cubic"), "expected one of"),
    (dict(min_layers=1, levels=4), "differs from 2 only for decay 'step'"),
])
def test_bad_input_fails_before_any_pass_runs(options, message):
    model = deep_model()
    with pytest.raises(PassConfigError, match=message):
        fxforge.optimize(model, passes=[{"name": "skip-decode", **options}, Lower(backend="torch")])


def test_runs_once():
    once = fxforge.optimize(deep_model(), passes=[SkipDecode(min_layers=2)])
    with pytest.raises(PassConfigError, match="runs once"):
        fxforge.optimize(once, passes=[SkipDecode(min_layers=3)])


def test_cli_bad_schedule_exits_2_and_writes_nothing(tmp_path):
    from tests.fxforge.test_recover import write_checkpoint

    source = write_checkpoint(tmp_path / "hf")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compile", str(source), "--random-init", "--passes", "skip-decode", "--option",
                                      "min_layers=3", "--option", "max_layers=2", "--no-eval", "-o", str(out)])
    assert result.exit_code == 2 and "min_layers=3 is larger than max_layers=2" in result.output, result.output
    assert not out.exists()


# -- the reference forward ---------------------------------------------------------------------------------

def test_min_equal_max_equal_n_is_the_full_model():
    model = deep_model()
    opt = fxforge.optimize(model, passes=[SkipDecode(min_layers=6, max_layers=6, warmup_layers=0)])
    assert skip_greedy(opt, prompts(), 12) == model.generate(prompts(), 12)
    skip = SkipModel(opt)
    batch = build_batch(prompts(), [0, 0, 0], [[0], [1], [2]], 16, "cpu", all_logits=True)
    cache_a, cache_b = model.new_kv_cache(3), model.new_kv_cache(3)
    torch.testing.assert_close(skip.forward_depth(batch, cache_a, 6), model.forward(batch, cache_b), rtol=0, atol=0)


def test_skipping_changes_the_tokens():
    opt = fxforge.optimize(deep_model(), passes=[SkipDecode(min_layers=1, max_layers=3, warmup_layers=1, span=4)])
    assert skip_greedy(opt, prompts(), 12) != deep_model().generate(prompts(), 12)


def _poisoned(model):
    """new_kv_cache whose every slot holds NaN until written: reading KV nobody wrote poisons the logits."""
    plain = model.new_kv_cache

    def new_kv_cache(*args, **kwargs):
        return [t.fill_(float("nan")) if t.is_floating_point() else t for t in plain(*args, **kwargs)]

    return new_kv_cache


def test_kv_is_valid_over_long_generations():
    opt = fxforge.optimize(deep_model(), passes=[SkipDecode(min_layers=1, max_layers=5, warmup_layers=1, span=60)])
    opt.new_kv_cache = _poisoned(opt)
    outputs = skip_greedy(opt, prompts((4, 17)), 150)  # argmax of NaN logits would be token 0 from the first NaN on
    assert [len(o) for o in outputs] == [150, 150]
    skip, schedule = SkipModel(opt), skip_schedule(opt)
    cache = opt.new_kv_cache(4)
    prompt = prompts((9,))[0]
    logits = skip.forward_depth(build_batch([prompt], [0], [[0, 1, 2, 3]], 16, "cpu"), cache, 6)
    assert torch.isfinite(logits).all()
    for t, token in enumerate([5, 7, 9, 11]):  # late in the schedule: layers 1..3 skipped, finite
        batch = build_batch([[token]], [9 + t], [[0, 1, 2, 3]], 16, "cpu")
        assert torch.isfinite(skip.forward_depth(batch, cache, schedule.depth(100 + t))).all()
    rising = build_batch([[3]], [13], [[0, 1, 2, 3]], 16, "cpu")  # a deeper token than the one before: NaN
    assert not torch.isfinite(skip.forward_depth(rising, cache, 6)).all()


def test_per_token_depths_equal_per_depth_runs():
    opt = fxforge.optimize(deep_model(), passes=[SkipDecode(min_layers=1, max_layers=5, warmup_layers=1, span=8)])
    skip = SkipModel(opt)
    chunks, past = [[4, 5, 6, 7], [8], [9], [10, 11]], [0, 6, 3, 12]
    tables = [[0], [1], [2], [3]]
    depths = np.array([6, 6, 4, 3, 5, 2, 6, 6])  # per token; every chunk's depths fall
    cache = opt.new_kv_cache(4)
    for row in range(4):  # some context in every page
        context = build_batch([list(range(1, 1 + max(past[row], 1)))], [0], [tables[row]], 16, "cpu")
        skip.forward_depth(context, cache, 6)
    reference = [c.clone() for c in cache]
    batch = build_batch(chunks, past, tables, 16, "cpu", all_logits=True)
    mixed = skip.forward(batch, cache, depths, np.array(past), np.array([4, 1, 1, 2]))
    begin, expected = 0, []
    for chunk, start, table in zip(chunks, past, tables):  # token by token at its own depth
        for j, token in enumerate(chunk):
            one = build_batch([[token]], [start + j], [table], 16, "cpu")
            expected.append(skip.forward_depth(one, reference, int(depths[begin]))[0])
            begin += 1
    torch.testing.assert_close(mixed, torch.stack(expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="depths must not rise"):
        skip.forward(batch, cache, np.array([3, 6, 6, 6, 6, 6, 6, 6]), np.array(past), np.array([4, 1, 1, 2]))


def test_lowered_and_tied_graphs_split():
    ids = prompts((7,))
    for passes in ([Lower(backend="torch")], [LayerTying(unique_layers=3, rank=4)]):
        opt = fxforge.optimize(deep_model(), passes=passes + [SkipDecode(min_layers=6, warmup_layers=0)])
        assert skip_greedy(opt, ids, 6) == opt.generate(ids, 6)


def test_training_forward_equals_the_served_depths():
    """The differentiable forward under the schedule (recovery's student) equals the inference forward
    teacher-forced with each token at its depth (prompt at full depth)."""
    from fxforge.ir.skip import skip_causal_logits

    opt = fxforge.optimize(deep_model(), passes=[SkipDecode(min_layers=1, max_layers=5, warmup_layers=1, span=6)])
    ids = torch.randint(0, SPEC.vocab_size, (2, 20), generator=torch.Generator().manual_seed(9))
    trained = skip_causal_logits(opt.module, SPEC, skip_schedule(opt), ids, prompt_len=7)
    skip = SkipModel(opt)
    for row in range(2):
        batch = build_batch([ids[row].tolist()], [0], [[0, 1]], 16, "cpu", all_logits=True)
        depths = skip_schedule(opt).token_depths(np.arange(20), 7)
        served = skip.forward(batch, opt.new_kv_cache(2), depths, np.array([0]), np.array([20]))
        torch.testing.assert_close(trained[row], served, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(trained, opt.logits(ids), atol=1e-3)  # the schedule did skip layers
