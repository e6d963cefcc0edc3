"""passes/fuse_projections.py: structure (one GEMM for q/k/v and one for gate/up, parts metadata, weights as
views), numbers (logits and greedy decode unchanged, Triton kernels on the strided slices), artifacts,
what is left unfused and why, and the cost model's totals."""

from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from torch import nn

import fxforge
from fxforge.analyze import analyze
from fxforge.artifact import load_artifact, unique_state
from fxforge.errors import PassConfigError
from fxforge.ir.capture import META_KEY, ProjectionPart, annotate, meta, sliced_part
from fxforge.ir.cost import COST_KEY, BatchDesc, annotate_costs
from fxforge.ir.modules import FusedLinear
from fxforge.ir.verify import IRVerificationError, verify
from fxforge.kernels import kv_cache, norm, rope, rope_kv_write, swiglu
from fxforge.passes import BFPKVCache, KSort, LayerTying, Lower
from fxforge.passes.lower import STEP_FUSIONS
from fxforge.passes.fuse_elementwise import fuse_add_rmsnorm, fuse_rope_kv_write
from fxforge.passes.fuse_projections import fuse_projections
from fxforge.passes.manager import PassConfig, PassResult, register_pass, unregister_pass
from fxforge.passes.opb_placement import OpBPlacement, place
from fxforge.runtime.engine import Engine
from fxforge.runtime.sequence import SamplingParams
from tests.conftest import TINY, TINY_SPECS, tiny_model
from tests.kernels.checks import Spy
from tests.kernels.interpreter import fresh_process_test, interpreter_mark, is_interpreted
from tests.passes.test_layer_tying import deep_model

INTERPRETER = is_interpreted(swiglu._swiglu_kernel)
needs_interpreter = interpreter_mark(INTERPRETER)
DENSE = [kind for kind, spec in TINY_SPECS.items() if not spec.is_moe]
INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "mlp_gate", "mlp_up", "qkv_proj", "mlp_gate_up")
PASS = "test-fuse-projections"


@dataclass(frozen=True)
class FuseProjections(PassConfig):
    """fuse_projections as a pass of its own (lower will carry it as options), so artifacts replay it."""

    qkv: bool = True
    gate_up: bool = True


UNFUSED = dict.fromkeys(STEP_FUSIONS, False)  # lower's step fusions are on by default


def fuse_pass(gm, config, ctx):
    records = fuse_projections(gm, config.qkv, config.gate_up)
    return PassResult(gm, any(r["fused"] for r in records), {"fusions": records})


@pytest.fixture
def fusing():
    register_pass(PASS, FuseProjections, after=("lower",))(fuse_pass)
    yield FuseProjections
    unregister_pass(PASS)


def lowered(model, *before, backend="torch"):
    return fxforge.optimize(model, passes=[*before, Lower(backend=backend, **UNFUSED)])


def fused(model, *before, backend="torch", elementwise=False):
    """Lowered, then projections fused (and, with elementwise, add + rmsnorm and rope + kv_write too)."""
    opt = lowered(model, *before, backend=backend)
    fuse_projections(opt.module)
    if elementwise:
        assert fuse_add_rmsnorm(opt.module) and fuse_rope_kv_write(opt.module)
    verify(opt.module)
    return opt


def gemms_per_layer(gm, roles=INPUT_PROJECTIONS) -> Counter:
    return Counter(meta(n).layer for n in gm.graph.nodes
                   if n.op == "call_module" and META_KEY in n.meta and meta(n).role in roles)


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DENSE)
def test_input_gemms_per_layer_drop_from_five_to_two(kind):
    model = tiny_model(kind)
    before, after = lowered(model).module, fused(model).module
    layers = range(TINY["num_layers"])
    assert gemms_per_layer(before) == Counter({layer: 5 for layer in layers})
    assert gemms_per_layer(after) == Counter({layer: 2 for layer in layers})
    every_gemm = INPUT_PROJECTIONS + ("o_proj", "mlp_down")
    assert gemms_per_layer(after, every_gemm) == Counter({layer: 4 for layer in layers})  # 7 before


