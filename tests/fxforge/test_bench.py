"""fxforge/bench.py on CPU: the MoE roofline counts only the experts routed to, the HF peer of a named
shape is the same architecture, the HF run falls back from the static to the dynamic cache and says
so, and `fxforge bench moe` refuses to start without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from fxforge.bench import expert_weight_bytes, hf_from_spec, roofline_bytes, run_hf_best, weight_bytes
from fxforge.cli import app
from fxforge.ir.importers.hf import spec_from_hf_config
from fxforge.ir.importers.named import NAMED_SHAPES
from fxforge.runtime.engine import EngineStats
from tests.conftest import TINY_SPECS, tiny_model

transformers = pytest.importorskip("transformers")

SPEC_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
               "rms_norm_eps", "qk_norm", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")


def small(name: str):
    """A named shape cut down to run on a CPU, every other fact kept."""
    spec = NAMED_SHAPES[name]
    return dataclasses.replace(spec, num_layers=2, vocab_size=300, hidden_size=64, num_heads=4, num_kv_heads=2,
                               head_dim=16, intermediate_size=96, moe_intermediate_size=32 if spec.is_moe else 0,
                               num_experts=min(spec.num_experts, 16))


def test_moe_roofline_counts_only_the_experts_routed_to():
    model = tiny_model("mixtral-moe")
    spec = model.spec
    experts = expert_weight_bytes(model)
    assert experts == spec.num_layers * 3 * spec.num_experts * spec.hidden_size * spec.moe_intermediate_size * 4
    stats = EngineStats(forward_passes=10, kv_tokens_read=100)
    passes = torch.zeros(spec.num_layers, spec.num_experts, dtype=torch.int64)
    passes[:, :2] = 10  # two of the four experts of every layer got tokens in every pass
    dense = weight_bytes(model) - experts
    kv = 100 * model.kv_bytes_per_token()
    assert roofline_bytes(model, stats, passes) == 10 * dense + 10 * experts // 2 + kv
    assert roofline_bytes(model, stats, None) == 10 * weight_bytes(model) + kv  # dense accounting


@pytest.mark.parametrize("name, cls", [("mixtral-8x7b", "MixtralForCausalLM"), ("qwen3-30b-a3b", "Qwen3MoeForCausalLM"),
                                       ("llama-3-8b", "LlamaForCausalLM")])
def test_hf_peer_is_the_same_architecture(name, cls):
    spec = small(name)
    hf = hf_from_spec(spec, torch.bfloat16, "cpu")
    assert type(hf).__name__ == cls and next(hf.parameters()).dtype == torch.bfloat16
    back = spec_from_hf_config(hf.config, cls)
    assert {f: getattr(back, f) for f in SPEC_FIELDS} == {f: getattr(spec, f) for f in SPEC_FIELDS}


def test_hf_run_falls_back_to_the_dynamic_cache_and_records_why(monkeypatch):
    hf = hf_from_spec(TINY_SPECS["mixtral-moe"], torch.float32, "cpu")
    generate = hf.generate

    def no_static_cache(*args, **kwargs):
        if kwargs["cache_implementation"] == "static":
            raise RuntimeError("static cache cannot compile this model\nsecond line")
        return generate(*args, **kwargs)

    monkeypatch.setattr(hf, "generate", no_static_cache)
    prompts = [[5, 6, 7], [8, 9], [1, 2, 3], [4]]
    result = run_hf_best(hf, prompts, max_new_tokens=3, batch_size=2, pad_id=0, repeats=1)
    assert (result.name, result.cache, result.tokens) == ("hf-dynamic-b2", "dynamic", 4 * 3)
    assert result.static_cache_error == "RuntimeError: static cache cannot compile this model"
    assert result.experts_implementation == hf.config._experts_implementation


def test_bench_moe_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(app, ["bench", "moe", "--tokens", "1"])
    assert result.exit_code == 2 and "error: fxforge bench moe needs a CUDA device" in result.output
