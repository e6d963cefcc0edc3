"""The command line: bad input is one `error:` line, exit code 2, nothing written; the main commands work."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fxforge.cli import app

runner = CliRunner()


def _fails_cleanly(args, message, output_dir=None):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output
    if output_dir is not None:
        assert not Path(output_dir).exists(), "a failed compile left output behind"


def test_unknown_model(tmp_path):
    _fails_cleanly(["compile", "gpt-17", "-o", str(tmp_path / "out"), "--no-eval"], "unknown model 'gpt-17'",
                   tmp_path / "out")


def test_truncated_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 100)
    _fails_cleanly(["compile", str(bad), "-o", str(tmp_path / "out"), "--no-eval"], "model.gguf", tmp_path / "out")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    _fails_cleanly(["compile", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--no-eval"], "GPT2LMHeadModel",
                   tmp_path / "out")


def test_unknown_pass_fails_before_loading(tmp_path):
    _fails_cleanly(["compile", "smollm2-135m", "--passes", "ksort,warp-drive", "-o", str(tmp_path / "out")],
                   "unknown pass 'warp-drive'", tmp_path / "out")


def test_invalid_pass_option(tmp_path):
    _fails_cleanly(["compile", "smollm2-135m", "--passes", "bfp-kv", "--kv-format", "bfp13", "-o", str(tmp_path / "o")],
                   "bfp13", tmp_path / "o")
    _fails_cleanly(["compile", "smollm2-135m", "--passes", "ksort", "--ksort-metric", "vibes", "-o", str(tmp_path / "o")],
                   "metric='vibes' is not valid", tmp_path / "o")


def test_bad_bench_and_run_options_fail_before_any_work(tmp_path):
    _fails_cleanly(["bench", "e2e", "--decode-steps", "16,0"], "--decode-steps must be comma-separated integers >= 1")
    _fails_cleanly(["bench", "e2e", "--max-num-seqs", "lots"], "--max-num-seqs must be comma-separated integers >= 1")
    _fails_cleanly(["bench", "e2e", "--repeats", "0"], "--repeats must be >= 1")
    _fails_cleanly(["bench", "moe", "--shapes", "mixtral-8x7b,gpt-moe"],
                   "--shapes 'mixtral-8x7b,gpt-moe': unknown ['gpt-moe']; known MoE shapes: ['mixtral-8x7b', 'qwen3-30b-a3b']")
    _fails_cleanly(["bench", "moe", "--tokens", "1,0"], "--tokens must be comma-separated integers >= 1")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    _fails_cleanly(["run", "llama-3-8b", "--prompts", str(prompts), "--decode-steps", "0", "--out",
                    str(tmp_path / "r.jsonl")], "--decode-steps must be >= 1")
    assert not (tmp_path / "r.jsonl").exists()


def test_run_and_analyze_check_their_outputs_before_any_work(tmp_path):
    """Newcomer report: these generated (or analysed) everything, then crashed writing the result."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    _fails_cleanly(["run", "no-such-model", "--prompts", str(prompts), "--out", "/proc/fxforge/r.jsonl"],
                   "cannot write --out '/proc/fxforge/r.jsonl'")
    _fails_cleanly(["run", "no-such-model", "--prompts", str(prompts), "--out", str(tmp_path)], "is a directory")
    _fails_cleanly(["analyze", "llama-3-8b", "--plot", "/proc/fxforge/x.png"], "cannot write --plot '/proc/fxforge/x.png'")


def test_block_error_names_the_format_in_effect(tmp_path):
    _fails_cleanly(["compile", "smollm2-135m", "--block", "7", "--no-eval", "-o", str(tmp_path / "o")],
                   "k_format='bfp16' with block=7", tmp_path / "o")  # the default pipeline's format
    _fails_cleanly(["compile", "smollm2-135m", "--passes", "bfp-kv", "--block", "7", "--no-eval", "-o",
                    str(tmp_path / "o")], "k_format='bfp12' (the pass default) with block=7", tmp_path / "o")