def test_fused_nodes_record_their_parts():
    opt = lowered(tiny_model("llama-gqa"))  # q 4 x 32, k and v 2 x 32, intermediate 96
    records = fuse_projections(opt.module)
    nodes = {n.target: n for n in opt.module.graph.nodes if n.op == "call_module"}
    qkv, gate_up = meta(nodes["layers.1.attn.qkv_proj"]), meta(nodes["layers.1.mlp.gate_up_proj"])
    assert (qkv.role, qkv.layer, qkv.heads.num_kv_heads) == ("qkv_proj", 1, 2)
    assert qkv.parts == (ProjectionPart("q_proj", "layers.1.attn.q_proj", 0, 128),
                         ProjectionPart("k_proj", "layers.1.attn.k_proj", 128, 192),
                         ProjectionPart("v_proj", "layers.1.attn.v_proj", 192, 256))
    assert gate_up.role == "mlp_gate_up"
    assert gate_up.parts == (ProjectionPart("mlp_gate", "layers.1.mlp.gate_proj", 0, 96),
                             ProjectionPart("mlp_up", "layers.1.mlp.up_proj", 96, 192))
    slices = {sliced_part(n).module: n for n in opt.module.graph.nodes if sliced_part(n) is not None}
    assert len(slices) == 5 * TINY["num_layers"]
    assert all(meta(n).layer == int(name.split(".")[1]) and meta(n).role == "op" for name, n in slices.items())
    ropes = [n for n in opt.module.graph.nodes if n.target is torch.ops.fxforge.rope]
    assert [meta(n).tensor for n in ropes] == ["q", "k"] * TINY["num_layers"]  # traced back through the slices
    record = next(r for r in records if r["kind"] == "qkv" and r["layer"] == 1)
    assert record == {"layer": 1, "kind": "qkv", "fused": True, "module": "layers.1.attn.qkv_proj",
                      "roles": ["q_proj", "k_proj", "v_proj"], "in_features": 64, "out_features": 256, "bias": False,
                      "parts": [p.to_dict() for p in qkv.parts], "left_out": {}}
    annotate(opt.module, opt.spec)  # re-annotation keeps the contract: the parts come from the module
    assert meta(nodes["layers.1.attn.qkv_proj"]).parts == qkv.parts


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2-bias"])
def test_parts_are_views_of_one_stored_weight(kind):
    model = tiny_model(kind)
    unfused, opt = lowered(model), fused(model)
    state = opt.module.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in unfused.module.state_dict().items()}
    for layer in range(TINY["num_layers"]):
        attn = opt.module.get_submodule(f"layers.{layer}.attn")
        w = attn.qkv_proj.weight
        assert attn.q_proj.weight.data_ptr() == w.data_ptr() and attn.v_proj.weight.data_ptr() == w[192:].data_ptr()
        assert isinstance(attn.k_proj.weight, nn.Parameter)
        originals = unfused.module.get_submodule(f"layers.{layer}.attn")
        assert torch.equal(w, torch.cat([originals.q_proj.weight, originals.k_proj.weight, originals.v_proj.weight]))
        if TINY_SPECS[kind].attention_bias:
            assert attn.k_proj.bias.data_ptr() == attn.qkv_proj.bias[128:].data_ptr()
        mlp = opt.module.get_submodule(f"layers.{layer}.mlp")
        assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_proj.weight[96:].data_ptr()


def test_loading_a_state_dict_into_the_parts_writes_the_fused_weight(tokens):
    model, other = tiny_model("qwen2-bias"), tiny_model("qwen2-bias", seed=3)
    opt = fused(model)
    opt.module.load_state_dict(lowered(other).module.state_dict())
    torch.testing.assert_close(opt.logits(tokens), other.logits(tokens), rtol=0, atol=1e-5)
    verify(opt.module)


def test_fusing_twice_changes_nothing():
    opt = fused(tiny_model("llama-gqa"))
    code = opt.module.code
    again = fuse_projections(opt.module)
    assert not any(r["fused"] for r in again) and opt.module.code == code
    assert all("no q_proj / k_proj / v_proj" in r["reason"] or "no mlp_gate / mlp_up" in r["reason"] for r in again)


def test_options_pick_the_kinds():
    opt = lowered(tiny_model("llama-gqa"))
    assert {r["kind"] for r in fuse_projections(opt.module, gate_up=False)} == {"qkv"}
    assert gemms_per_layer(opt.module, ("mlp_gate", "mlp_up")) == Counter({0: 2, 1: 2})
    with pytest.raises(ValueError, match="qkv=1 must be true or false"):
        fuse_projections(opt.module, qkv=1)


