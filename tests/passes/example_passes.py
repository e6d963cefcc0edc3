"""Passes for testing the pass manager and artifacts. Defining them registers nothing: tests ask for
the `example_passes` fixture (tests/conftest.py), which registers them for one test."""

import enum
from dataclasses import dataclass

from fxforge.ir import nodes_by_role
from fxforge.passes.manager import PassConfig, PassResult


class Mode(str, enum.Enum):
    SCALE = "scale"
    KEEP = "keep"


@dataclass(frozen=True)
class ScaleOProj(PassConfig):
    """Multiply o_proj of one layer by `factor` in place (a real, visible rewrite of a weight)."""

    layer: int = 0
    factor: float = 2.0
    mode: Mode = Mode.SCALE

    def __post_init__(self):
        super().__post_init__()
        if self.factor <= 0:
            raise ValueError(f"factor={self.factor} must be > 0")


def scale_oproj(gm, config, ctx):
    if config.mode is Mode.KEEP:
        return PassResult(gm, False, {})
    node = nodes_by_role(gm, "o_proj", config.layer)[0]
    gm.get_submodule(node.target).weight.data *= config.factor
    return PassResult(gm, True, {"scaled": node.target})


def scale_rewrites(config: ScaleOProj) -> tuple[str, ...]:
    return (f"layers.{config.layer}.attn.o_proj.weight",)


@dataclass(frozen=True)
class AfterScale(PassConfig):
    pass


def after_scale(gm, config, ctx):
    return PassResult(gm, False, {})


@dataclass(frozen=True)
class Sneaky(PassConfig):
    """Rewrites a weight in place without declaring it: the manager must stop it."""

    use_data: bool = False


def sneaky(gm, config, ctx):
    linear = gm.get_submodule(nodes_by_role(gm, "q_proj", 0)[0].target)
    if config.use_data:
        linear.weight.data = linear.weight.data * 2
    else:
        linear.weight.data.mul_(2)
    return PassResult(gm, True, {})


@dataclass(frozen=True)
class Broken(PassConfig):
    """Fails with a bug of its own (not bad input)."""


def broken(gm, config, ctx):
    raise KeyError("a bug inside the pass")


@dataclass(frozen=True)
class DropMeta(PassConfig):
    """Breaks the IR contract: strips the metadata of the first attention node."""


def drop_meta(gm, config, ctx):
    node = nodes_by_role(gm, "attention")[0]
    del node.meta["fxforge"]
    return PassResult(gm, True, {})


# name -> (config type, function, register_pass keyword arguments)
EXAMPLE_PASSES = {
    "test-scale-oproj": (ScaleOProj, scale_oproj, {"rewrites": scale_rewrites}),
    "test-after-scale": (AfterScale, after_scale, {"after": ("test-scale-oproj",)}),
    "test-sneaky": (Sneaky, sneaky, {}),
    "test-broken": (Broken, broken, {}),
    "test-drop-meta": (DropMeta, drop_meta, {}),
}
