"""fxforge/quality.py (rows, scoring, targets) and the CLI's KV-preset and quality-table options."""

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fxforge
from fxforge.cli import app
from fxforge.errors import FxforgeError
from fxforge.passes import BFPKVCache, KSort
from fxforge.quality import METHODS, Row, _score, table_rows, targets
from tests.conftest import tiny_model

runner = CliRunner()


def _fails_cleanly(args, message, output_dir=None):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output
    if output_dir is not None:
        assert not Path(output_dir).exists(), "a failed compile left output behind"


def test_rows_cover_every_method_and_build_their_passes():
    rows = table_rows(blocks=(16, 32), methods=tuple(METHODS), settings=("BFP12 K", "MXFP4 K"), presets=("k4",))
    assert len(rows) == 2 * len(METHODS) + len(METHODS) + 1  # MXFP4 only at block 32, then the preset
    by_method = {r.method: r.passes(512, 256, 8) for r in rows if r.block == 32 and r.setting == "BFP12 K"}
    assert [type(p) for p in by_method["natural"]] == [BFPKVCache]
    sort, bfp = by_method["pre_rope+calibrated+scale"]
    assert isinstance(sort, KSort) and sort.scale and sort.pre_rope and sort.permute and bfp.pre_rope
    sort, bfp = by_method["scale"]
    assert sort.scale and not sort.permute and not sort.pre_rope and not bfp.pre_rope
    preset = rows[-1].passes(512, 256, 8)
    assert preset[0].calib_tokens == 512 and preset[0].search_steps == 8, "the table's calibration budget applies"
    assert preset == by_method["pre_rope+calibrated+scale"], "k4 is the measured row it names (BENCHMARKS.md)"


def test_kv4_is_the_measured_k_and_v_row():
    rows = table_rows(blocks=(16,), methods=("pre_rope+calibrated+scale",), settings=("BFP12 K+V",), presets=("kv4",))
    assert rows[-1].passes(512, 256, 8) == rows[0].passes(512, 256, 8)


@pytest.mark.parametrize("kwargs, message", [({"methods": ("natural", "magic")}, "unknown quality-table method"),
                                             ({"settings": ("BFP13 K",)}, "unknown setting"),
                                             ({"presets": ("k5",)}, "unknown preset")], ids=["method", "setting", "preset"])
def test_bad_rows_are_named(kwargs, message):
    with pytest.raises(FxforgeError, match=message):
        table_rows(**kwargs)


def test_scores_are_perplexity_and_kl_against_the_baseline():
    """A row identical to the baseline scores its perplexity and KL 0; a quantized one a KL > 0 that
    matches a direct computation."""
    model = tiny_model()
    windows = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(1))
    same = fxforge.optimize(model, passes=[])
    coarse = fxforge.optimize(model, passes=[BFPKVCache(k_format="bfp12", v_format="bfp12", block=16)])
    scores = _score(model, [same, coarse], windows, batch_size=2, console=None)
    assert scores["tokens"] == 3 * 15
    assert scores["rows"][0]["nll"] == pytest.approx(scores["baseline"]["nll"]) and scores["rows"][0]["kl"] == 0
    base = torch.log_softmax(model.logits(windows)[:, :-1], -1)
    quant = torch.log_softmax(coarse.logits(windows)[:, :-1], -1)
    assert scores["rows"][1]["kl"] == pytest.approx(float((base.exp() * (base - quant)).sum()), rel=1e-4)
    assert scores["rows"][1]["kl"] > 0


def _row(setting, block, method, ppl, k_bits, v_bits):
    return {"setting": setting, "block": block, "method": method, "perplexity": ppl,
            "delta_pct": 100 * (ppl / 10 - 1), "k_bits": k_bits, "v_bits": v_bits}


def test_targets_read_the_table():
    results = {"baseline": {"perplexity": 10.0}, "rows": [
        _row("BFP12 K", 32, "natural", 13.0, 4.25, 32), _row("BFP12 K", 32, "calibrated", 12.0, 4.25, 32),
        _row("BFP12 K", 32, "pre_rope+calibrated+scale", 10.7, 4.25, 32),
        _row("BFP12 K+V", 16, "calibrated", 12.5, 4.5, 4.5), _row("kv4", None, "preset", 12.8, 4.6, 4.4),
        _row("BFP12 K", 16, "calibrated+scale", 10.5, 4.5, 32)]}
    out = targets(results)
    assert out["k_4.25_bits_within_8pct"]["met"] and out["k_4.25_bits_within_8pct"]["delta_pct"] == pytest.approx(7.0)
    assert "block 32 pre_rope+calibrated+scale" in out["k_4.25_bits_within_8pct"]["row"], "4.5-bit rows do not count"
    assert not out["kv_4.5_bits_within_12pct"]["met"]
    violations = out["none_worse_than_plain_ksort"]["violations"]
    assert len(violations) == 1 and violations[0].startswith("kv4 mixed preset"), violations
    assert math.isclose(out["bfp12_k_b32_calibrated_gap_removed"]["fraction"], 1 / 3)


def test_cli_kv_preset_errors_before_any_work(tmp_path):
    out = tmp_path / "o"
    _fails_cleanly(["compile", "smollm2-135m", "--kv-preset", "k3", "-o", str(out)], "unknown KV preset 'k3'", out)
    _fails_cleanly(["compile", "smollm2-135m", "--kv-preset", "k4", "--kv-format", "bfp12", "-o", str(out)],
                   "--kv-preset k4 sets the KV formats", out)
    _fails_cleanly(["eval", "smollm2-135m", "--kv-preset", "kv4", "--passes", "bfp-kv,lower"],
                   "remove ['bfp-kv'] from --passes")


def test_cli_quality_table_rejects_bad_names_before_loading():
    _fails_cleanly(["quality-table", "--methods", "natural,vibes"], "unknown quality-table method(s) ['vibes']")
    _fails_cleanly(["quality-table", "--presets", "k9"], "unknown preset(s) ['k9']")
    _fails_cleanly(["quality-table", "--blocks", "16,x"], "--blocks must be comma-separated integers >= 1, got '16,x'")


def test_cli_kv_preset_compiles_a_tiny_model(tmp_path, monkeypatch):
    """`compile --kv-preset k4` runs the preset's passes (with the calibration split) and saves them."""
    from fxforge import cli

    monkeypatch.setattr(cli, "_load", lambda *args, **kwargs: tiny_model())
    calib = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(2)).tolist()
    monkeypatch.setattr(cli, "_calib_texts", lambda passes, data: calib)
    presets = {"k4": [KSort(metric="calibrated", k_format="bfp12_16", scale=True, pre_rope=True, calib_tokens=128,
                            context=64, search_steps=4)]}
    import fxforge.passes as passes_module

    real = passes_module.kv_preset
    monkeypatch.setattr(passes_module, "kv_preset", lambda name: presets[name] + real(name)[1:])
    result = runner.invoke(app, ["compile", "--kv-preset", "k4", "-o", str(tmp_path / "art"), "--no-eval"])
    assert result.exit_code == 0, result.output
    plan = (tmp_path / "art" / "plan.json").read_text()
    assert '"ksort"' in plan and '"bfp-kv"' in plan and '"pre_rope": true' in plan