def test_options_apply_to_the_default_pipeline(tmp_path):
    out = tmp_path / "a"
    result = runner.invoke(app, ["compile", "smollm2-135m", "--random-init", "--kv-format", "bfp12", "--no-eval",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["passes"][0]["config"]["k_format"] == "bfp12" and plan["kv_formats"][0] == ["bfp12_32", "bfp16_32"]


def test_unwritable_output(tmp_path):
    _fails_cleanly(["compile", "smollm2-135m", "--no-eval", "-o", "/proc/fxforge-out"], "not writable")


def test_output_dir_that_is_not_an_artifact_is_refused(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    _fails_cleanly(["compile", "smollm2-135m", "--no-eval", "-o", str(tmp_path / "keep")], "not an fxforge artifact")
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"


def test_analyze_named_shape_writes_roofline(tmp_path):
    plot = tmp_path / "roof.png"
    result = runner.invoke(app, ["analyze", "llama-3-8b", "--phase", "decode", "--batch", "64", "--context", "4096",
                                 "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert plot.stat().st_size > 10_000
    assert summary["totals"]["flops"] > 0 and len(summary["layers"]) >= 32


def test_roofline_plot_names_the_roles_of_the_table():
    from fxforge.analyze import _plot_points

    roles = [{"role": "q_proj", "flops": 4e9, "bytes": 1e8, "time_s": 1e-5},
             {"role": "mlp_gate", "flops": 8e9, "bytes": 2e8, "time_s": 2e-5},
             {"role": "embed", "flops": 0, "bytes": 1e6, "time_s": 1e-6}]
    assert [name for name, _, _ in _plot_points(roles)] == ["q_proj", "mlp_gate"]


def test_help_everywhere():
    for command in ([], ["compile"], ["eval"], ["analyze"], ["generate"], ["run"], ["quality-table"], ["bench", "e2e"],
                    ["bench", "attention"], ["bench", "moe"]):
        result = runner.invoke(app, command + ["--help"])
        assert result.exit_code == 0 and "Usage" in result.output, command


def test_compiling_an_artifact_again_appends_to_its_passes(tmp_path):
    """Issue 8 defect 1, as a user met it: bfp-kv, then lower on the artifact; the result keeps both passes
    and loads with the packed cache (SmolLM2 shape: 9,000 KV bytes per token, not float32's 46,080)."""
    first, second = tmp_path / "a1", tmp_path / "a2"
    result = runner.invoke(app, ["compile", "smollm2-135m", "--random-init", "--passes", "bfp-kv", "--kv-format",
                                 "bfp12", "--v-format", "bfp16", "--no-eval", "-o", str(first)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compile", str(first), "--passes", "lower", "--no-eval", "-o", str(second)])
    assert result.exit_code == 0, result.output
    plan = json.loads((second / "plan.json").read_text())
    assert [p["name"] for p in plan["passes"]] == ["bfp-kv", "lower"]
    assert plan["kv_formats"][0] == ["bfp12_32", "bfp16_32"] and plan["kv_bytes_per_token"] == 9000
    import fxforge

    assert fxforge.load(str(second)).kv_bytes_per_token() == 9000
    _fails_cleanly(["compile", str(second), "--passes", "ksort", "--no-eval", "-o", str(tmp_path / "a3")],
                   "already ran 'bfp-kv', and 'ksort' must run before it", tmp_path / "a3")


@pytest.mark.slow
def test_main_job_compile_eval_run_generate_on_smollm2(tmp_path):
    """The README's main job (smaller eval), then run and generate from the artifact."""
    out = tmp_path / "smollm2"
    result = runner.invoke(app, ["compile", "smollm2-135m", "-o", str(out), "--max-tokens", "1022"])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert [p["name"] for p in plan["passes"]] == ["bfp-kv"]
    assert plan["kv_formats"][0] == ["bfp16_32", "bfp16_32"]
    report = (out / "report.md").read_text()
    assert "baseline perplexity" in report and "## Quality" in report
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2 + 3?"}\n{"prompt": "Name a colour."}\n')
    result = runner.invoke(app, ["run", str(out), "--prompts", str(prompts), "--out", str(tmp_path / "r.jsonl"),
                                 "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["tokens"] >= 1 and r["output"] for r in rows)
    result = runner.invoke(app, ["generate", str(out), "--prompt", "What is 2 + 3?", "--max-new-tokens", "8"])
    assert result.exit_code == 0 and "What is 2 + 3?" in result.output
    result = runner.invoke(app, ["eval", str(out), "--max-tokens", "500", "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output[result.output.index("{"):])
    assert scores["tokens"] == 511 and scores["kv_bytes_per_token"] == plan["kv_bytes_per_token"]
    assert abs(scores["perplexity"] / scores["baseline_perplexity"] - 1) < 0.01  # BFP16: a small, real change
    assert scores["perplexity"] != scores["baseline_perplexity"]
