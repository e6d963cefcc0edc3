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
