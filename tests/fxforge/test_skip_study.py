"""SkipDecode at the surface: `fxforge recover` trains a skip-decode artifact under its schedule
(checkpoints, resume), `fxforge skip-study` and `fxforge bench skip-decode` smoke runs on CPU, bad
input (one error line, exit 2, nothing written)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from fxforge.artifact import load_artifact
from fxforge.cli import app
from fxforge.ir.skip import skip_schedule
from fxforge.ir.training import causal_logits
from fxforge.recover import Checkpoints, SkipStudent, kd_loss, load_teacher, student_for
from tests.fxforge.test_recover import SMALL, settings, write_checkpoint, write_text

runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("skip")


@pytest.fixture(scope="module")
def skipped(workdir):
    """A 4-layer tiny checkpoint compiled with skip-decode (1 warm-up layer, a(t) from 3 to 1 over 8 tokens)."""
    source = write_checkpoint(workdir / "hf")
    result = runner.invoke(app, ["compile", str(source), "--random-init", "--passes", "skip-decode", "--option",
                                 "min_layers=1", "--option", "max_layers=3", "--option", "span=8", "--no-eval",
                                 "-o", str(workdir / "skip")])
    assert result.exit_code == 0, result.output
    return workdir / "skip"


def recover_args(artifact, out, text, steps):
    return ["recover", str(artifact), "-o", str(out), "--minutes", "2", "--device", "cpu", "--max-steps", str(steps),
            "--data", text, "--eval-tokens", "64", "--eval-context", "32",
            *[f"--{k.replace('_', '-')}={v}" for k, v in {**SMALL, "lr": 3e-4}.items()]]


def test_recover_trains_under_the_schedule_and_resumes(skipped, workdir):
    assert isinstance(student_for(load_artifact(skipped)), SkipStudent)
    text = write_text(workdir / "text.txt")
    out = workdir / "recovered"
    result = runner.invoke(app, recover_args(skipped, out, text, 3))
    assert result.exit_code == 0, result.output
    first = json.loads((out / "recovery.json").read_text())
    assert first["student"] == "SkipStudent" and first["steps"] == 3
    result = runner.invoke(app, recover_args(skipped, out, text, 6))  # the same run, more steps: resumes
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "recovery.json").read_text())
    assert summary["steps"] == 6 and summary["student_perplexity_before"] == first["student_perplexity_before"]
    before, after = load_artifact(skipped), load_artifact(out)
    assert skip_schedule(after) == skip_schedule(before)  # still served with its schedule
    teacher = load_teacher(before, "cpu")
    ids = Checkpoints(out).read_data().windows.long()  # the text it trained on
    kl = [kd_loss(SkipStudent(m).logits(ids), causal_logits(teacher.module, teacher.spec, ids), ids, settings())[1]
          for m in (before, after)]
    assert kl[1] < kl[0]  # distilled towards the full model under the schedule


def test_skip_study_smoke(skipped, workdir):
    """The whole study on the tiny checkpoint (random weights): both methods at two speed-ups, before and
    after a few training steps, perplexity and agreement with the full model's greedy outputs."""
    text = write_text(workdir / "study.txt")
    json_out, md_out = workdir / "study.json", workdir / "study.md"
    result = runner.invoke(app, ["skip-study", str(workdir / "hf"), "--random-init", "--data", text, "--device", "cpu",
                                 "--speedups", "1.5,2", "--warmup-layers", "0", "--prompts", "3",
                                 "--max-new-tokens", "6", "--max-steps", "2",
                                 "--train-seconds", "30", "--batch-size", "2", "--seq-len", "16", "--samples", "2",
                                 "--sample-tokens", "8", "--eval-tokens", "64", "--eval-context", "32", "--json-out",
                                 str(json_out), "--markdown-out", str(md_out), "--plot", str(workdir / "study.png")])
    assert result.exit_code == 0, result.output
    results = json.loads(json_out.read_text())
    runs = {(r["method"], r["target_speedup"]): r for r in results["runs"]}
    assert set(runs) == {(m, s) for m in ("skip-decode", "static-exit") for s in (1.5, 2.0)}
    for (method, speedup), run in runs.items():
        assert run["steps"] == 2 and run["layer_speedup"] == pytest.approx(speedup, rel=0.35)
        for when in ("before", "after"):
            assert run[when]["perplexity"] > 1 and 0 <= run[when]["token_agreement"] <= 1
    assert runs[("static-exit", 2.0)]["layers"] == 2 and runs[("skip-decode", 2.0)]["mean_depth"] == pytest.approx(2)
    assert "met" in results["targets"]["skip_beats_static_exit"] and "| 2.0x | skip-decode |" in md_out.read_text()
    assert (workdir / "study.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU smoke run (on CUDA the tiny model would bench the "
                    "Triton kernels at head_dim 8; benchmarks/skipdecode_h200.sh runs the real benchmark)")
def test_bench_skip_decode_smoke(skipped, workdir):
    json_out = workdir / "bench.json"
    result = runner.invoke(app, ["bench", "skip-decode", str(workdir / "hf"), "--random-init", "--smoke", "--speedups",
                                 "2", "--batches", "2", "--max-new-tokens", "6", "--prompt-len", "5", "--repeats", "1",
                                 "--skip-kv-fraction", "0.5", "--decay", "step", "--levels", "3", "--json-out",
                                 str(json_out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(json_out.read_text())["rows"]
    expected = [("full", "full"), ("skip 2.0x", "bucket"), ("skip 2.0x", "mask")]
    assert [(r["model"], r["policy"]) for r in rows] == expected
    assert all(r["tokens"] == 4 * 6 and r["decode_tokens_per_second"] > 0 for r in rows)
    assert rows[1]["layer_ratio"] > 1 and 0 < rows[1]["kv_saving"] < 1 and 0 < rows[1]["kv_memory_saving"] < 1


@pytest.mark.parametrize("args,message", [
    (["skip-study", "--speedups", "0.5"], "--speedups must be comma-separated numbers >= 1.0"),
    (["skip-study", "--decay", "cubic", "--random-init"], "expected one of"),
    (["bench", "skip-decode", "--speedups", "x"], "--speedups must be"),
    (["bench", "skip-decode", "--skip-kv-fraction", "0"], "--skip-kv-fraction must be in (0, 1]"),
    (["bench", "skip-decode", "--smoke", "--random-init", "--warmup-layers", "9"], "warmup_layers=9"),
])
def test_bad_input_exits_2_and_writes_nothing(skipped, workdir, args, message):
    json_out = workdir / "never.json"
    args = [args[0], *(args[1:2] if args[0] == "bench" else []), str(workdir / "hf"),
            *args[2 if args[0] == "bench" else 1:], "--json-out", str(json_out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not json_out.exists()
