"""The issue-12 commands: place, compile --passes opb-placement, calibrate-device; bad input is one
`error:` line, exit code 2, nothing written."""

import json
from pathlib import Path

import fxforge
import pytest
import torch
from typer.testing import CliRunner

from fxforge.artifact import load_artifact
from fxforge.cli import app
from fxforge.passes.opb_placement import PLAN_KEY
from fxforge.ir.devices import load_system
from tests.conftest import tiny_model

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _fails_cleanly(args, message, written=None):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in result.output, result.output
    if written is not None:
        assert not Path(written).exists(), f"a failed command left {written} behind"


def test_place_named_shape_writes_plan_report_and_plot(tmp_path):
    out = tmp_path / "place"
    _ok(["place", "mixtral-8x7b", "-o", str(out), "--devices", "h200,logic-pim", "--batch", "64", "--context", "4096"])
    plan = json.loads((out / "plan.json").read_text())
    assert plan["kind"] == "opb-placement" and plan["config"]["devices"] == ["h200", "logic-pim"]
    body = plan["plan"]
    assert body["predicted_step_s"] < min(body["single_device_s"].values())
    assert body["placement"]["attention"]["devices"] == {"logic-pim": 32}
    assert "threshold" in (out / "report.md").read_text()
    assert (out / "placement.png").stat().st_size > 1000


def test_compile_with_placement_and_calibrated_device(tmp_path):
    source = tmp_path / "tiny"
    fxforge.optimize(tiny_model("mixtral-moe"), passes=[]).save(source)
    device_file = tmp_path / "dev.json"
    _ok(["calibrate-device", "-o", str(device_file), "--quick", "--no-gpu", "--reps", "2", "--warmup", "1"])
    system = load_system([str(device_file)])
    assert list(system.devices) == ["local-cpu"] and "GPU parts skipped" in system.devices["local-cpu"].notes
    out = tmp_path / "art"
    _ok(["compile", str(source), "-o", str(out), "--no-eval", "--passes", "opb-placement",
         "--option", f"devices=h200,{device_file}", "--option", "batch=8", "--option", "context=64"])
    report = (out / "report.md").read_text()
    assert "## Op/B placement (modelled)" in report and "local-cpu" in report
    assert (out / "placement.png").stat().st_size > 1000
    record = json.loads((out / "plan.json").read_text())["passes"][0]
    assert record["name"] == "opb-placement" and record["report"]["expert_rules"]["0"]["memory_side"] == "local-cpu"
    # the artifact records the device file's contents: it loads, with the same plan, after the file is gone
    assert record["config"]["devices"][0].startswith("{")
    device_file.unlink()
    loaded = load_artifact(out)
    assert loaded.module.meta[PLAN_KEY]["predicted_step_s"] == record["report"]["predicted_step_s"]


def test_bad_input_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    _fails_cleanly(["place", "mixtral-8x7b", "-o", str(out), "--devices", "h200,a100"], "'a100' is neither a built-in",
                   out)
    _fails_cleanly(["compile", "smollm2-135m", "-o", str(out), "--no-eval", "--passes", "opb-placement",
                    "--option", "devices=h100,a100"], "'a100' is neither a built-in", out)
    bad = tmp_path / "gpu.json"
    bad.write_text(json.dumps({"name": "x", "peak_flops": {"bfloat16": 1e12}, "mem_bandwidth": 1e12}))
    _fails_cleanly(["place", "mixtral-8x7b", "-o", str(out), "--devices", f"h200,{bad}"],
                   "missing keys ['memory_bytes']", out)
    _fails_cleanly(["place", "mixtral-8x7b", "-o", str(out), "--devices", "h100,logic-pim", "--batch", "64"],
                   "cannot be held", out)
    _fails_cleanly(["place", "mixtral-8x7b", "-o", str(out), "--devices", "h200,host-cpu", "--memory-budget-gb", "2"],
                   "too small even for the dense part", out)
    _fails_cleanly(["place", "mixtral-8x7b", "-o", str(out), "--experts", "zipf"], "expected one of", out)
    _fails_cleanly(["calibrate-device", "-o", str(tmp_path)], "is a directory")
    _fails_cleanly(["calibrate-device", "-o", str(tmp_path / "d.json"), "--reps", "0"], "--reps", tmp_path / "d.json")


