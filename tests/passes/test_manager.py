import enum
from dataclasses import dataclass

import pytest
import torch

import fxforge
from fxforge.errors import PassConfigError
from fxforge.ir import nodes_by_role
from fxforge.passes.manager import PassConfig, PassResult, build_pipeline, register_enum, register_pass, resolve
from tests.conftest import tiny_model


@register_enum
class Mode(str, enum.Enum):
    SCALE = "scale"
    KEEP = "keep"


@dataclass(frozen=True)
class ScaleOProj(PassConfig):
    """Test pass: multiply o_proj of one layer by `factor` (a real, visible rewrite)."""

    layer: int = 0
    factor: float = 2.0
    mode: Mode = Mode.SCALE

    def __post_init__(self):
        super().__post_init__()
        if self.factor <= 0:
            raise ValueError(f"factor={self.factor} must be > 0")


@register_pass("test-scale-oproj", ScaleOProj)
def scale_oproj(gm, config, ctx):
    if config.mode is Mode.KEEP:
        return PassResult(gm, False, {})
    node = nodes_by_role(gm, "o_proj", config.layer)[0]
    gm.get_submodule(node.target).weight.data *= config.factor
    return PassResult(gm, True, {"scaled": node.target})


@dataclass(frozen=True)
class AfterScale(PassConfig):
    pass


@register_pass("test-after-scale", AfterScale, after=("test-scale-oproj",))
def after_scale(gm, config, ctx):
    return PassResult(gm, False, {})


def test_identity_pipeline_is_bit_identical(any_tiny_model, tokens):
    opt = fxforge.optimize(any_tiny_model, passes=[])
    assert torch.equal(opt.logits(tokens), any_tiny_model.logits(tokens))
    assert opt.passes == []


def test_pass_runs_records_and_leaves_original_untouched(tokens):
    model = tiny_model()
    before = model.logits(tokens)
    opt = fxforge.optimize(model, passes=[{"name": "test-scale-oproj", "factor": 3.0}, "test-after-scale"])
    assert torch.equal(model.logits(tokens), before)
    assert not torch.allclose(opt.logits(tokens), before)
    assert [r["name"] for r in opt.passes] == ["test-scale-oproj", "test-after-scale"]
    assert opt.passes[0]["modified"] is True and opt.passes[1]["modified"] is False
    assert opt.passes[0]["config"] == {"layer": 0, "factor": 3.0, "mode": "scale"}


def test_config_objects_names_and_dicts_resolve_alike():
    assert resolve(ScaleOProj(factor=2.0)) == resolve({"name": "test-scale-oproj", "factor": 2.0})
    assert resolve("test-scale-oproj") == ScaleOProj()
    assert resolve({"name": "test-scale-oproj", "mode": "keep"}).mode is Mode.KEEP


@pytest.mark.parametrize("bad, message", [
    ({"name": "no-such-pass"}, "unknown pass 'no-such-pass'"),
    ({"name": "test-scale-oproj", "facter": 2}, "unknown option(s) ['facter']"),
    ({"name": "test-scale-oproj", "factor": -1.0}, "factor=-1.0 must be > 0"),
    ({"name": "test-scale-oproj", "mode": "squash"}, "mode='squash' is not valid"),
    (42, "cannot read pass 42"),
], ids=["unknown-name", "unknown-key", "bad-value", "bad-enum", "not-a-pass"])
def test_bad_pass_specs_are_clear_errors(bad, message):
    with pytest.raises(PassConfigError) as info:
        build_pipeline([bad])
    assert message in str(info.value)


def test_ordering_constraint_checked_when_pipeline_is_built():
    with pytest.raises(PassConfigError, match="must run after 'test-scale-oproj'"):
        build_pipeline(["test-after-scale", "test-scale-oproj"])
    assert len(build_pipeline(["test-scale-oproj", "test-after-scale"])) == 2


def test_config_is_frozen():
    config = ScaleOProj()
    with pytest.raises(Exception):
        config.factor = 5.0
