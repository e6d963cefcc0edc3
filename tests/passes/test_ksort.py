import pytest
import torch

import fxforge
from fxforge.errors import PassConfigError
from fxforge.ir import meta, nodes_by_role
from fxforge.ir.ops import ROPE
from fxforge.kernels.bfp import fake_quantize, parse_kv_format, simulate_quantize
from fxforge.kernels.rope import rope_ref
from fxforge.passes import BFPKVCache, KSort
from fxforge.passes.ksort import K_SCALE, _record
from fxforge.passes.ksort_search import Problem, objective, rope_rotation
from tests.conftest import TINY_SPECS, tiny_model

CALIB = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(3)).tolist()
FAST = dict(metric="calibrated", k_format="bfp12", block=16, context=64, search_steps=4, calib_tokens=128)


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


@pytest.mark.parametrize("options, bound", [({}, 0.95), ({"scale": True}, 0.6), ({"scale": True, "pre_rope": True}, 0.6),
                                            ({"permute": False, "scale": True}, 0.7)],
                         ids=["order", "order+scale", "pre_rope", "scale-only"])
def test_calibrated_never_worse_than_identity_on_its_objective(options, bound, tokens):
    """Every layer's objective is at most the identity's; on the outlier model the search finds much
    better (scales more than an order can: they shrink the outlier channels themselves)."""
    model = tiny_model("llama-gqa")
    opt = fxforge.optimize(model, passes=[KSort(**FAST, **options)], calib=CALIB)
    layers = opt.passes[0]["report"]["layers"]
    assert len(layers) == TINY_SPECS["llama-gqa"].num_layers
    assert all(r["k"]["objective_vs_identity"] <= 1.0 for r in layers)
    assert max(r["k"]["objective_vs_identity"] for r in layers) < bound, layers
    torch.testing.assert_close(opt.logits(tokens), model.logits(tokens), rtol=0, atol=1e-5)


def test_scales_are_exact_in_every_family(any_tiny_model, tokens):
    """Post-RoPE: order + pair-constant scales of K (folded into W_q / W_k, or the QK-norms) and free
    scales of V (W_v / W_o): weights changed, logits unchanged. A scale not constant on a RoPE pair
    would not commute with the rotation and would show here."""
    opt = fxforge.optimize(any_tiny_model, passes=[KSort(**FAST, scale=True, v_side=True)], calib=CALIB)
    assert opt.passes[0]["report"]["channels_scaled"] > 0
    spec = any_tiny_model.spec
    names = ["layers.0.attn.v_proj.weight", "layers.0.attn.o_proj.weight"]
    names += [f"layers.0.attn.{n}_norm.weight" for n in "qk"] if spec.qk_norm else ["layers.0.attn.k_proj.weight"]
    for name in names:
        before, after = any_tiny_model.module.get_parameter(name), opt.module.get_parameter(name)
        assert not torch.equal(after, before.expand_as(after)), f"{name} was not rewritten"
    torch.testing.assert_close(opt.logits(tokens), any_tiny_model.logits(tokens), rtol=0, atol=1e-5)


def test_pre_rope_keys_are_exact_in_every_family(any_tiny_model, tokens):
    """ksort pre_rope (key-RoPE order, per-channel scales) then bfp-kv pre_rope with unquantized
    formats: K's rope is gone, kv_write stores the key before RoPE, attention rotates it with the
    layer's key_rope table (scales inside), and the logits are unchanged."""
    opt = fxforge.optimize(any_tiny_model, passes=[KSort(**FAST, scale=True, pre_rope=True),
                                                    BFPKVCache(k_format="float32", v_format="native", pre_rope=True)],
                           calib=CALIB)
    gm = opt.module
    for layer in range(any_tiny_model.spec.num_layers):
        (write,), (attention,) = nodes_by_role(gm, "kv_write", layer), nodes_by_role(gm, "attention", layer)
        assert [meta(n).tensor for n in nodes_by_role(gm, "rope", layer)] == ["q"]
        assert attention.args[12].target == f"layers.{layer}.attn.key_rope"
        assert write.args[0].target is not ROPE and write.args[0].target is not torch.mul
    assert not any(n.target is torch.mul for n in gm.graph.nodes), "the scale node should have moved into key_rope"
    assert not torch.equal(gm.get_buffer("layers.0.attn.key_rope")[:, 1:], torch.ones(2, 2, 16)), "no scales"
    torch.testing.assert_close(opt.logits(tokens), any_tiny_model.logits(tokens), rtol=0, atol=1e-5)


def test_pre_rope_ksort_alone_keeps_the_graph_exact(tokens):
    """Without bfp-kv, pre-RoPE scales sit in a `k * s` node before K's RoPE: still exact."""
    model = tiny_model("qwen3-qknorm")
    opt = fxforge.optimize(model, passes=[KSort(**FAST, scale=True, pre_rope=True)], calib=CALIB)
    muls = [n for n in opt.module.graph.nodes if n.target is torch.mul]
    assert len(muls) == 2 and all(n.users and next(iter(n.users)).target is ROPE for n in muls)
    assert opt.module.get_buffer(f"layers.0.attn.{K_SCALE}").shape == (2, 32)
    torch.testing.assert_close(opt.logits(tokens), model.logits(tokens), rtol=0, atol=1e-5)


