"""runtime/skip_runner.py: both SkipDecode policies give the reference decoder's tokens (ir/skip.py
skip_greedy) under continuous batching (mixed prompt lengths, staggered arrivals so rows sit at
different generated positions, decode windows, preemption and recompute), full depth equals the
model, the KV accounting, and bad combinations."""

import dataclasses

import pytest
import torch

import fxforge
from fxforge.ir.model import Model
from fxforge.ir.skip import skip_greedy
from fxforge.passes import SkipDecode
from fxforge.runtime.config import EngineConfig
from fxforge.runtime.engine import Engine
from fxforge.runtime.sequence import SamplingParams
from fxforge.runtime.skip_runner import SkipRunner
from tests.conftest import TINY_SPECS

SPEC = dataclasses.replace(TINY_SPECS["llama-gqa"], num_layers=5, eos_token_ids=())
LENGTHS = (3, 9, 17, 5, 12)
NEW_TOKENS = (14, 9, 11, 16, 6)


@pytest.fixture(scope="module")
def skipped():
    model = Model.from_state_dict(SPEC, None, seed=1)
    return fxforge.optimize(model, passes=[SkipDecode(min_layers=1, max_layers=4, warmup_layers=1, span=8)])


@pytest.fixture(scope="module")
def reference(skipped):
    longest = max(NEW_TOKENS)  # the spec has no EOS: every output runs to its max_new_tokens
    tokens = [out[:n] for out, n in zip(skip_greedy(skipped, prompts(), longest), NEW_TOKENS)]
    full = [out[:n] for out, n in zip(skipped.generate(prompts(), longest), NEW_TOKENS)]
    assert all(a != b for a, b in zip(tokens, full))  # skipping shows in every output
    return tokens


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(0, SPEC.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]


def staggered(engine: Engine) -> list[list[int]]:
    """Two requests first, the others arriving while they decode (rows at different t share steps)."""
    seqs = {}
    for i in (0, 1):
        seqs[i] = engine.add_request(prompts()[i], SamplingParams(max_new_tokens=NEW_TOKENS[i]))
    for step in range(60):
        if step in (2, 5, 6):
            i = {2: 2, 5: 3, 6: 4}[step]
            seqs[i] = engine.add_request(prompts()[i], SamplingParams(max_new_tokens=NEW_TOKENS[i]))
        if not engine.scheduler.has_unfinished() and len(seqs) == 5:
            break
        engine.step()
    return [seqs[i].output_token_ids for i in range(5)]


@pytest.mark.parametrize("decode_steps", [1, 4], ids=["single-step", "window-4"])
@pytest.mark.parametrize("policy", ["bucket", "mask"])
def test_policies_give_the_reference_tokens(skipped, reference, policy, decode_steps):
    engine = Engine(skipped, config=EngineConfig(num_pages=64, page_size=4, max_model_len=64, max_num_seqs=8,
                                                 max_num_batched_tokens=16, num_decode_steps=decode_steps,
                                                 skip_policy=policy))
    assert isinstance(engine.runner, SkipRunner)
    assert staggered(engine) == reference
    assert 0 < engine.runner.kv_saving() < 1  # skipped layers left reserved slots unwritten
    if decode_steps == 1:  # no scratch rows: the count follows from the schedule alone
        schedule, layers = skipped.module.meta["skip_decode"], SPEC.num_layers
        reserved = sum(p + n - 1 for p, n in zip(LENGTHS, NEW_TOKENS))
        written = sum(p * layers + sum(schedule.depth(t) for t in range(n - 1)) for p, n in zip(LENGTHS, NEW_TOKENS))
        assert engine.runner.kv_saving() == pytest.approx(1 - written / (reserved * layers))


@pytest.mark.parametrize("policy", ["bucket", "mask"])
def test_preemption_recomputes_at_each_tokens_depth(skipped, reference, policy):
    """A pool too small for every sequence: preempted sequences recompute prompt and generated tokens in
    one chunk, each token at its own depth, and still give the reference tokens."""
    engine = Engine(skipped, config=EngineConfig(num_pages=10, page_size=4, max_model_len=40, max_num_seqs=5,
                                                 max_num_batched_tokens=64, num_decode_steps=1, skip_policy=policy))
    outputs = engine.generate(prompts(), [SamplingParams(max_new_tokens=n) for n in NEW_TOKENS])
    assert engine.stats.preemptions > 0
    assert [o.token_ids for o in outputs] == reference


def test_full_depth_schedule_equals_the_model():
    model = Model.from_state_dict(SPEC, None, seed=2)
    full = fxforge.optimize(model, passes=[SkipDecode(min_layers=5, warmup_layers=0)])
    params = [SamplingParams(max_new_tokens=n) for n in NEW_TOKENS]
    config = EngineConfig(num_pages=64, page_size=4, max_model_len=64, max_num_batched_tokens=16, num_decode_steps=3)
    expected = [o.token_ids for o in Engine(model, config=config).generate(prompts(), params)]
    for policy in ("bucket", "mask"):
        engine = Engine(full, config=dataclasses.replace(config, skip_policy=policy))
        assert [o.token_ids for o in engine.generate(prompts(), params)] == expected
        assert engine.runner.kv_saving() == 0


