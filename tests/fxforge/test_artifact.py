import json
import os

import pytest
import torch

import fxforge
from fxforge.artifact import load_artifact
from fxforge.errors import FxforgeError, OutputPathError
from tests.conftest import tiny_model
from tests.passes.test_manager import ScaleOProj  # registers the test pass


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mqa-tied", "mixtral-moe", "qwen3-qknorm"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tokens, kind):
    opt = fxforge.optimize(tiny_model(kind), passes=[ScaleOProj(factor=1.5)])
    opt.save(tmp_path / "art")
    files = sorted(p.name for p in (tmp_path / "art").iterdir())
    assert files == ["graph.py", "plan.json", "report.md", "weights.safetensors"]
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())
    assert plan["schema_version"] == 1 and plan["passes"][0]["name"] == "test-scale-oproj"
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
