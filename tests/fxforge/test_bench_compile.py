"""`fxforge bench compile`: refuses cleanly without CUDA or with bad options; --smoke runs the whole path on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fxforge.cli import app

runner = CliRunner()


def _error(args) -> str:
    result = runner.invoke(app, ["bench", "compile", *args])
    assert result.exit_code == 2, result.output
    return result.output.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_needs_cuda_without_smoke(tmp_path):
    assert _error(["--json-out", str(tmp_path / "r.json")]).startswith("error: fxforge bench compile needs a CUDA device")
    assert not (tmp_path / "r.json").exists()


def test_bad_options_fail_before_any_work():
    assert "unknown option(s) ['speed']" in _error(["--smoke", "--options", '{"speed": 1}'])
    assert "--options is not valid JSON" in _error(["--smoke", "--options", "{k_format"])
    assert "unknown ['tvm']" in _error(["--smoke", "--backends", "eager,tvm"])
    assert "--prefill must be BATCHxTOKENS" in _error(["--smoke", "--prefill", "8by512"])
    assert "cannot write --json-out" in _error(["--smoke", "--json-out", "/proc/fxforge/r.json"])


@pytest.mark.slow
def test_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "compile.json"
    result = runner.invoke(app, ["bench", "compile", "--smoke", "--models", "llama-3-8b", "--backends",
                                 "eager,fxforge", "--prefill", "2x16", "--decode-batches", "2", "--context", "8",
                                 "--repeats", "1", "--dtype", "float32", "--options", '{"k_format": "bfp16"}',
                                 "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["workload"], r["backend"]) for r in rows] == [
        ("prefill b2x16", "eager"), ("prefill b2x16", "fxforge"), ("decode b2 ctx8", "eager"), ("decode b2 ctx8", "fxforge")]
    fx_rows = [r for r in rows if r["backend"] == "fxforge"]
    assert all(r["replaced"] == {"rmsnorm": 3, "swiglu": 1, "rope": 2, "attention": 1} for r in fx_rows)
    assert all(r["ms"] > 0 and r["compile_s"] > 0 for r in rows)