def test_pre_rope_cache_rearranges_an_order_that_splits_pairs(tokens):
    """A post-RoPE ksort order (or interleaved RoPE) is not a key-RoPE layout: bfp-kv pre_rope
    rearranges it (rows of W_q / W_k), exactly."""
    for kind, passes in (("llama-gqa", [KSort(block=16)]), ("llama-interleaved", [])):
        model = tiny_model(kind)
        opt = fxforge.optimize(model, passes=passes + [BFPKVCache(k_format="float32", v_format="native",
                                                                  pre_rope=True)])
        assert opt.passes[-1]["report"]["layers_rearranged"] == 2, kind
        torch.testing.assert_close(opt.logits(tokens), model.logits(tokens), rtol=0, atol=1e-5)
    natural = fxforge.optimize(tiny_model(), passes=[BFPKVCache(k_format="float32", v_format="native", pre_rope=True)])
    assert natural.passes[-1]["report"]["layers_rearranged"] == 0, "half-split RoPE is a key-RoPE layout already"


def test_pre_rope_scales_need_a_pre_rope_cache():
    with pytest.raises(PassConfigError, match="run bfp-kv with pre_rope=True"):
        fxforge.optimize(tiny_model(), passes=[KSort(**FAST, scale=True, pre_rope=True), BFPKVCache(block=16)],
                         calib=CALIB)


def test_objective_is_the_expected_squared_logit_error():
    """sum over keys and queries of (q . (k - Q(k)))^2 equals sum_n e_n^T (sum_q q q^T) e_n."""
    x, q = torch.randn(50, 32), torch.randn(40, 32)
    fmt = parse_kv_format("bfp12_16")
    manual = float(((q @ (x - fake_quantize(x, fmt)).T) ** 2).sum())
    identity = torch.arange(32)[None]
    assert float(objective(Problem(x, q.T @ q, fmt, "free"), identity, torch.ones(1, 32))[0]) == pytest.approx(manual,
                                                                                                            rel=1e-4)


def test_objective_of_an_order_and_scales_is_the_logit_error_the_reader_sees():
    """Pre-RoPE keys in a new order, stored divided by scales: the objective is sum over keys and
    queries of (q . rope(s * dequantized - k))^2, the logit error after the reader's rotation."""
    gen = torch.Generator().manual_seed(0)
    x, q = torch.randn(40, 32, generator=gen) * (1 + 8 * torch.rand(32, generator=gen)), torch.randn(30, 32, generator=gen)
    positions = torch.randint(0, 500, (40,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))
    perm, scale = torch.randperm(32, generator=gen), torch.rand(32, generator=gen) + 0.5
    fmt = parse_kv_format("bfp12_16")
    stored = x[:, perm] / scale[perm]
    read = torch.empty_like(x).scatter_(1, perm.expand_as(x), fake_quantize(stored, fmt) * scale[perm])
    rotate = lambda k: rope_ref(k[:, None], positions, inv_freq, False)[:, 0]  # noqa: E731
    manual = float(((q @ (rotate(read) - rotate(x)).T) ** 2).sum())
    cos, sin = rope_rotation(inv_freq, positions)
    problem = Problem(x, q.T @ q, fmt, "free", cos=cos, sin=sin)
    assert float(objective(problem, perm[None], scale[None])[0]) == pytest.approx(manual, rel=1e-4)


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
    ({"scale": True}, "scale=True needs metric='calibrated'"),
    ({"pre_rope": True}, "pre_rope=True needs metric='calibrated'"),
    ({"metric": "calibrated", "permute": False}, "leave nothing to do"),
], ids=["block", "format", "dense", "metric", "scale", "pre_rope", "nothing"])
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


@pytest.mark.parametrize("kind", ["qwen3-qknorm", "llama-interleaved"])
def test_restored_pre_rope_artifact_equals_saved(kind, tmp_path, tokens):
    """Scales, key-RoPE orders and key_rope tables replay from structure and saved buffers alone."""
    opt = fxforge.optimize(tiny_model(kind), passes=[KSort(**FAST, scale=True, pre_rope=True, v_side=True),
                                                     BFPKVCache(k_format="bfp12", v_format="bfp12", block=16,
                                                                pre_rope=True)], calib=CALIB)
    opt.save(tmp_path / "a")
    restored = fxforge.load(str(tmp_path / "a"))
    assert torch.equal(restored.logits(tokens), opt.logits(tokens))


def test_block_spanning_head_dim_is_a_no_op(tokens):
    """One block per row: every order quantizes alike, so ksort leaves the model exactly as it was."""
    model = tiny_model("llama-gqa")
    opt = fxforge.optimize(model, passes=[KSort(k_format="bfp12_32")])  # tiny head_dim is 32
    assert opt.passes[0]["report"]["channels_moved"] == 0 and "spans head_dim" in opt.passes[0]["report"]["skipped"]
    assert torch.equal(opt.logits(tokens), model.logits(tokens))
