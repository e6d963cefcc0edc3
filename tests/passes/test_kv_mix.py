import itertools

import pytest
import torch

import fxforge
from fxforge.errors import PassConfigError
from fxforge.ir import nodes_by_role
from fxforge.kernels.bfp import parse_kv_format
from fxforge.passes import KV_PRESETS, BFPKVCache, KSort, KVMix, kv_preset
from fxforge.passes.kv_mix import _assign
from tests.conftest import tiny_model

CALIB = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(5)).tolist()
FAST = dict(calib_tokens=128, context=64)


def bits(fmt: str) -> float:
    return parse_kv_format(fmt).bits_per_value()


@pytest.mark.parametrize("quantize_v", [False, True], ids=["k-only", "k+v"])
def test_dynamic_programme_is_the_best_assignment_under_the_budget(quantize_v):
    """Against brute force over every assignment of 4 layers: least total proxy within the budget."""
    gen = torch.Generator().manual_seed(11)
    k_formats, v_formats = ("bfp12_16", "bfp12_32", "bfp14_32"), (("bfp12_32", "bfp16_32") if quantize_v else ("native",))
    proxy = {"k": {f: torch.rand(4, generator=gen).tolist() for f in k_formats},
             "v": {f: torch.rand(4, generator=gen).tolist() for f in v_formats}}
    config = KVMix(bits=5.0, k_formats=k_formats, v_formats=v_formats)
    chosen = _assign(proxy, k_formats, v_formats, config, 4)
    count = 8 if quantize_v else 4

    def cost(assignment):
        return sum(bits(k) + (bits(v) if quantize_v else 0) for k, v in assignment) / count

    def loss(assignment):
        return sum(proxy["k"][k][i] + (proxy["v"][v][i] if quantize_v else 0) for i, (k, v) in enumerate(assignment))

    feasible = [a for a in itertools.product(itertools.product(k_formats, v_formats), repeat=4) if cost(a) <= 5.0]
    best = min(feasible, key=loss)
    assert cost(chosen) <= 5.0 and loss(chosen) == pytest.approx(loss(best)), (chosen, best)


def test_layers_get_formats_within_the_budget(tokens):
    """Two layers, budget 4.375 between bfp12_32 (4.25) and bfp12_16 (4.5): exactly one layer gets block
    16, the one whose proxy gains more from it; kv_write and attention agree; the config that replays it
    is recorded."""
    model = tiny_model("llama-gqa")
    opt = fxforge.optimize(model, passes=[KVMix(bits=4.375, k_formats=("bfp12_16", "bfp12_32"), **FAST)], calib=CALIB)
    report = opt.passes[0]["report"]
    proxy = report["proxy_kl"]["k"]
    gain = [proxy["bfp12_32"][i] - proxy["bfp12_16"][i] for i in range(2)]
    wanted = ["bfp12_16" if i == max(range(2), key=gain.__getitem__) else "bfp12_32" for i in range(2)]
    assert [k for k, _ in opt.kv_formats()] == wanted, (proxy, opt.kv_formats())
    assert all(v == "float32" for _, v in opt.kv_formats())
    assert report["average_bits_per_value"] <= 4.375
    assert opt.passes[0]["config"]["layers"] == [[k, "native"] for k in wanted]
    for layer, (k_fmt, v_fmt) in enumerate(opt.kv_formats()):
        for node in nodes_by_role(opt.module, "attention", layer):
            assert node.args[8:10] == (k_fmt, v_fmt)


def test_proxy_ranks_formats_by_their_error():
    """Per layer, the proxy KL of a coarser format exceeds a finer one's (bfp12 > bfp16 > 0)."""
    opt = fxforge.optimize(tiny_model(), passes=[KVMix(bits=8.5, k_formats=("bfp12_16", "bfp16_16"), **FAST)],
                           calib=CALIB)
    proxy = opt.passes[0]["report"]["proxy_kl"]["k"]
    assert all(a > b > 0 for a, b in zip(proxy["bfp12_16"], proxy["bfp16_16"])), proxy


