"""passes/lower.py: RMSNorm / SwiGLU rewritten into fused ops, kernels bound, choices reported."""

import operator

import pytest
import torch
import torch.nn.functional as F

import fxforge
from fxforge.errors import PassConfigError
from fxforge.ir import ops
from fxforge.ir.capture import META_KEY, capture, meta
from fxforge.ir.model import Model
from fxforge.ir.modules import RMSNorm
from fxforge.ir.verify import verify
from fxforge.passes import BFPKVCache, KSort, Lower
from fxforge.passes.lower import STEP_FUSIONS as STEP_FUSION_NAMES
from tests.conftest import TINY_SPECS, tiny_model


OPS = ("rope", "kv_write", "attention", "rmsnorm", "swiglu")


STEP_FUSIONS = dict.fromkeys(STEP_FUSION_NAMES, True)
NO_STEP_FUSIONS = dict.fromkeys(STEP_FUSION_NAMES, False)  # the plain lowering the fusions are checked against

def expected_counts(spec) -> tuple[int, int]:
    """(rmsnorm nodes, swiglu nodes): 2 per layer + the final norm (+2 per layer with QK-norm);
    one SwiGLU per dense MLP (MoE experts run as one fxforge::moe op)."""
    norms = 2 * spec.num_layers + 1 + (2 * spec.num_layers if spec.qk_norm else 0)
    return norms, 0 if spec.is_moe else spec.num_layers


def rmsnorm_modules_called(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), RMSNorm)]


def test_rewrites_every_norm_and_swiglu(any_tiny_model, tokens):
    """Structure: no RMSNorm module call left, fused ops with roles and layers; numbers: same logits."""
    spec = any_tiny_model.spec
    opt = fxforge.optimize(any_tiny_model, passes=[Lower(backend="torch", **NO_STEP_FUSIONS)])
    gm = opt.module
    assert rmsnorm_modules_called(gm) == []
    norms = [n for n in gm.graph.nodes if n.target is ops.RMSNORM]
    swiglus = [n for n in gm.graph.nodes if n.target is ops.SWIGLU]
    assert (len(norms), len(swiglus)) == expected_counts(spec)
    assert {meta(n).role for n in norms} == {"norm"} and {meta(n).role for n in swiglus} <= {"mlp_act"}
    assert [meta(n).layer for n in norms].count(None) == 1, "only the final norm lies outside the layers"
    assert sorted(meta(n).layer for n in swiglus) == ([] if spec.is_moe else list(range(spec.num_layers)))
    assert not any(n.target is F.silu for n in gm.graph.nodes), "a silu of a dense MLP survived"
    report = opt.passes[0]["report"]
    assert opt.passes[0]["modified"] and (report["rmsnorm_nodes"], report["swiglu_nodes"]) == expected_counts(spec)
    verify(gm)
    torch.testing.assert_close(opt.logits(tokens), any_tiny_model.logits(tokens), rtol=0, atol=1e-5)


