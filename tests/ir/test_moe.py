"""The MoE block through fxforge::moe (ir/modules.py, ir/ops.py): logits equal the per-expert loop it
replaced, the graph reads nothing back to the host, the expert counts stay on the device and reach
the model's API, each optimised copy keeps its own counts, artifacts round-trip. On CUDA (gpu marker):
the Triton binding against the reference, and no host sync under torch's sync debug mode.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from torch._subclasses.fake_tensor import FakeTensorMode

import fxforge
from fxforge.artifact import load_artifact
from fxforge.ir.capture import capture, meta
from fxforge.ir.model import Model, build_batch
from fxforge.ir.modules import MoEExperts
from fxforge.ir.ops import MOE
from fxforge.ir.spec import ModelSpec
from fxforge.kernels.moe_bench import eager_moe
from fxforge.passes import KSort
from tests.conftest import TINY, TINY_SPECS, tiny_model

# Qwen3-MoE's block: fine-grained experts, top-k without renormalisation, QK-norm
QWEN3_MOE = ModelSpec(family="qwen3_moe", **TINY, qk_norm=True, num_experts=8, num_experts_per_tok=3,
                      moe_intermediate_size=32, norm_topk_prob=False)
KINDS = ["mixtral", "qwen3-moe"]


def moe_model(kind: str, dtype=torch.float32) -> Model:
    if kind == "mixtral":
        return tiny_model("mixtral-moe", dtype=dtype)
    model = Model.from_state_dict(QWEN3_MOE, None, dtype=dtype, seed=3)
    for layer in model.module.layers:  # a router that prefers some experts, so routing is not near-uniform
        layer.mlp.router.weight.data *= 20
    return model


def tokens(length: int = 29, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, length), generator=torch.Generator().manual_seed(seed))


def per_expert_loop(self, x, expert_ids, expert_weights):
    """MoEExperts.forward before the op: a host-synced loop over the experts that got tokens."""
    return eager_moe(x, self.w_gate, self.w_up, self.w_down, expert_weights, expert_ids)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_the_per_expert_loop(kind, monkeypatch):
    """fp32: the op's reference path (eager and captured + lowered) gives the loop's logits up to the
    order of the sum over slots."""
    model, ids = moe_model(kind), tokens()
    through_op = model.logits(ids)
    lowered = fxforge.optimize(model, passes=[{"name": "lower", "backend": "triton"}]).logits(ids)
    monkeypatch.setattr(MoEExperts, "forward", per_expert_loop)
    loop = model.logits(ids)
    for name, logits in (("eager", through_op), ("lowered", lowered)):
        torch.testing.assert_close(logits, loop, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kind} {name}: {m}")
        assert torch.equal(logits.argmax(-1), loop.argmax(-1)), f"{kind} {name}: greedy tokens differ"


def test_graph_holds_one_moe_op_per_layer_and_no_host_read():
    spec = TINY_SPECS["mixtral-moe"]
    gm = capture(tiny_model("mixtral-moe").module)
    moe_nodes = [n for n in gm.graph.nodes if n.target is MOE]
    assert [(meta(n).role, meta(n).layer) for n in moe_nodes] == [("expert", i) for i in range(spec.num_layers)]
    host_reads = [n.name for n in gm.graph.nodes if n.op == "call_method"
                  and n.target in ("tolist", "item", "unique", "nonzero", "cpu", "numpy")]
    assert host_reads == []


@pytest.mark.parametrize("experts_forward", ["op", "per_expert_loop"])
def test_forward_runs_on_fake_tensors_only_through_the_op(experts_forward, monkeypatch):
    """Fake tensors have no values: a forward that reads routing back to the host (what a CUDA graph
    cannot capture) fails under FakeTensorMode, one that keeps it on the device runs."""
    model = tiny_model("mixtral-moe")
    if experts_forward == "per_expert_loop":
        monkeypatch.setattr(MoEExperts, "forward", per_expert_loop)
    batch = build_batch([[3, 1, 4, 1, 5], [9, 2]], [0, 0], [[0], [1]], 16, "cpu")
    cache = model.new_kv_cache(2, 16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        if experts_forward == "op":
            assert model.module(*batch.args(), cache).shape == (2, TINY["vocab_size"])
        else:
            with pytest.raises(Exception, match="unique"):
                model.module(*batch.args(), cache)


@pytest.mark.parametrize("kind", KINDS)
def test_expert_counts_are_the_last_forward_routing(kind):
    """Model.expert_counts() [layers, E] holds, per layer, the pairs routed to each expert by the last
    forward pass, for the eager module and for a lowered graph (which has counts of its own)."""
    model, ids = moe_model(kind), tokens(length=11)
    lowered = fxforge.optimize(model, passes=["lower"])
    routed = []
    for layer in model.module.layers:  # after capture: tracing would run the hooks on proxies
        layer.mlp.experts.register_forward_pre_hook(lambda _, args: routed.append(args[1]))
    model.logits(ids)
    spec = model.spec
    expected = torch.stack([torch.bincount(r.reshape(-1), minlength=spec.num_experts) for r in routed]).int()
    counts = model.expert_counts()
    assert counts.dtype == torch.int32 and counts.shape == (spec.num_layers, spec.num_experts)
    assert torch.equal(counts, expected), f"{counts.tolist()} vs {expected.tolist()}"
    assert (counts.sum(1) == ids.numel() * spec.num_experts_per_tok).all()
    assert lowered.expert_counts().sum() == 0, "the lowered graph ran nothing yet; its counts are its own"
    lowered.logits(ids)
    assert torch.equal(lowered.expert_counts(), expected)
    assert tiny_model("llama-gqa").expert_counts() is None


def test_a_pass_that_runs_the_model_writes_only_its_copys_counts():
    """Calibrated KSort runs the graph it optimises: the copy-on-write guard lets it (the counts are
    runtime state, not weights) and the source model's counts stay untouched."""
    model = tiny_model("mixtral-moe")
    calib = tokens(length=64, seed=9).tolist()
    opt = fxforge.optimize(model, passes=[KSort(metric="calibrated", k_format="bfp12")], calib=calib)
    assert model.expert_counts().sum() == 0
    assert opt.expert_counts().sum() > 0