def test_duplex_study_smoke_reproduces_the_op_per_byte_facts(tmp_path):
    """Experts: Op/B ~ tokens per expert = batch * k / E; GQA decode attention: Op/B ~ g; the throughput
    table compares xPU + Logic-PIM with the xPU alone (a model result)."""
    files = [tmp_path / name for name in ("d.json", "d.md", "d.png")]
    _ok(["duplex-study", "--smoke", "--models", "mixtral-8x7b", "--batches", "16", "--lengths", "1024/1024",
         "--opb-batches", "64,256", "--top-ks", "1,2", "--json-out", str(files[0]), "--markdown-out", str(files[1]),
         "--plot", str(files[2])])
    results = json.loads(files[0].read_text())
    assert results["model_only"] and results["paper"]["speedup_up_to"] == 2.67
    row = {r["batch"]: r for r in results["opb"]}
    assert row[64]["expert_opb_top2"] == pytest.approx(64 * 2 / 8, rel=0.02)
    assert row[256]["expert_opb_top1"] == pytest.approx(256 / 8, rel=0.02)
    assert row[64]["attention_opb"] == pytest.approx(4, rel=0.01)
    (line,) = results["throughput"]
    assert line["speedup_any_op"] > 1 and line["duplex_overlap_tokens_per_s"] >= line["duplex_tokens_per_s"]
    skewed = line["skewed"]  # Zipf routing: shares fall with rank, every routed expert placed somewhere
    assert skewed["tokens_per_expert"] == sorted(skewed["tokens_per_expert"], reverse=True)
    assert sum(skewed["expert_split"].values()) == sum(1 for n in skewed["tokens_per_expert"] if n)
    assert "Model result" in files[1].read_text() and files[2].stat().st_size > 1000
    _fails_cleanly(["duplex-study", "--models", "gpt-5", "--json-out", str(tmp_path / "x.json")], "unknown ['gpt-5']")
    _fails_cleanly(["duplex-study", "--lengths", "1024", "--json-out", str(tmp_path / "x.json")], "LIN/LOUT")


def test_bench_costmodel_smoke(tmp_path):
    """On CPU with a calibrate-device spec (tiny widths): every class is measured and predicted, and the
    calibration (whose grid holds the uncalibrated point f = 1, no overhead) never raises a class's median error."""
    device_file = tmp_path / "dev.json"
    _ok(["calibrate-device", "-o", str(device_file), "--quick", "--no-gpu", "--reps", "1", "--warmup", "0"])
    out = tmp_path / "cm.json"
    _ok(["bench", "costmodel", "--smoke", "--models", "mixtral-8x7b", "--device", str(device_file), "--batches", "1,16",
         "--context", "64", "--prefill", "1x32", "--repeats", "1", "--json-out", str(out)])
    results = json.loads(out.read_text())
    assert set(results["factors"]) == {"attention_decode", "attention_prefill", "projection", "expert"}
    for kind, after in results["errors_after"].items():
        assert after["median_abs_pct"] <= results["errors_before"][kind]["median_abs_pct"] + 1e-9, kind
    assert all(r["measured_s"] > 0 and r["predicted_s"] > 0 for r in results["rows"])
    _fails_cleanly(["bench", "costmodel", "--smoke", "--models", "gpt-5", "--json-out", str(tmp_path / "x.json")],
                   "unknown ['gpt-5']")
    _fails_cleanly(["bench", "costmodel", "--smoke", "--device", "h200", "--json-out", str(tmp_path / "x.json")],
                   "has no cpu device")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calibrate_and_costmodel_on_cuda(tmp_path):
    """calibrate-device measures the GPU and its host link; bench costmodel times the Triton-bound nodes."""
    device_file = tmp_path / "dev.json"
    _ok(["calibrate-device", "-o", str(device_file), "--quick", "--reps", "2"])
    system = load_system([str(device_file)])
    gpu = system.devices["local-gpu"]
    assert gpu.kind == "xpu" and gpu.peak("bfloat16") > 1e12 and gpu.mem_bandwidth > 1e11
    assert system.link("local-gpu", "local-cpu").bandwidth > 1e9
    out = tmp_path / "cm.json"
    _ok(["bench", "costmodel", "--smoke", "--models", "mixtral-8x7b", "--device", str(device_file), "--batches",
         "1,64", "--context", "256", "--prefill", "2x128", "--repeats", "2", "--json-out", str(out)])
    results = json.loads(out.read_text())
    assert results["gpu"] and {r["class"] for r in results["rows"]} == {"attention_decode", "attention_prefill",
                                                                       "projection", "expert"}