def test_verify_reports_a_part_replaced_after_fusion():
    opt = fused(tiny_model("llama-gqa"))
    proj = opt.module.get_submodule("layers.0.attn.k_proj")
    proj.weight = nn.Parameter(proj.weight.detach().clone())
    with pytest.raises(IRVerificationError, match=r"layers.0.attn.k_proj.weight is not a view of its rows 128:192"):
        verify(opt.module)


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------


def test_logits_match_the_unfused_lowered_model(any_tiny_model, tokens):
    unfused, opt = lowered(any_tiny_model), fused(any_tiny_model)
    torch.testing.assert_close(opt.logits(tokens), unfused.logits(tokens), rtol=0, atol=1e-5)


def test_composes_with_the_elementwise_fusions(tokens):
    model = tiny_model("qwen3-qknorm")
    torch.testing.assert_close(fused(model, elementwise=True).logits(tokens), lowered(model).logits(tokens),
                               rtol=0, atol=1e-5)


def test_full_pipeline_with_ksort_and_bfp_cache(tokens):
    """KSort's permuted rows and per-channel scales, a BFP K/V cache written from the strided slices."""
    model = tiny_model("qwen3-qknorm")
    before = (KSort(block=16), BFPKVCache(k_format="bfp12", v_format="bfp16", block=16))
    torch.testing.assert_close(fused(model, *before).logits(tokens), lowered(model, *before).logits(tokens),
                               rtol=0, atol=1e-5)


def test_greedy_decode_through_the_engine_is_unchanged():
    model = tiny_model("qwen2-bias")
    prompts = [[5, 17, 3, 99, 42], [7] * 11, [200, 1]]

    def generate(m):  # chunked prefill, then decode steps
        engine = Engine(m, num_pages=64, page_size=4, max_num_batched_tokens=8)
        return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))]

    expected = generate(lowered(model))
    assert generate(fused(model)) == expected
    assert expected == model.generate(prompts, max_new_tokens=10)


# ----------------------------------------------------------------------------------------------
# Triton kernels on the strided slices (interpreter on CPU; natively in TestCUDA)
# ----------------------------------------------------------------------------------------------


class StridedSpy(Spy):
    """Counts calls, and whether any call's input `arg` was a strided (non-contiguous) tensor."""

    def __init__(self, fn, arg: int):
        super().__init__(fn)
        self.arg, self.strided = arg, False

    def __call__(self, *args, **kwargs):
        self.strided = self.strided or not args[self.arg].is_contiguous()
        return super().__call__(*args, **kwargs)


def spy_on_launchers(monkeypatch) -> dict[str, StridedSpy]:
    """rope or, with QK-norm, rmsnorm (q, k), swiglu (gate, up), kv_write (v) or rope_kv_write (k, v) read the
    fused outputs' slices."""
    spies = {}
    for module, name, arg in ((rope, "rope_triton", 0), (norm, "rmsnorm_triton", 0), (swiglu, "swiglu_triton", 0),
                              (kv_cache, "kv_write_triton", 1), (rope_kv_write, "rope_kv_write_triton", 0)):
        spies[name] = StridedSpy(getattr(module, name), arg)
        monkeypatch.setattr(module, name, spies[name])
    return spies


@needs_interpreter
@pytest.mark.parametrize("kind, before, elementwise", [
    ("qwen3-qknorm", (), False), ("qwen2-bias", (), False),
    ("llama-interleaved", (KSort(block=16), BFPKVCache(block=16)), False), ("qwen2-bias", (), True)],
    ids=["qknorm", "bias", "ksort-bfp", "with-rope-kv-write"])
def test_triton_kernels_read_the_strided_slices(kind, before, elementwise, tokens, monkeypatch):
    model = tiny_model(kind)
    reference = lowered(model, *before).logits(tokens)
    opt = fused(model, *before, backend="triton", elementwise=elementwise)
    spies = spy_on_launchers(monkeypatch)
    torch.testing.assert_close(opt.logits(tokens), reference, rtol=0, atol=1e-5)
    q_reader = "rmsnorm_triton" if TINY_SPECS[kind].qk_norm else "rope_triton"
    readers = (q_reader, "swiglu_triton", "rope_kv_write_triton" if elementwise else "kv_write_triton")
    for name in readers:
        assert spies[name].strided, f"{name} ran {spies[name].calls} times, never on a strided slice"