def test_values_join_the_budget_and_pre_rope_wiring_stays(tokens, tmp_path):
    """With quantized V the budget counts K and V; a pre-RoPE cache keeps its key_rope; the saved
    artifact replays the chosen formats without calibration data."""
    model = tiny_model("qwen3-qknorm")
    opt = fxforge.optimize(model, passes=[BFPKVCache(k_format="bfp12", v_format="bfp12", block=16, pre_rope=True),
                                          KVMix(bits=5.5, k_formats=("bfp12_16", "bfp16_16"),
                                                v_formats=("bfp12_16", "bfp16_16"), **FAST)], calib=CALIB)
    formats = opt.kv_formats()
    assert sum(bits(k) + bits(v) for k, v in formats) / 4 <= 5.5
    assert len({f for pair in formats for f in pair}) == 2, f"expected a mix, got {formats}"
    assert all(n.args[12] is not None for n in nodes_by_role(opt.module, "attention"))
    opt.save(tmp_path / "a")
    restored = fxforge.load(str(tmp_path / "a"))
    assert restored.kv_formats() == formats
    assert torch.equal(restored.logits(tokens), opt.logits(tokens))


@pytest.mark.parametrize("options, message", [
    ({"bits": 4.0}, "below the cheapest candidates' 4.25 bits"),
    ({"k_formats": ["bfp13_32"]}, "unknown KV format 'bfp13_32'"),
    ({"k_formats": ["bfloat16"]}, "not a block format"),
    ({"v_formats": ["native", "bfp12_32"]}, "cannot be mixed"),
    ({"k_formats": ["bfp12_64"]}, "none of k_formats \\['bfp12_64'\\] has a block dividing head_dim=32"),
    ({"layers": [["bfp12_32", "native"]]}, "layers has 1 entries; the model has 2 layers"),
    ({"bits": 0}, "must be a positive number"),
], ids=["budget", "format", "dense", "native-mix", "block", "layers", "bits"])
def test_bad_configs_fail_before_any_work(options, message):
    model = tiny_model()
    before = model.kv_formats()
    with pytest.raises(PassConfigError, match=message):
        fxforge.optimize(model, passes=[{"name": "kv-mix", "k_formats": ["bfp12_32"], **options}], calib=CALIB)
    assert model.kv_formats() == before


def test_without_calibration_data_is_a_clear_error():
    with pytest.raises(PassConfigError, match="kv-mix needs calibration data"):
        fxforge.optimize(tiny_model(), passes=[KVMix(**FAST)])


@pytest.mark.parametrize("name, budget, quantize_v, names", [("k4", 4.25, False, ["ksort", "bfp-kv"]),
                                                             ("kv4", 4.5, True, ["ksort", "bfp-kv"])])
def test_presets_meet_their_budget_and_stay_exact_in_structure(name, budget, quantize_v, names, tokens):
    """The presets run end to end (ksort pre-RoPE + calibrated scales and order, bfp-kv pre-RoPE) and stay
    within their bits per value."""
    passes = [p.__class__(**{**p.to_dict(), **({"search_steps": 4} if isinstance(p, KSort) else {}),
                             **({"calib_tokens": 128, "context": 64} if isinstance(p, (KSort, KVMix)) else {})})
              for p in kv_preset(name)]
    opt = fxforge.optimize(tiny_model(), passes=passes, calib=CALIB)
    formats = opt.kv_formats()
    k_bits = sum(bits(k) for k, _ in formats) / len(formats)
    v_bits = sum(bits(v) for _, v in formats) / len(formats)
    assert ((k_bits + v_bits) / 2 if quantize_v else k_bits) <= budget
    assert (v_bits < 16) == quantize_v
    assert [r["name"] for r in opt.passes] == names
    assert torch.isfinite(opt.logits(tokens)).all()


def test_unknown_preset():
    with pytest.raises(PassConfigError, match="unknown KV preset 'k3'; valid presets: k4, kv4"):
        kv_preset("k3")
    assert set(KV_PRESETS) == {"k4", "kv4"}
