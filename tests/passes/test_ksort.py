import pytest
import torch

import fxforge
from fxforge.errors import PassConfigError
from fxforge.ir import meta, nodes_by_role
from fxforge.kernels.bfp import fake_quantize, parse_kv_format, simulate_quantize
from fxforge.passes import BFPKVCache, KSort
from fxforge.passes.ksort import _objective, _record
from tests.conftest import TINY_SPECS, tiny_model


def test_ksort_is_exact_without_quantization(any_tiny_model, tokens):
    """Structure changed (weights permuted, rope rewritten) and logits unchanged, every family."""
    opt = fxforge.optimize(any_tiny_model, passes=[KSort(block=16, v_side=True)])
    assert opt.passes[0]["modified"] and opt.passes[0]["report"]["channels_moved"] > 0
    for node in nodes_by_role(opt.module, "rope"):
        assert node.args[4] is not None, "rope was not rewritten with the permutation"
    base = any_tiny_model.module.layers[0].attn.k_proj.weight
    assert not torch.equal(opt.module.get_submodule("layers.0.attn.k_proj").weight, base)
    torch.testing.assert_close(opt.logits(tokens), any_tiny_model.logits(tokens), rtol=0, atol=1e-5)


def test_weight_norm_order_is_descending_row_norm():
    model = tiny_model("llama-gqa")
    opt = fxforge.optimize(model, passes=[KSort(block=16)])
    spec = TINY_SPECS["llama-gqa"]
    w = opt.module.get_submodule("layers.0.attn.k_proj").weight.view(spec.num_kv_heads, spec.head_dim, -1).norm(dim=-1)
    assert torch.all(w[:, :-1] >= w[:, 1:]), "permuted W_k rows are not in descending norm order"


def test_ksort_permutation_round_trip_and_composition(tokens):
    """Applying ksort twice composes the rope permutation and still matches the original."""
    model = tiny_model("qwen3-qknorm")
    once = fxforge.optimize(model, passes=[KSort(block=16)])
    twice = fxforge.optimize(once, passes=[KSort(block=16, v_side=True)])
    torch.testing.assert_close(twice.logits(tokens), model.logits(tokens), rtol=0, atol=1e-5)
    perm = twice.module.get_buffer("layers.0.attn.k_channel_perm")
    assert torch.equal(perm.sort(dim=-1).values, torch.arange(perm.shape[1]).expand_as(perm))


def test_calibrated_never_worse_than_identity_on_its_objective(tokens):
    model = tiny_model("llama-gqa")
    calib = torch.randint(0, 257, (4, 64), generator=torch.Generator().manual_seed(3)).tolist()
    opt = fxforge.optimize(model, passes=[KSort(metric="calibrated", k_format="bfp12", block=16, context=64, search_steps=8,
                                                calib_tokens=256)], calib=calib)
    layers = opt.passes[0]["report"]["layers"]
    assert len(layers) == TINY_SPECS["llama-gqa"].num_layers
    assert all(r["k"]["objective_vs_identity"] <= 1.0 for r in layers)
    assert min(r["k"]["objective_vs_identity"] for r in layers) < 0.95, "the search found nothing better"
    torch.testing.assert_close(opt.logits(tokens), model.logits(tokens), rtol=0, atol=1e-5)


def test_objective_is_the_expected_squared_logit_error():
    """sum over keys and queries of (q . (k - Q(k)))^2 equals sum_n e_n^T (sum_q q q^T) e_n."""
    x, q = torch.randn(50, 32), torch.randn(40, 32)
    fmt = parse_kv_format("bfp12_16")
    manual = float(((q @ (x - fake_quantize(x, fmt)).T) ** 2).sum())
    assert _objective(x, q.T @ q, fmt) == pytest.approx(manual, rel=1e-4)


def test_ksort_reduces_bfp_error_on_outlier_model(tokens):
    """With outlier channels in W_k, the post-RoPE keys the cache stores lose less to BFP12 blocks in
    sorted order than in natural order (squared error; a permutation is orthogonal, so the errors
    compare directly). The logit KL of this tiny random model (~1e-7) is too small to rank orders:
    it flipped with the CPU's BLAS."""
    model = tiny_model("llama-gqa")
    fmt = parse_kv_format("bfp12_16")

    def key_error(passes):
        keys = _record(fxforge.optimize(model, passes=passes).module, tokens, model.spec)
        return sum(float((k - simulate_quantize(k, fmt)).pow(2).sum()) for (name, _), k in keys.items() if name == "k")

    natural, sorted_ = key_error([]), key_error([KSort(block=16)])
    assert 0 < sorted_ < 0.97 * natural, f"sorted {sorted_:.4g} vs natural {natural:.4g}"


@pytest.mark.parametrize("bad, message", [
    ({"block": 24}, "unsupported block=24"),
    ({"k_format": "bfp13"}, "unknown KV format 'bfp13'"),
    ({"k_format": "bfloat16"}, "not a block format"),
    ({"metric": "magic"}, "metric='magic' is not valid"),
], ids=["block", "format", "dense", "metric"])
def test_bad_configs(bad, message):
    with pytest.raises(PassConfigError, match=message):
        fxforge.optimize(tiny_model(), passes=[{"name": "ksort", **bad}])


def test_block_must_divide_head_dim_checked_before_work():
    model = tiny_model()
    before = model.module.layers[0].attn.k_proj.weight.clone()
    with pytest.raises(PassConfigError, match="head_dim=32 is not a multiple of block=64"):
        fxforge.optimize(model, passes=[KSort(block=64)])
    assert torch.equal(model.module.layers[0].attn.k_proj.weight, before)


def test_calibrated_without_data_is_a_clear_error():
    with pytest.raises(ValueError, match="needs calibration data"):
        fxforge.optimize(tiny_model(), passes=[KSort(metric="calibrated", block=16)])


def test_restored_artifact_equals_saved(tmp_path, tokens):
    opt = fxforge.optimize(tiny_model("qwen3-qknorm"), passes=[KSort(block=16, v_side=True),
                                                              BFPKVCache(k_format="bfp12", v_format="bfp16", block=16)])
    opt.save(tmp_path / "a")
    restored = fxforge.load(str(tmp_path / "a"))
    assert torch.equal(restored.logits(tokens), opt.logits(tokens))
    assert restored.kv_formats() == opt.kv_formats() == [("bfp12_16", "bfp16_16")] * 2
    assert all(meta(n).notes.get("bfp-kv") for n in nodes_by_role(restored.module, "kv_write"))


def test_block_spanning_head_dim_is_a_no_op(tokens):
    """One block per row: every order quantizes alike, so ksort leaves the model exactly as it was."""
    model = tiny_model("llama-gqa")
    opt = fxforge.optimize(model, passes=[KSort(k_format="bfp12_32")])  # tiny head_dim is 32
    assert opt.passes[0]["report"]["channels_moved"] == 0 and "spans head_dim" in opt.passes[0]["report"]["skipped"]
    assert torch.equal(opt.logits(tokens), model.logits(tokens))