test_interpreted_kernels_in_a_fresh_process = fresh_process_test(__file__, "-k", "triton and not TestCUDA",
                                                                 interpreting=INTERPRETER)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    @pytest.mark.parametrize("kind", ["qwen3-qknorm", "qwen2-bias", "llama-gqa"])
    def test_fused_model_on_cuda_matches_the_cpu_reference(self, kind, tokens):
        model = tiny_model(kind)
        reference = lowered(model).logits(tokens)
        model.module.cuda()  # fuse on the device the model runs on
        opt = fused(model, backend="triton")
        torch.testing.assert_close(opt.logits(tokens.cuda()).cpu(), reference, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Artifacts
# ----------------------------------------------------------------------------------------------


def weights_file(directory) -> dict[str, tuple]:
    with safe_open(str(directory / "weights.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


@pytest.mark.parametrize("kind", ["qwen2-bias", "qwen3-qknorm"])
def test_save_and_load_rebuild_the_fusion(kind, fusing, tmp_path, tokens):
    model = tiny_model(kind)
    plain = lowered(model)
    opt = fxforge.optimize(model, passes=[Lower(backend="torch", **UNFUSED), fusing()])
    plain.save(tmp_path / "plain")
    opt.save(tmp_path / "fused")
    assert weights_file(tmp_path / "fused") == weights_file(tmp_path / "plain")  # original names and sizes only
    loaded = load_artifact(tmp_path / "fused")
    verify(loaded.module)
    assert gemms_per_layer(loaded.module) == gemms_per_layer(opt.module) == Counter({0: 2, 1: 2})
    assert torch.equal(loaded.logits(tokens), opt.logits(tokens))
    assert "qkv_proj" in (tmp_path / "fused" / "graph.py").read_text()


def test_optimizing_a_fused_model_again_keeps_the_parts(fusing, tmp_path, tokens):
    """A later pipeline works on a copy of the graph and module tree: the parts, which no node calls, stay."""
    opt = fxforge.optimize(tiny_model("llama-gqa"), passes=[Lower(backend="torch", **UNFUSED), fusing()])
    again = fxforge.optimize(opt, passes=[OpBPlacement(batch=4, context=64)])
    attn = again.module.get_submodule("layers.0.attn")
    assert attn.k_proj.weight.data_ptr() == attn.qkv_proj.weight[128:].data_ptr()
    again.save(tmp_path / "again")
    assert torch.equal(load_artifact(tmp_path / "again").logits(tokens), opt.logits(tokens))


# ----------------------------------------------------------------------------------------------
# What is left unfused, and why
# ----------------------------------------------------------------------------------------------


def test_moe_experts_are_left_alone():
    records = fuse_projections(lowered(tiny_model("mixtral-moe")).module)
    by_kind = {kind: [r for r in records if r["kind"] == kind] for kind in ("qkv", "gate_up")}
    assert all(r["fused"] for r in by_kind["qkv"]) and len(by_kind["qkv"]) == TINY["num_layers"]
    assert all(not r["fused"] and r["reason"].startswith("MoE layer") for r in by_kind["gate_up"])


def test_projections_feeding_lora_stay_unfused_in_a_layer_tied_graph(tokens):
    ids = tokens % 97
    tying = LayerTying(unique_layers=3, rank=4, targets=("q", "gate", "up"))
    plain, tied = lowered(deep_model("square"), tying), lowered(deep_model("square"), tying)
    aliases, reference = unique_state(tied.module)[1], tied.logits(ids)
    records = fuse_projections(tied.module)
    verify(tied.module)  # the depths of a block still hold the block's tensors
    attn = [r for r in records if r["kind"] == "qkv"]
    assert all(r["fused"] and r["module"].endswith("attn.kv_proj") and r["roles"] == ["k_proj", "v_proj"]
               and "fxforge::lora" in r["left_out"]["q_proj"] for r in attn)
    assert all(not r["fused"] and "feeds fxforge::lora" in r["reason"] for r in records if r["kind"] == "gate_up")
    blocks = [tied.module.get_submodule(f"layers.{d}.attn.kv_proj").weight for d in range(6)]
    assert blocks[0] is blocks[3] and blocks[1] is blocks[4] and blocks[0] is not blocks[1]  # one per block
    assert unique_state(tied.module)[1] == aliases
    torch.testing.assert_close(tied.logits(ids), reference, rtol=0, atol=1e-5)
    prompts = [[5, 17, 3, 90, 42], [7] * 11]  # depth-wise batching runs the loop body cut out of the fused graph
    settings = dict(loop_policy="depthwise", num_pages=64, page_size=4, max_num_batched_tokens=8)
    tokens_of = [[o.token_ids for o in Engine(m, **settings).generate(prompts, SamplingParams(max_new_tokens=6,
                                                                                             ignore_eos=True))]
                 for m in (plain, tied)]
    assert tokens_of[0] == tokens_of[1]


def test_layer_tying_refuses_a_fused_graph():
    opt = fused(tiny_model("llama-gqa"))
    # the pipeline refuses it first (lower runs after layer-tying), and the pass itself too when run on the graph
    with pytest.raises(PassConfigError, match="'layer-tying' must run before it"):
        fxforge.optimize(opt, passes=[LayerTying(unique_layers=1)])
    from fxforge.passes.manager import registered_passes
    with pytest.raises(PassConfigError, match="layer-tying runs on unfused projections"):
        registered_passes()["layer-tying"].fn(opt.module, LayerTying(unique_layers=1), None)


def test_bias_mismatch_and_different_inputs_are_reported():
    opt = lowered(tiny_model("qwen2-bias"))
    opt.module.get_submodule("layers.0.attn.v_proj").bias = None
    (k_proj,) = [n for n in opt.module.graph.nodes if n.target == "layers.1.attn.k_proj"]
    k_proj.args = (next(n for n in opt.module.graph.nodes if n.target == "embed"),)
    records = {(r["layer"], r["kind"]): r for r in fuse_projections(opt.module)}
    assert records[0, "qkv"]["reason"].startswith("bias mismatch: some of layers.0.attn.q_proj")
    assert records[1, "qkv"]["reason"].endswith("read different inputs")
    assert records[0, "gate_up"]["fused"] and records[1, "gate_up"]["fused"]
    verify(opt.module)


def test_a_projection_called_twice_is_left_out():
    opt = lowered(tiny_model("llama-gqa"))
    graph = opt.module.graph
    (q_proj,) = [n for n in graph.nodes if n.target == "layers.0.attn.q_proj"]
    with graph.inserting_after(q_proj):
        graph.call_module(q_proj.target, q_proj.args)
    annotate(opt.module, opt.spec)
    record = fuse_projections(opt.module)[0]
    assert record["module"] == "layers.0.attn.kv_proj"
    assert record["left_out"] == {"q_proj": "its module is called 2 times"}


# ----------------------------------------------------------------------------------------------
# Cost model: the parts cost what the projections cost
# ----------------------------------------------------------------------------------------------


BATCHES = [BatchDesc("decode", 8, 300), BatchDesc("prefill", 2, 64), BatchDesc("mixed", 4, 128, prefill_tokens=40)]


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: b.phase)
@pytest.mark.parametrize("kind", ["qwen2-bias", "mixtral-moe"])
def test_cost_totals_and_role_tables_are_identical(kind, batch):
    model = tiny_model(kind)
    unfused, opt = lowered(model), fused(model)
    before, after = (analyze(m, batch, device="h100") for m in (unfused, opt))
    for key in ("totals", "layers", "roles"):
        assert after[key] == before[key], key
    costs = annotate_costs(opt.module, opt.spec, batch)
    node = next(n for n in opt.module.graph.nodes if n.target == "layers.0.attn.qkv_proj")
    whole = node.meta[COST_KEY]
    assert [c.role for c in whole.parts] == ["q_proj", "k_proj", "v_proj"]
    assert whole.flops == sum(c.flops for c in whole.parts) and whole.bytes == sum(c.bytes for c in whole.parts)
    assert [c for c in costs if c.node_name == node.name] == list(whole.parts)


def test_placement_of_a_fused_graph_predicts_the_same_step():
    model = tiny_model("llama-gqa")
    config = OpBPlacement(batch=8, context=300)
    before, after = place(lowered(model).module, config), place(fused(model).module, config)
    assert after["predicted_step_s"] == pytest.approx(before["predicted_step_s"], rel=1e-9)
    assert after["transfer_s"] == pytest.approx(before["transfer_s"], rel=1e-9)
    assert "qkv_proj" in after["placement"] and "q_proj" not in after["placement"]
