"""Shared fixtures: tiny random-init models of each family (fast, CPU, fp32)."""

import pytest
import torch

from fxforge.ir.model import Model
from fxforge.ir.spec import ModelSpec

TINY = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=32, rope_theta=10000.0, max_position_embeddings=512)

TINY_SPECS = {
    "llama-gqa": ModelSpec(family="llama", **TINY),
    "llama-mqa-tied": ModelSpec(family="llama", **{**TINY, "num_kv_heads": 1}, tie_word_embeddings=True),
    "llama-interleaved": ModelSpec(family="llama", **TINY, rope_interleaved=True),
    "qwen2-bias": ModelSpec(family="qwen2", **TINY, attention_bias=True),
    "qwen3-qknorm": ModelSpec(family="qwen3", **TINY, qk_norm=True),
    "mixtral-moe": ModelSpec(family="mixtral", **TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48),
}


def tiny_model(kind: str = "llama-gqa", seed: int = 0, dtype=torch.float32) -> Model:
    model = Model.from_state_dict(TINY_SPECS[kind], None, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 2)
    for name, param in model.module.named_parameters():
        if name.endswith(".bias"):  # non-zero biases, so permuting them is really tested
            param.data = 0.1 * torch.randn(param.shape, generator=gen).to(dtype)
    for layer in model.module.layers:  # a few outlier channels in W_k, as real models have
        layer.attn.k_proj.weight.data[[3, 17, 29]] *= 8.0
    if TINY_SPECS[kind].qk_norm:  # make the per-head norms non-trivial
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in model.module.layers:
            for norm in (layer.attn.q_norm, layer.attn.k_norm):
                norm.weight.data = 1 + 0.3 * torch.randn(norm.weight.shape, generator=gen)
    return model


@pytest.fixture(params=list(TINY_SPECS), ids=list(TINY_SPECS))
def any_tiny_model(request):
    return tiny_model(request.param)


@pytest.fixture
def example_passes():
    """Registers the passes of tests/passes/example_passes.py for one test, and removes them after."""
    from fxforge.passes.manager import register_pass, unregister_pass
    from tests.passes.example_passes import EXAMPLE_PASSES

    for name, (config_type, fn, options) in EXAMPLE_PASSES.items():
        register_pass(name, config_type, **options)(fn)
    yield EXAMPLE_PASSES
    for name in EXAMPLE_PASSES:
        unregister_pass(name)


@pytest.fixture
def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(7))