def test_lowered_moe_artifact_round_trip(tmp_path):
    """The plan records the MoE op's binding, the weights file holds no runtime state, and the
    reloaded model gives the same logits and counts."""
    model = tiny_model("mixtral-moe")
    lowered = fxforge.optimize(model, passes=[{"name": "lower", "backend": "triton"}])
    report = lowered.passes[-1]["report"]
    assert (report["cpu"]["moe"], report["cuda"]["moe"]) == ("fused_moe_ref", "fused_moe")
    lowered.save(tmp_path / "a")
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["kernel_bindings"]["moe"] == "triton"
    with safe_open(str(tmp_path / "a" / "weights.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "expert_counts" in k]
    restored = load_artifact(tmp_path / "a")
    ids = tokens()
    assert torch.equal(restored.logits(ids), lowered.logits(ids))
    assert torch.equal(restored.expert_counts(), lowered.expert_counts())


def test_verify_names_a_missing_moe_op():
    from fxforge.ir.verify import IRVerificationError, verify

    gm = capture(tiny_model("mixtral-moe").module)
    gm.meta["spec"] = dataclasses.replace(gm.meta["spec"], num_experts=0, num_experts_per_tok=0)
    with pytest.raises(IRVerificationError, match="layer 0 has 1 moe nodes, expected 0"):
        verify(gm)


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    def test_triton_bound_logits_match_the_reference(self, kind, dtype):
        """The Triton kernels (and the rest of the lowered graph) against the reference path on the GPU.
        bf16: both round h and the output once; the logit scale of these tiny models is ~1."""
        model = moe_model(kind, dtype)
        model.module.cuda()
        ids = tokens().cuda()
        reference = fxforge.optimize(model, passes=[{"name": "lower", "backend": "torch"}])
        lowered = fxforge.optimize(model, passes=[{"name": "lower", "backend": "triton"}])
        expected, actual = reference.logits(ids), lowered.logits(ids)
        atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (6e-2, 5e-2)
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
        assert torch.equal(lowered.expert_counts(), reference.expert_counts())

    def test_lowered_forward_never_syncs_the_host(self):
        model = moe_model("qwen3-moe", torch.bfloat16)
        model.module.cuda()
        lowered = fxforge.optimize(model, passes=[{"name": "lower", "backend": "triton"}])
        batch = build_batch([[3, 1, 4], [1, 5, 9, 2, 6]], [0, 0], [[0], [1]], 16, "cuda")
        cache = lowered.new_kv_cache(2, 16)
        lowered.forward(batch, cache)  # compiles outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            lowered.forward(batch, cache)
            lowered.expert_counts()
        finally:
            torch.cuda.set_sync_debug_mode("default")
