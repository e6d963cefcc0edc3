"""ir/training.py: the differentiable forward equals the inference forward, and gradients reach the
parameters recovery trains (tied blocks and per-depth LoRA)."""

import torch

import fxforge
from fxforge.ir.training import causal_logits
from fxforge.passes import LayerTying, Lower
from tests.passes.test_layer_tying import deep_model


def test_equals_the_inference_forward(any_tiny_model, tokens):
    with torch.no_grad():
        dense = causal_logits(any_tiny_model.module, any_tiny_model.spec, tokens)
    torch.testing.assert_close(dense, any_tiny_model.logits(tokens), rtol=0, atol=2e-5)


def test_equals_a_tied_relaxed_lowered_graph(tokens):
    opt = fxforge.optimize(deep_model(), passes=[LayerTying(unique_layers=3, init="average", rank=5), Lower()])
    with torch.no_grad():
        dense = causal_logits(opt.module, opt.spec, tokens % 97)
    torch.testing.assert_close(dense, opt.logits(tokens % 97), rtol=0, atol=2e-5)


def test_gradients_reach_shared_blocks_and_every_lora_slot(tokens):
    opt = fxforge.optimize(deep_model(), passes=[LayerTying(unique_layers=2, rank=3)])
    logits = causal_logits(opt.module, opt.spec, tokens % 97)
    logits.logsumexp(-1).mean().backward()
    shared = opt.module.get_submodule("layers.0.attn.q_proj").weight
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    b_grad = opt.module.lora.down_proj.B.grad
    assert b_grad is not None and bool((b_grad.flatten(1).abs().sum(1) > 0).all()), "a depth's LoRA got no gradient"


def test_sliding_window_equals_the_inference_forward(tokens):
    import dataclasses

    from fxforge.ir.model import Model
    from tests.conftest import TINY_SPECS

    model = Model.from_state_dict(dataclasses.replace(TINY_SPECS["llama-gqa"], family="mistral", sliding_window=5), None)
    with torch.no_grad():
        dense = causal_logits(model.module, model.spec, tokens)
    torch.testing.assert_close(dense, model.logits(tokens), rtol=0, atol=2e-5)
    full = Model.from_state_dict(TINY_SPECS["llama-gqa"], None)
    assert not torch.allclose(full.logits(tokens), model.logits(tokens), atol=1e-3), "the window changed nothing"