def test_qk_norm_weights_are_read_per_head_after_ksort(tokens):
    """KSort makes QK-norm weights [H, D]; the fused op reads them through get_attr."""
    model = tiny_model("qwen3-qknorm")
    opt = fxforge.optimize(model, passes=[KSort(block=16), Lower(backend="torch")])
    qk = [n for n in opt.module.graph.nodes if n.target is ops.RMSNORM and n.args[1].target.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(qk) == 2 * TINY_SPECS["qwen3-qknorm"].num_layers
    spec = TINY_SPECS["qwen3-qknorm"]
    for node in qk:
        weight = opt.module.get_parameter(node.args[1].target)
        heads = spec.num_heads if "q_norm" in node.args[1].target else spec.num_kv_heads
        assert tuple(weight.shape) == (heads, spec.head_dim)
    torch.testing.assert_close(opt.logits(tokens), model.logits(tokens), rtol=0, atol=1e-5)


def test_full_pipeline_matches_the_unlowered_one(tokens):
    """ksort + bfp-kv + lower computes what ksort + bfp-kv computes (the quantized cache included)."""
    model = tiny_model("qwen3-qknorm")
    passes = [KSort(block=16), BFPKVCache(k_format="bfp12", v_format="bfp16", block=16)]
    unlowered = fxforge.optimize(model, passes=passes)
    lowered = fxforge.optimize(model, passes=passes + [Lower(backend="torch")])
    torch.testing.assert_close(lowered.logits(tokens), unlowered.logits(tokens), rtol=0, atol=1e-5)


def test_save_and_load_round_trip(tmp_path, tokens):
    model = tiny_model("qwen3-qknorm")
    opt = fxforge.optimize(model, passes=[KSort(block=16), BFPKVCache(block=16), Lower()])
    opt.save(tmp_path / "lowered")
    loaded = fxforge.load(str(tmp_path / "lowered"))
    assert rmsnorm_modules_called(loaded.module) == []
    assert sum(n.target is ops.SWIGLU for n in loaded.module.graph.nodes) == TINY_SPECS["qwen3-qknorm"].num_layers
    assert torch.equal(loaded.logits(tokens), opt.logits(tokens))
    assert "rmsnorm_ref" in (tmp_path / "lowered" / "report.md").read_text()


def test_report_names_the_implementations():
    opt = fxforge.optimize(tiny_model("llama-gqa"), passes=[Lower(backend="torch", **NO_STEP_FUSIONS)])
    report = opt.passes[0]["report"]
    refs = {"rope": "rope_ref", "kv_write": "kv_write_pair_ref", "attention": "attention_ref",
            "rmsnorm": "rmsnorm_ref", "swiglu": "swiglu_ref"}
    assert report["backend"] == "torch" and report["cpu"] == refs and report["cuda"] == refs


def test_triton_backend_binds_this_graph_only():
    pytest.importorskip("triton")
    opt = fxforge.optimize(tiny_model("llama-gqa"), passes=[Lower(backend="triton", **NO_STEP_FUSIONS)])
    report = opt.passes[0]["report"]
    assert report["backend"] == "triton" and report["rebound_nodes"] > 0
    assert report["cuda"] == {"rope": "rope_triton", "rmsnorm": "rmsnorm_triton", "swiglu": "swiglu_triton",
                              "kv_write": "kv_write_triton", "attention": "attention_triton"}
    assert report["cpu"]["rope"] == "rope_ref", "CPU tensors use the references"
    assert opt.kernel_bindings() == dict.fromkeys(OPS, "triton")
    other = fxforge.optimize(tiny_model("llama-gqa"), passes=[Lower(backend="torch", **NO_STEP_FUSIONS)])
    assert other.kernel_bindings() == dict.fromkeys(OPS, "reference")
    assert opt.kernel_bindings() == dict.fromkeys(OPS, "triton"), "lowering another model must not rebind this one"
    assert tiny_model("llama-gqa").kernel_bindings() == dict.fromkeys(("rope", "kv_write", "attention"), "reference")


def test_two_models_lowered_differently_run_side_by_side(monkeypatch, tokens):
    """Interleaved calls of two models in one process: each op dispatches by its own node's binding."""
    pytest.importorskip("triton")
    model = tiny_model("llama-gqa")
    on_triton = fxforge.optimize(model, passes=[Lower(backend="triton", **NO_STEP_FUSIONS)])
    on_torch = fxforge.optimize(model, passes=[Lower(backend="torch", **NO_STEP_FUSIONS)])
    calls = []
    dispatch = ops.implementation

    def recording(op_name, impl, tensor):
        calls.append((op_name, impl))
        return dispatch(op_name, impl, tensor)

    monkeypatch.setattr(ops, "implementation", recording)
    logits = {}
    for name, m, impl in (("triton", on_triton, "triton"), ("torch", on_torch, "reference"),
                          ("triton again", on_triton, "triton")):
        calls.clear()
        logits[name] = m.logits(tokens)
        assert {op for op, _ in calls} == set(OPS) and {i for _, i in calls} == {impl}, name
    torch.testing.assert_close(logits["triton"], logits["triton again"], rtol=0, atol=0)
    if not torch.cuda.is_available():  # CPU tensors run the references whatever the binding
        torch.testing.assert_close(logits["triton"], logits["torch"], rtol=0, atol=0)


def test_auto_backend_follows_the_machine():
    report = fxforge.optimize(tiny_model("llama-gqa"), passes=[Lower()]).passes[0]["report"]
    want = "triton" if torch.cuda.is_available() else "torch"
    assert report["backend"] == want, report["backend_reason"]


def test_flags_turn_each_rewrite_off(tokens):
    model = tiny_model("llama-gqa")
    norms_only = fxforge.optimize(model, passes=[Lower(backend="torch", fuse_swiglu=False)])
    assert not any(n.target is ops.SWIGLU for n in norms_only.module.graph.nodes)
    assert any(n.target is F.silu for n in norms_only.module.graph.nodes)
    swiglu_only = fxforge.optimize(model, passes=[Lower(backend="torch", fuse_norm=False)])
    assert len(rmsnorm_modules_called(swiglu_only.module)) == expected_counts(model.spec)[0]
    assert not any(n.target is ops.RMSNORM for n in swiglu_only.module.graph.nodes)
    torch.testing.assert_close(swiglu_only.logits(tokens), model.logits(tokens), rtol=0, atol=1e-5)


def test_lowering_twice_changes_nothing_more():
    once = fxforge.optimize(tiny_model("llama-gqa"), passes=[Lower(backend="torch")])
    twice = fxforge.optimize(once, passes=[Lower(backend="torch")])
    assert [r["name"] for r in twice.passes] == ["lower", "lower"], "the history is kept and appended to"
    assert not twice.passes[1]["modified"]
    assert twice.passes[1]["report"]["rmsnorm_nodes"] == 0
    assert once.module.code == twice.module.code


def test_swiglu_pattern_needs_a_single_use_silu():
    """A silu whose output is used elsewhere too is not folded away."""
    gm = capture(tiny_model("llama-gqa").module)
    silu = next(n for n in gm.graph.nodes if n.target is F.silu)
    mul = next(iter(silu.users))
    with gm.graph.inserting_after(mul):
        extra = gm.graph.call_function(operator.add, (mul, silu))
    mul.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    extra.meta[META_KEY] = meta(mul)
    gm.recompile()
    from fxforge.passes.lower import _lower_swiglus

    assert _lower_swiglus(gm) == TINY_SPECS["llama-gqa"].num_layers - 1


@pytest.mark.parametrize("options, message", [
    ({"backend": "cuda"}, "backend='cuda' is not valid"),
    ({"fuse_norm": "yes"}, "fuse_norm='yes' must be true or false"),
    ({"fuse_rope": True}, "unknown option"),
])
def test_bad_config_is_rejected(options, message):
    with pytest.raises(PassConfigError, match=message):
        fxforge.passes.resolve({"name": "lower", **options})


def test_must_run_after_ksort_and_bfp_kv():
    with pytest.raises(PassConfigError, match="must run after 'ksort'"):
        fxforge.optimize(tiny_model("llama-gqa"), passes=[Lower(), KSort()])
    with pytest.raises(PassConfigError, match="must run after 'bfp-kv'"):
        fxforge.optimize(tiny_model("llama-gqa"), passes=["lower", "bfp-kv"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-interleaved", "qwen3-qknorm", "mixtral-moe"])
def test_lowered_model_on_cuda_matches_the_cpu_reference(kind, tokens):
    """The Triton kernels (rope with a KSort permutation, rmsnorm, swiglu, fused BFP kv write) on the GPU
    give the logits of the torch references on the CPU."""
    pytest.importorskip("triton")
    model = tiny_model(kind)
    opt = fxforge.optimize(model, passes=[KSort(block=16), BFPKVCache(block=16), Lower(backend="triton")])
    expected = opt.logits(tokens)
    opt.module.cuda()
    actual = Model(opt.module, opt.spec).logits(tokens)
    torch.testing.assert_close(actual.cpu(), expected, rtol=0, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_models_lowered_differently_on_cuda_run_their_own_kernels(monkeypatch, tokens):
    """On the GPU, a Triton-lowered and a torch-lowered model in one process: only the first launches kernels."""
    pytest.importorskip("triton")
    from fxforge.kernels import paged_attention, rope
    from tests.kernels.checks import Spy

    model = tiny_model("llama-gqa")
    on_triton = fxforge.optimize(model, passes=[Lower(backend="triton", **NO_STEP_FUSIONS)])
    on_torch = fxforge.optimize(model, passes=[Lower(backend="torch", **NO_STEP_FUSIONS)])
    on_triton.module.cuda()
    on_torch.module.cuda()
    spies = {"rope": Spy(rope.rope_triton), "attention": Spy(paged_attention.attention_triton)}
    monkeypatch.setattr(rope, "rope_triton", spies["rope"])
    monkeypatch.setattr(paged_attention, "attention_triton", spies["attention"])
    reference = Model(on_torch.module, on_torch.spec).logits(tokens)
    assert all(spy.calls == 0 for spy in spies.values())
    lowered = Model(on_triton.module, on_triton.spec).logits(tokens)
    assert all(spy.calls > 0 for spy in spies.values())
    torch.testing.assert_close(lowered.cpu(), reference.cpu(), rtol=0, atol=2e-3)


def test_step_fusions_are_options_that_keep_the_logits(any_tiny_model, tokens):
    """lower's step fusions (issue 14 item 2): on by default, each can be turned off; each layer runs fused
    q/k/v and gate/up GEMMs, add + RMSNorm and RoPE + KV write ops, the report lists them, and the logits
    are the unfused lowering's to the bit (the fused ops compute exactly what the pairs do)."""
    spec = any_tiny_model.spec
    plain = fxforge.optimize(any_tiny_model, passes=[Lower(backend="torch", **NO_STEP_FUSIONS)])
    assert not any(k.startswith("fused_") for k in plain.passes[0]["report"])
    assert Lower() == Lower(**STEP_FUSIONS), "the fusions are lower's defaults"
    fused = fxforge.optimize(any_tiny_model, passes=[Lower(backend="torch")])
    report = fused.passes[0]["report"]
    assert {"add_rmsnorm", "rope_kv_write"} <= set(report["cpu"]) and "kv_write" not in report["cpu"]
    targets = [n.target for n in fused.module.graph.nodes]
    assert targets.count(ops.ADD_RMSNORM) == len(report["fused_add_norm"]) == 2 * spec.num_layers
    assert targets.count(ops.ROPE_KV_WRITE) == len(report["fused_rope_kv_write"]) == spec.num_layers
    assert ops.KV_WRITE not in targets
    projections = [r for r in report["fused_projections"] if r["fused"]]
    assert {r["kind"] for r in projections} == ({"qkv"} if spec.is_moe else {"qkv", "gate_up"})
    verify(fused.module)
    torch.testing.assert_close(fused.logits(tokens), plain.logits(tokens), rtol=0, atol=0)


def test_step_fusions_stay_inside_layers_of_a_skip_decode_graph(tokens):
    """A skip-decode graph is cut into per-layer modules at run time: lower after skip-decode fuses each
    residual add only with its own layer's norm, so the cut still finds one hidden state; skip-decode
    after a lowering that fused across layers (lower's default) redoes the fusions within layers."""
    from fxforge.ir.skip import split_layers
    from fxforge.passes import SkipDecode

    model = tiny_model("llama-gqa")
    layers = model.spec.num_layers
    after = fxforge.optimize(model, passes=[Lower(backend="torch"), SkipDecode(min_layers=1, warmup_layers=1, span=3)])
    assert after.passes[1]["report"]["adds_fused_again_within_layers"] == layers
    assert [n.target for n in after.module.graph.nodes].count(ops.ROPE_KV_WRITE) == layers
    split_layers(after.module, layers)
    opt = fxforge.optimize(model, passes=[SkipDecode(min_layers=1, warmup_layers=1, span=3),
                                          Lower(backend="torch", **STEP_FUSIONS)])
    assert len(opt.passes[1]["report"]["fused_add_norm"]) == layers  # the mlp_norm adds only
    split_layers(opt.module, layers)
    torch.testing.assert_close(after.logits(tokens), opt.logits(tokens), rtol=0, atol=0)
