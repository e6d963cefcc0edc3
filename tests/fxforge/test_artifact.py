import json
import os

import pytest
import torch

import fxforge
from fxforge.artifact import load_artifact
from fxforge.errors import FxforgeError, OutputPathError
from tests.conftest import tiny_model
from tests.passes.example_passes import ScaleOProj


@pytest.mark.usefixtures("example_passes")
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mqa-tied", "mixtral-moe", "qwen3-qknorm"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tokens, kind):
    opt = fxforge.optimize(tiny_model(kind), passes=[ScaleOProj(factor=1.5)])
    opt.save(tmp_path / "art")
    files = sorted(p.name for p in (tmp_path / "art").iterdir())
    assert files == ["graph.py", "plan.json", "report.md", "weights.safetensors"]
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())
    assert plan["schema_version"] == 2 and plan["passes"][0]["name"] == "test-scale-oproj"
    assert plan["passes"][0]["version"] == 1 and plan["kernel_bindings"]["attention"] == "reference"
    assert "torch.ops.fxforge.attention" in (tmp_path / "art" / "graph.py").read_text()
    restored = load_artifact(tmp_path / "art")
    assert torch.equal(restored.logits(tokens), opt.logits(tokens))
    assert restored.passes == opt.passes


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    opt = fxforge.optimize(tiny_model(), passes=[])
    import fxforge.artifact as artifact

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact, "render_report", boom)
    with pytest.raises(RuntimeError):
        opt.save(tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_existing_artifact_is_replaced_whole_and_foreign_dir_refused(tmp_path):
    opt = fxforge.optimize(tiny_model(), passes=[])
    opt.save(tmp_path / "art")
    opt.save(tmp_path / "art")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match="not an fxforge artifact"):
        opt.save(tmp_path / "other")
    assert (tmp_path / "other" / "precious.txt").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputPathError, match="cannot write"):
        fxforge.optimize(tiny_model(), passes=[]).save(locked / "art")


def test_corrupt_plan_is_a_clear_error(tmp_path):
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(FxforgeError, match="not a readable fxforge artifact"):
        load_artifact(tmp_path)


def _saved(tmp_path, passes) -> "Path":
    fxforge.optimize(tiny_model(), passes=passes).save(tmp_path / "art")
    return tmp_path / "art"


def _edit_plan(path, edit) -> None:
    plan = json.loads((path / "plan.json").read_text())
    edit(plan)
    (path / "plan.json").write_text(json.dumps(plan))


def test_a_resaved_optimised_model_keeps_its_whole_history(tmp_path, tokens):
    """Defect: compiling an artifact again dropped the passes it already had, so it loaded with a float32 cache."""
    art = _saved(tmp_path, [{"name": "bfp-kv", "k_format": "bfp12", "v_format": "bfp16", "block": 16}])
    again = fxforge.optimize(load_artifact(art), passes=[{"name": "lower", "backend": "torch"}])
    again.save(tmp_path / "again")
    restored = load_artifact(tmp_path / "again")
    assert [r["name"] for r in restored.passes] == ["bfp-kv", "lower"]
    assert restored.kv_formats() == [("bfp12_16", "bfp16_16")] * 2
    assert restored.kv_bytes_per_token() == again.kv_bytes_per_token() < tiny_model().kv_bytes_per_token()
    assert torch.equal(restored.logits(tokens), again.logits(tokens))


def test_plan_that_disagrees_with_what_loads_is_an_error(tmp_path):
    art = _saved(tmp_path, [{"name": "bfp-kv", "k_format": "bfp12", "v_format": "bfp16", "block": 16}])
    _edit_plan(art, lambda plan: plan.update(passes=[]))  # formats recorded, the pass that set them gone
    with pytest.raises(FxforgeError, match=r"does not restore to its plan: plan.json says kv_formats \[\['bfp12_16'"):
        load_artifact(art)


def test_plan_with_another_config_version_is_refused(tmp_path):
    art = _saved(tmp_path, [{"name": "bfp-kv", "block": 16}])
    _edit_plan(art, lambda plan: plan["passes"][0].update(version=99))
    with pytest.raises(FxforgeError, match="'bfp-kv' .* recorded with config version 99; this fxforge's is 1"):
        load_artifact(art)


def test_artifact_of_an_older_schema_is_refused_with_advice(tmp_path):
    art = _saved(tmp_path, [])
    _edit_plan(art, lambda plan: plan.update(schema_version=1))
    with pytest.raises(FxforgeError, match="schema_version 1; this fxforge reads 2: compile it again"):
        load_artifact(art)


def test_report_names_the_source_in_words(tmp_path):
    art = _saved(tmp_path, [])
    report = (art / "report.md").read_text()
    assert "- source: " in report and "{" not in report.split("- source: ")[1].splitlines()[0]
