"""fxforge tying-study and fxforge bench tying: the whole study and the serving benchmark run end to end
on CPU with a tiny random model (smoke runs: they prove the code path, they measure nothing)."""

import json

import pytest
import torch
from typer.testing import CliRunner

import fxforge
from fxforge.cli import app
from fxforge.passes import LayerTying
from fxforge.tying_bench import pass_weight_bytes
from fxforge.tying_study import Run, drop_layers, equal_drop, layer_parameters, study_runs, tied_parameters
from tests.fxforge.test_recover import write_checkpoint, write_text
from tests.passes.test_layer_tying import deep_model

runner = CliRunner()


def study(tmp_path, source, *extra):
    return runner.invoke(app, [
        "tying-study", str(source), "--random-init", "--data", write_text(tmp_path / "text.txt"), "--unique-layers", "2",
        "--inits", "stepwise", "--train-seconds", "60", "--max-steps", "2", "--batch-size", "2", "--seq-len", "16",
        "--samples", "2", "--sample-tokens", "6", "--eval-tokens", "48", "--eval-context", "16", "--device", "cpu",
        *extra])


def test_study_cli_writes_table_json_and_plot_and_resumes(tmp_path):
    source = write_checkpoint(tmp_path / "hf")
    first = tmp_path / "first.json"
    result = study(tmp_path, source, "--ranks", "0", "--json-out", str(first), "--plot", str(tmp_path / "first.png"))
    assert result.exit_code == 0, result.output
    files = {"json": tmp_path / "study.json", "png": tmp_path / "study.png", "md": tmp_path / "study.md"}
    result = study(tmp_path, source, "--ranks", "0,4", "--resume", str(first), "--json-out", str(files["json"]),
                   "--plot", str(files["png"]), "--markdown-out", str(files["md"]))
    assert result.exit_code == 0, result.output
    earlier, results = json.loads(first.read_text()), json.loads(files["json"].read_text())
    assert results["runs"][:2] == earlier["runs"] and results["text"] == earlier["text"]  # kept, not rerun
    assert {r["method"] for r in results["runs"]} == {"relaxed", "zero-lora", "layer-drop"} and not results["skipped"]
    assert all(r["steps"] == 2 and r["perplexity_after"] > 1 for r in results["runs"])
    spec = fxforge.load(str(source), random_init=True).spec
    for r in results["runs"]:
        if r["method"] != "layer-drop":  # the analytic count that sizes the baselines is the real one
            assert r["unique_parameters"] == tied_parameters(spec, r["layers"], r["rank"]), r["label"]
    assert set(results["targets"]) == {"relaxed_beats_layer_drop", "svd_beats_zero_init"}
    assert len(results["targets"]["relaxed_beats_layer_drop"]["pairs"]) == 2
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files["md"].read_text().count("\n| ") == len(results["runs"]) + 1  # + the original's row
    other = study(tmp_path, source, "--ranks", "4", "--lr", "0.5", "--resume", str(first), "--json-out",
                  str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png"))
    assert other.exit_code == 2 and "give the same options" in other.output


def test_layer_drop_baselines_match_the_relaxed_parameter_counts():
    spec = deep_model().spec
    runs = study_runs(spec, (3, 2), ("stepwise", "average"), (0, 8))
    assert [r for r in runs if r.method == "zero-lora"] == [Run("zero-lora", 3, "average", 8), Run("zero-lora", 2, "average", 8)]
    for k in (3, 2):
        for rank in (0, 8):
            drop = equal_drop(spec, k, rank)
            assert Run("layer-drop", drop) in runs
            gap = abs(tied_parameters(spec, k, rank) - tied_parameters(spec, drop, 0))
            assert gap <= layer_parameters(spec) / 2, (k, rank, drop)
    assert equal_drop(spec, 2, 0) == 2


def test_drop_layers_keeps_the_stepwise_layers(tokens):
    model = deep_model()
    dropped = drop_layers(model, 3)  # layers 0, 2, 5 of 6
    assert dropped.spec.num_layers == 3
    assert torch.equal(dropped.module.layers[1].mlp.up_proj.weight, model.module.layers[2].mlp.up_proj.weight)
    assert dropped.module.layers[2].attn.q_proj.weight.data_ptr() != model.module.layers[5].attn.q_proj.weight.data_ptr()


def test_pass_weight_bytes_count_blocks_per_depth_or_once():
    model = deep_model()
    tied = fxforge.optimize(model, passes=[LayerTying(unique_layers=2)])
    layer = sum(p.numel() * 4 for p in model.module.layers[0].parameters())
    assert pass_weight_bytes(tied, depthwise=False) - pass_weight_bytes(tied, depthwise=True) == 4 * layer
    assert pass_weight_bytes(tied, depthwise=False) == pass_weight_bytes(model, depthwise=False)


def test_bench_cli_smoke(tmp_path):
    source = write_checkpoint(tmp_path / "hf")
    result = runner.invoke(app, ["bench", "tying", str(source), "--random-init", "--unique-layers", "2", "--rank", "4",
                                 "--batches", "2", "--max-new-tokens", "3", "--prompt-len", "5", "--repeats", "1",
                                 "--smoke", "--json-out", str(tmp_path / "bench.json")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "bench.json").read_text())
    modes = sorted((r["model"], r["mode"]) for r in results["rows"])
    assert modes == [("original", "lockstep"), ("relaxed K=2 r=4", "depthwise"), ("relaxed K=2 r=4", "lockstep"),
                     ("tied K=2", "depthwise"), ("tied K=2", "lockstep")]
    assert all(r["tokens"] == 4 * 3 for r in results["rows"])
    passes = {(r["model"], r["mode"]): r["forward_passes"] for r in results["rows"]}
    assert passes[("tied K=2", "depthwise")] >= 2 * passes[("tied K=2", "lockstep")] - 2  # 2 loops per token
    assert "lora_overhead_pct" in results["targets"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_needs_cuda_or_smoke():
    result = runner.invoke(app, ["bench", "tying", "--batches", "64"])
    assert result.exit_code == 2 and "needs a CUDA device" in result.output


def test_a_deadline_skips_the_runs_not_started():
    from fxforge.recover import RecoverySettings, TrainingText
    from fxforge.tying_study import run_study

    teacher = deep_model()
    windows = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = study_runs(teacher.spec, (3,), ("stepwise",), (0,))
    results = run_study(teacher, runs, TrainingText(windows, {}), windows, RecoverySettings(minutes=1, max_steps=1),
                        deadline=0.0)
    assert results["runs"] == [] and results["skipped"] == [r.label for r in runs]
