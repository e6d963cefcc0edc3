"""The engine on MoE models: greedy tokens equal the reference forward's (fp32) with decode windows and
single steps, the runner tallies the experts each model step routed to, CUDA graphs are chosen only
when the experts are bound to Triton; on CUDA (gpu marker) decode replays captured graphs."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

import fxforge
from fxforge.runtime.engine import Engine, config_for_model
from fxforge.runtime.sequence import SamplingParams
from tests.conftest import TINY_SPECS, tiny_model
from tests.ir.test_moe import KINDS, moe_model


def prompts(n: int, seed: int, max_len: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(257) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_equal_the_reference_with_windows_and_single_steps(kind):
    model, batch = moe_model(kind), prompts(5, seed=4)
    expected = model.generate(batch, max_new_tokens=10)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    stats = {}
    for k in (1, 8):
        engine = Engine(model, num_pages=64, page_size=8, max_num_batched_tokens=24, num_decode_steps=k)
        assert [o.token_ids for o in engine.generate(batch, params)] == expected, f"{kind}, {k} decode steps per sync"
        stats[k] = engine.stats
    assert stats[8].forward_passes > stats[8].steps, "no decode window ran"
    assert stats[1].forward_passes == stats[1].steps


def test_runner_tallies_the_experts_of_every_model_step():
    """One sequence: its prefill routes to some experts, each of its decode steps (windowed or not) to
    exactly top_k of them, and the runner counts each step once."""
    model, prompt, new_tokens = moe_model("qwen3-moe"), prompts(1, seed=8, max_len=12)[0], 7
    model.logits(torch.tensor(prompt))
    prefill_hits = (model.expert_counts() > 0).sum(1)
    for k in (1, 4):
        engine = Engine(model, num_pages=16, page_size=8, num_decode_steps=k)
        engine.generate([prompt], SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        passes = engine.runner.expert_passes
        assert passes.dtype == torch.int64 and passes.shape == (model.spec.num_layers, model.spec.num_experts)
        expected = prefill_hits + (new_tokens - 1) * model.spec.num_experts_per_tok
        assert passes.sum(1).tolist() == expected.tolist(), f"{k} decode steps per sync"
    assert Engine(tiny_model("llama-gqa"), num_pages=4).runner.expert_passes is None


@pytest.mark.parametrize("bindings, graphs", [
    ({"attention": "triton", "moe": "triton"}, True),
    ({"attention": "triton", "moe": "reference"}, False),  # the reference reads routing back: not capturable
    ({"attention": "triton"}, True),
    ({"attention": "reference", "moe": "triton"}, False),
], ids=["moe-triton", "moe-reference", "dense", "attention-reference"])
def test_cuda_graphs_by_default_only_when_the_experts_are_bound_to_triton(bindings, graphs):
    model = SimpleNamespace(spec=TINY_SPECS["mixtral-moe"], device=torch.device("cuda"),
                            kernel_bindings=lambda: bindings)
    assert config_for_model(model, num_pages=8).use_cuda_graphs is graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_decode_replays_with_moe(kind, monkeypatch):
    """Lowered MoE models capture their decode graphs (no eager fallback), replay them in windows and
    single steps, give the reference greedy tokens (fp32) and refresh the expert tally."""
    model = moe_model(kind)
    lowered = fxforge.optimize(model, passes=[{"name": "lower", "backend": "triton"}])
    batch = prompts(12, seed=5)
    reference = model.generate(batch, max_new_tokens=12)  # before .cuda(), which moves the weights it shares
    lowered.module.cuda()
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    for k in (1, 6):
        engine = Engine(lowered, num_pages=256, page_size=16, max_num_seqs=8, num_decode_steps=k)
        assert engine.runner.graphs and engine.runner.graph_error is None, engine.runner.graph_error
        replays.clear()
        outputs = engine.generate(batch, SamplingParams(max_new_tokens=12, ignore_eos=True))
        assert [o.token_ids for o in outputs] == reference, f"{kind}, {k} decode steps per sync"
        assert replays, "decode steps ran eagerly"
        assert int(engine.runner.expert_passes.sum()) >= engine.stats.forward_passes * model.spec.num_layers