@pytest.mark.parametrize("policy", ["bucket", "mask"])
def test_moe_models_skip_too(policy):
    spec = dataclasses.replace(TINY_SPECS["mixtral-moe"], num_layers=3, eos_token_ids=())
    model = fxforge.optimize(Model.from_state_dict(spec, None, seed=0),
                             passes=[SkipDecode(min_layers=1, warmup_layers=1, span=3)])
    engine = Engine(model, config=EngineConfig(num_pages=32, page_size=4, max_model_len=32, skip_policy=policy))
    outputs = engine.generate(prompts()[:3], SamplingParams(max_new_tokens=6))
    assert [o.token_ids for o in outputs] == skip_greedy(model, prompts()[:3], 6)


def test_full_policy_ignores_the_schedule(skipped):
    config = EngineConfig(num_pages=64, page_size=4, max_model_len=64, skip_policy="full")
    engine = Engine(skipped, config=config)
    assert type(engine.runner).__name__ == "ModelRunner"
    tokens = engine.generate(prompts()[:2], SamplingParams(max_new_tokens=6))
    assert [t.token_ids for t in tokens] == skipped.generate(prompts()[:2], 6)


def test_bad_settings(skipped):
    with pytest.raises(ValueError, match="skip_policy must be one of"):
        EngineConfig(skip_policy="exit")
    with pytest.raises(ValueError, match="cannot be served depth-wise"):
        Engine(skipped, config=EngineConfig(num_pages=8, loop_policy="depthwise"))
    with pytest.raises(ValueError, match="needs a model compiled with the skip-decode pass"):
        SkipRunner(Model.from_state_dict(SPEC, None), EngineConfig(num_pages=8))


def test_cli_run_serves_a_skip_decode_artifact(tmp_path):
    import json

    from typer.testing import CliRunner

    from fxforge.cli import app
    from tests.fxforge.test_recover import write_checkpoint

    runner = CliRunner()
    source = write_checkpoint(tmp_path / "hf")
    done = runner.invoke(app, ["compile", str(source), "--random-init", "--passes", "skip-decode", "--option",
                               "target_speedup=2", "--option", "warmup_layers=0", "--no-eval",
                               "-o", str(tmp_path / "s")])
    assert done.exit_code == 0, done.output
    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text('{"prompt": "Tom has 3 apples."}\n{"prompt": "How many?"}\n')
    lines = {}
    for policy in ("bucket", "mask"):
        args = ["run", str(tmp_path / "s"), "--prompts", str(prompts_file), "--out", str(tmp_path / f"{policy}.jsonl"),
                "--max-new-tokens", "5", "--skip-policy", policy]
        done = runner.invoke(app, args)
        assert done.exit_code == 0, done.output
        lines[policy] = [json.loads(line)["output"] for line in (tmp_path / f"{policy}.jsonl").read_text().splitlines()]
    assert lines["bucket"] == lines["mask"] and len(lines["bucket"]) == 2
    done = runner.invoke(app, ["run", str(tmp_path / "s"), "--prompts", str(prompts_file), "--out",
                               str(tmp_path / "x.jsonl"), "--skip-policy", "exit"])
    assert done.exit_code == 2 and "--skip-policy must be" in done.output and not (tmp_path / "x.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    def test_depth_graphs_on_the_triton_kernels_give_the_reference_tokens(self, skipped, reference):
        """Bucket policy replaying one CUDA graph per (depth, batch bucket) on the Triton kernels (float32),
        and mask policy on the same kernels, with full-size and smaller layer-group pools, against the CPU
        reference decoder."""
        from fxforge.passes import Lower

        cuda = fxforge.optimize(skipped, passes=[Lower(backend="triton")])
        cuda.module.to("cuda")
        for policy, graphs, fraction in (("bucket", True, 1.0), ("bucket", True, 0.4), ("mask", False, 0.4)):
            engine = Engine(cuda, config=EngineConfig(num_pages=64, page_size=4, max_model_len=64, max_num_seqs=8,
                                                      max_num_batched_tokens=16, num_decode_steps=4,
                                                      skip_policy=policy, use_cuda_graphs=graphs,
                                                      skip_kv_fraction=fraction))
            assert staggered(engine) == reference, policy
            if graphs:
                assert engine.runner.depth_graphs and engine.runner.graph_error is None


@pytest.mark.parametrize("policy", ["bucket", "mask"])
def test_smaller_group_pools_keep_the_tokens_and_save_kv_memory(skipped, reference, policy):
    """Skippable layers' caches at 40% of the main pool's pages: KV memory shrinks, the group pools fill
    and preempt, and the tokens are still the reference's."""
    config = EngineConfig(num_pages=24, page_size=4, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=16,
                          num_decode_steps=3, skip_policy=policy, skip_kv_fraction=0.4)
    engine = Engine(skipped, config=config)
    runner = engine.runner
    groups = runner.pool.groups
    assert groups and all(g.num_pages == 10 for g in groups)
    for layer, group in enumerate(runner.group_of_layer):  # each layer's cache has its pool's pages + scratch
        assert runner.kv_cache[4 * layer].shape[0] == (25 if group is None else 11)
    expected = 1 - sum(25 if g is None else 11 for g in runner.group_of_layer) / (25 * SPEC.num_layers)
    assert runner.kv_memory_saving() == pytest.approx(expected) and expected > 0.2
    peak = []
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts(), NEW_TOKENS)]
    while engine.scheduler.has_unfinished():
        engine.step()
        peak.append((engine.scheduler.pool.num_used_pages, max(engine.scheduler.pool.group_used_pages())))
    assert [s.output_token_ids for s in seqs] == reference
    assert engine.stats.preemptions > 0 and max(g for _, g in peak) <= 10
    assert any(g < m for m, g in peak)  # pages of layers past their horizon were never allocated
