"""passes/layer_tying.py: structure (tied tensors, plan, LoRA nodes) and numbers (bit-exact where
nothing changes, full rank recovers the original, rank interpolates), artifacts, bad input."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

import fxforge
from fxforge.artifact import load_artifact
from fxforge.errors import PassConfigError, PipelineError
from fxforge.ir import nodes_by_role
from fxforge.ir.model import Model
from fxforge.ir.recursive import stepwise_layers, tying_plan
from fxforge.passes import KSort, LayerTying, Lower
from tests.conftest import TINY_SPECS

# q, k, v, o, gate, up, down all have min(out, in) = 32: rank 32 is full rank for every target.
SQUARE = dataclasses.replace(TINY_SPECS["llama-gqa"], hidden_size=32, num_heads=4, num_kv_heads=4, head_dim=8,
                             intermediate_size=48, num_layers=6, vocab_size=97, tie_word_embeddings=True)
STRATEGIES = {"cycle": 3, "sequence": 2, "middle-cycle": 4}  # strategy -> a K that fits 6 layers
INITS = ("stepwise", "lower", "average")


def deep_model(kind: str = "llama-gqa", num_layers: int = 6, seed: int = 0) -> Model:
    """A random model of a tiny family with more layers (and non-zero biases)."""
    spec = SQUARE if kind == "square" else dataclasses.replace(TINY_SPECS[kind], num_layers=num_layers)
    model = Model.from_state_dict(spec, None, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.module.named_parameters():
        if name.endswith(".bias") or name.endswith("norm.weight"):  # vectors that differ per layer
            param.data += 0.1 * torch.randn(param.shape, generator=gen)
    return model


@pytest.fixture
def ids():
    return torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(5))


def params(model, depth: int, name: str):
    return model.module.get_submodule(f"layers.{depth}").get_parameter(name)


# ----------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_k_equal_to_n_is_bit_exact(strategy, ids):
    model = deep_model("square")
    opt = fxforge.optimize(model, passes=[LayerTying(unique_layers=6, strategy=strategy, init="average", rank=4)])
    assert not opt.passes[0]["modified"] and tying_plan(opt) is None
    assert torch.equal(opt.logits(ids), model.logits(ids))


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("init", ["stepwise", "lower"])
def test_tying_layers_that_are_equal_is_bit_exact(rank, init, ids):
    """Layer d a copy of layer d mod 2: cycle K=2 changes the storage, not one bit of the logits
    (LoRA of a zero difference adds exactly zero)."""
    model = deep_model("square")
    for depth in range(2, 6):
        for name, param in model.module.layers[depth].named_parameters():
            param.data.copy_(params(model, depth % 2, name))
    opt = fxforge.optimize(model, passes=[LayerTying(unique_layers=2, init=init, rank=rank)])
    assert torch.equal(opt.logits(ids), model.logits(ids))
    assert params(opt, 4, "mlp.up_proj.weight") is params(opt, 0, "mlp.up_proj.weight")


@pytest.mark.parametrize("strategy, k", list(STRATEGIES.items()))
@pytest.mark.parametrize("init", INITS)
def test_full_rank_recovers_the_original(strategy, k, init, ids):
    model = deep_model("square")
    opt = fxforge.optimize(model, passes=[LayerTying(unique_layers=k, strategy=strategy, init=init, rank=32,
                                                     norms="per-depth")])
    assert opt.passes[0]["report"]["svd_energy_kept"] == pytest.approx(1.0)
    torch.testing.assert_close(opt.logits(ids), model.logits(ids), rtol=0, atol=2e-5)


def test_rank_interpolates_between_tied_and_original(ids):
    model = deep_model("square")
    reference = model.logits(ids)
    errors = []
    for rank in (0, 2, 8, 32):
        opt = fxforge.optimize(model, passes=[LayerTying(unique_layers=3, rank=rank, norms="per-depth")])
        errors.append(float((opt.logits(ids) - reference).abs().max()))
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 2e-5 < errors[0]


def test_zero_init_lora_is_the_tied_model(ids):
    tied = fxforge.optimize(deep_model("square"), passes=[LayerTying(unique_layers=3)])
    relaxed = fxforge.optimize(deep_model("square"), passes=[LayerTying(unique_layers=3, rank=8, lora_init="zero")])
    assert relaxed.module.lora.q_proj.A.abs().sum() > 0 and relaxed.module.lora.q_proj.B.abs().sum() == 0
    assert torch.equal(relaxed.logits(ids), tied.logits(ids))


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, blocks", [
    ("cycle", [0, 1, 2, 0, 1, 2]), ("sequence", [0, 0, 1, 1, 2, 2]), ("middle-cycle", [0, 1, 2, 1, 2, 3])],
    ids=["cycle", "sequence", "middle-cycle"])
def test_depths_hold_their_blocks_tensors(strategy, blocks):
    k = max(blocks) + 1
    opt = fxforge.optimize(deep_model(), passes=[LayerTying(unique_layers=k, strategy=strategy)])
    plan = tying_plan(opt)
    assert list(plan.block_of_depth) == blocks
    for depth, block in enumerate(blocks):
        for name in ("attn.q_proj.weight", "mlp.down_proj.weight", "attn_norm.weight"):
            assert params(opt, depth, name) is params(opt, plan.owner(block), name), (depth, name)
    owners = {plan.owner(b) for b in range(k)}
    distinct = {id(params(opt, d, "attn.k_proj.weight")) for d in range(6)}
    assert len(distinct) == k == len(owners)


def test_norms_per_depth_stay_per_depth():
    model = deep_model("qwen2-bias")
    opt = fxforge.optimize(model, passes=[LayerTying(unique_layers=2, norms="per-depth")])
    assert params(opt, 2, "attn.q_proj.weight") is params(opt, 0, "attn.q_proj.weight")
    for name in ("attn_norm.weight", "mlp_norm.weight", "attn.q_proj.bias"):
        assert params(opt, 2, name) is not params(opt, 0, name)
        assert torch.equal(params(opt, 2, name), params(model, 2, name))


def test_initialisations():
    model = deep_model()
    stepwise = fxforge.optimize(model, passes=[LayerTying(unique_layers=3, init="stepwise")])
    assert stepwise_layers(0, 5, 3) == [0, 2, 5]  # round(linspace(0, 5, 3)) = round(0, 2.5, 5), half to even
    for block, source in enumerate([0, 2, 5]):
        # no copy: the shared tensor is the source layer's storage (shared copy-on-write with the original model)
        assert params(stepwise, block, "attn.o_proj.weight").data_ptr() == params(model, source, "attn.o_proj.weight").data_ptr()
    lower = fxforge.optimize(model, passes=[LayerTying(unique_layers=3, strategy="sequence", init="lower")])
    assert [list(s) for s in tying_plan(lower).source_layers] == [[0], [1], [2]]
    average = fxforge.optimize(model, passes=[LayerTying(unique_layers=3, init="average")])
    mean = (params(model, 1, "mlp.gate_proj.weight") + params(model, 4, "mlp.gate_proj.weight")) / 2
    torch.testing.assert_close(params(average, 1, "mlp.gate_proj.weight"), mean)


def test_lora_nodes_follow_every_target_of_every_relaxed_depth():
    opt = fxforge.optimize(deep_model(), passes=[LayerTying(unique_layers=4, strategy="middle-cycle", rank=3,
                                                            targets=("q", "down"))])
    plan = tying_plan(opt)
    assert list(plan.lora_slot_of_depth) == [None, 0, 1, 2, 3, None]
    nodes = nodes_by_role(opt.module, "lora")
    assert sorted((n.meta["fxforge"].layer, n.args[1].target.rsplit(".", 1)[1]) for n in nodes) == sorted(
        (d, p) for d in range(1, 5) for p in ("q_proj", "down_proj"))
    for node in nodes:
        notes = node.meta["fxforge"].notes["layer_tying"]
        assert notes["slot"] == plan.lora_slot_of_depth[notes["depth"]] == node.args[5]
    assert tuple(opt.module.lora.down_proj.A.shape) == (4, 3, 96) and tuple(opt.module.lora.q_proj.B.shape) == (4, 128, 3)


def test_original_model_is_untouched(ids):
    model = deep_model()
    before = model.logits(ids)
    fxforge.optimize(model, passes=[LayerTying(unique_layers=2, init="average", rank=4)])
    assert torch.equal(model.logits(ids), before)
    assert params(model, 2, "attn.q_proj.weight") is not params(model, 0, "attn.q_proj.weight")


def test_lowering_binds_the_lora_nodes(ids):
    tied = fxforge.optimize(deep_model(), passes=[LayerTying(unique_layers=3, rank=4)])
    lowered = fxforge.optimize(tied, passes=[Lower(backend="triton")])
    assert lowered.kernel_bindings()["lora"] == "triton"
    assert tying_plan(lowered) == tying_plan(tied)
    torch.testing.assert_close(lowered.logits(ids), tied.logits(ids), rtol=0, atol=1e-5)  # CPU: the references


def test_moe_ties_experts_and_relaxes_attention(ids):
    opt = fxforge.optimize(deep_model("mixtral-moe", 4), passes=[LayerTying(loops=2, rank=4, targets="q,k,v,o")])
    assert params(opt, 2, "mlp.experts.w_gate") is params(opt, 0, "mlp.experts.w_gate")
    assert len(nodes_by_role(opt.module, "lora")) == 4 * 4
    assert torch.isfinite(opt.logits(ids[:, :5] % 97)).all()


# ----------------------------------------------------------------------------------------------
# Parameter counts and artifacts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 6])
def test_unique_parameters_equal_the_stored_tensors_and_artifacts_round_trip(tmp_path, ids, rank):
    opt = fxforge.optimize(deep_model("llama-mqa-tied"), passes=[LayerTying(unique_layers=3, init="average", rank=rank)])
    opt.save(tmp_path / "art")
    buffers = {name for name, _ in opt.module.named_buffers()}
    with safe_open(str(tmp_path / "art" / "weights.safetensors"), framework="pt") as f:
        stored = {name: f.get_slice(name).get_shape() for name in f.keys()}
        aliases = json.loads(f.metadata()["fxforge_aliases"])
    stored_params = sum(torch.Size(shape).numel() for name, shape in stored.items() if name not in buffers)
    report = opt.passes[0]["report"]
    assert report["unique_parameters"] == stored_params < report["original_parameters"] + report["lora_parameters"]
    assert aliases["layers.4.attn.q_proj.weight"] == "layers.1.attn.q_proj.weight"
    assert "layers.4.attn.q_proj.weight" not in stored and "lm_head.weight" not in stored
    restored = load_artifact(tmp_path / "art")
    assert torch.equal(restored.logits(ids), opt.logits(ids))
    assert tying_plan(restored) == tying_plan(opt)
    assert params(restored, 5, "mlp.up_proj.weight") is params(restored, 2, "mlp.up_proj.weight")


def test_an_artifact_whose_weights_disagree_with_its_tying_is_refused(tmp_path):
    fxforge.optimize(deep_model(), passes=[LayerTying(unique_layers=3)]).save(tmp_path / "art")
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())
    plan["passes"][0]["config"]["unique_layers"] = 2
    (tmp_path / "art" / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(fxforge.FxforgeError, match="ties tensors"):
        load_artifact(tmp_path / "art")


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"unique_layers": 4}, "must divide the 6 layers"),
    ({"unique_layers": 5, "strategy": "middle-cycle"}, "K-2 must divide"),
    ({"loops": 4}, "loops=4 must divide"),
    ({"unique_layers": 3, "rank": 65}, "larger than the q_proj matrix"),
    ({"unique_layers": 3, "rank": 2, "targets": "q,gates"}, "unknown or repeated projection names"),
    ({"unique_layers": 3, "loops": 2}, "exactly one of unique_layers"),
    ({"unique_layers": 3, "strategy": "spiral"}, "expected one of"),
], ids=["k_divides", "middle_cycle", "loops", "rank", "target", "both", "strategy"])
def test_bad_options_fail_before_any_work(options, message):
    with pytest.raises(PassConfigError, match=message):
        fxforge.optimize(deep_model(), passes=[{"name": "layer-tying", **options}])


def test_moe_mlp_targets_are_refused():
    with pytest.raises(PassConfigError, match="experts take no LoRA"):
        fxforge.optimize(deep_model("mixtral-moe", 4), passes=[LayerTying(loops=2, rank=2)])


def test_ksort_and_tying_do_not_mix():
    model = deep_model()
    with pytest.raises(PassConfigError, match="already tied or K-sorted"):
        fxforge.optimize(model, passes=[KSort(block=16), LayerTying(unique_layers=3)])
    tied = fxforge.optimize(model, passes=[LayerTying(unique_layers=3)])
    with pytest.raises(PipelineError, match="ksort cannot run after layer-tying"):
        fxforge.optimize(tied, passes=[KSort(block=16)])


def test_cost_model_counts_each_depths_lora():
    from fxforge.ir.cost import BatchDesc, annotate_costs

    opt = fxforge.optimize(deep_model(), passes=[LayerTying(unique_layers=2, rank=3, targets="q,down")])
    costs = [c for c in annotate_costs(opt.module, opt.spec, BatchDesc("decode", 4, 64, "float32")) if c.role == "lora"]
    rows, rank = 4, 3
    q = (2 * rows * rank * (64 + 128) + rows * 128, 4 * (rank * (64 + 128) + rows * (64 + 2 * 128)))  # in 64, out 128
    down = (2 * rows * rank * (96 + 64) + rows * 64, 4 * (rank * (96 + 64) + rows * (96 + 2 * 64)))  # in 96, out 64
    assert sorted((c.flops, c.bytes) for c in costs) == sorted([q, down] * 6)
