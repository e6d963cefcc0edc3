"""Pass registry and manager.

A pass is a frozen dataclass config (subclass of PassConfig) plus a function
`(gm, config, ctx) -> PassResult`, registered under a stable name with `@register_pass`. The CLI,
logs and plan.json use the name. Ordering constraints (`after=`) are checked when the pipeline is
built; `ir.verify` runs between passes.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

from fxforge.errors import PassConfigError


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config. Subclasses validate their fields in __post_init__ (calling super's
    first, which turns strings into the declared str Enums)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            enum_type = _enum_type(f.type)
            value = getattr(self, f.name)
            if enum_type and not isinstance(value, enum_type):
                object.__setattr__(self, f.name, _coerce_enum(enum_type, value, f.name, type(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PassConfig":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(names)
        if unknown:
            raise PassConfigError(f"unknown option(s) {sorted(unknown)} for pass {pass_name(cls)!r}; "
                                  f"valid options: {sorted(names)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise PassConfigError(f"invalid config for pass {pass_name(cls)!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(self).items()}


def _enum_type(kind) -> type | None:
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind
    if isinstance(kind, str):  # postponed annotations: resolve against the registry's known enums
        return _ENUMS.get(kind)
    return None


def _coerce_enum(enum_type, value, key, cls):
    try:
        return enum_type(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        valid = [m.value for m in enum_type]
        raise ValueError(f"{key}={value!r} is not valid for pass {pass_name(cls)!r}; "
                         f"expected one of {valid}") from None


_ENUMS: dict[str, type] = {}


def register_enum(enum_type: type) -> type:
    """Make a str Enum usable in configs written with postponed annotations."""
    _ENUMS[enum_type.__name__] = enum_type
    return enum_type


@dataclass
class PassContext:
    """What a pass may use besides the graph: the model (tokenizer, spec) and calibration texts.

    `restoring` is True when an artifact is being reloaded: the pass must rebuild the same graph
    structure without data-dependent work, since the saved weights overwrite every value.
    """

    model: Any = None
    calib: list[str] | None = None
    restoring: bool = False
    debug: bool = True


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassInfo:
    name: str
    config_type: type
    fn: Callable[[fx.GraphModule, PassConfig, PassContext], PassResult]
    after: tuple[str, ...]  # if present in the pipeline, these passes must run earlier
    doc: str
    check: Callable | None = None  # check(config, spec): raise before any pass runs




_BY_NAME: dict[str, PassInfo] = {}
_BY_TYPE: dict[type, PassInfo] = {}


def register_pass(name: str, config_type: type, after: tuple[str, ...] = (), check: Callable | None = None):
    """Decorator: register `fn(gm, config, ctx) -> PassResult` under `name` and `config_type`.

    `check(config, spec)` validates the config against the model before any pass of the pipeline
    runs (e.g. a block that does not divide head_dim), so bad input fails before work is done.
    """

    def wrap(fn):
        if name in _BY_NAME and _BY_NAME[name].fn is not fn:
            raise ValueError(f"pass name {name!r} is already registered")
        info = PassInfo(name, config_type, fn, tuple(after), (fn.__doc__ or "").strip(), check)
        _BY_NAME[name] = _BY_TYPE[config_type] = info
        return fn

    return wrap


def registered_passes() -> dict[str, PassInfo]:
    _load_builtin_passes()
    return dict(_BY_NAME)


def pass_name(config_type: type) -> str:
    info = _BY_TYPE.get(config_type)
    return info.name if info else config_type.__name__


def _load_builtin_passes() -> None:
    import fxforge.passes  # noqa: F401  (registers the built-in passes on import)


def resolve(spec: PassConfig | str | dict) -> PassConfig:
    """A config from a config object, a pass name, or {"name": ..., **options}."""
    _load_builtin_passes()
    if isinstance(spec, PassConfig):
        if type(spec) not in _BY_TYPE:
            raise PassConfigError(f"{type(spec).__name__} is not a registered pass config")
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise PassConfigError(f"cannot read pass {spec!r}: expected a pass config, a name or a dict with 'name'")
    options = dict(spec)
    name = options.pop("name")
    if name not in _BY_NAME:
        raise PassConfigError(f"unknown pass {name!r}; registered passes: {sorted(_BY_NAME)}")
    return _BY_NAME[name].config_type.from_dict(options)


def build_pipeline(passes: list) -> list[PassConfig]:
    """Resolve every entry and check ordering constraints before any work is done."""
    configs = [resolve(p) for p in passes]
    names = [_BY_TYPE[type(c)].name for c in configs]
    for i, name in enumerate(names):
        for earlier in _BY_TYPE[type(configs[i])].after:
            if earlier in names[i + 1:]:
                raise PassConfigError(f"pass {name!r} must run after {earlier!r}; reorder the pass list "
                                      f"(got {names})")
    return configs


def check_pipeline(configs: list[PassConfig], spec) -> None:
    """Run every pass's model-dependent check; raises PassConfigError naming the pass and the input."""
    for config in configs:
        info = _BY_TYPE[type(config)]
        if info.check is not None:
            try:
                info.check(config, spec)
            except ValueError as exc:
                raise PassConfigError(f"pass {info.name!r} cannot run on {spec.name or spec.family}: {exc}") from None


def run_pipeline(gm: fx.GraphModule, configs: list[PassConfig], ctx: PassContext, progress=None) -> tuple[fx.GraphModule, list[dict]]:
    """Run passes in order with ir.verify between them; return the graph and one record per pass."""
    from fxforge.ir.verify import verify

    records = []
    check_pipeline(configs, gm.meta["spec"])
    if ctx.debug:
        verify(gm)
    for config in configs:
        info = _BY_TYPE[type(config)]
        start = time.perf_counter()
        result = info.fn(gm, config, ctx)
        gm = result.gm
        gm.recompile()
        if ctx.debug:
            verify(gm)
        records.append({"name": info.name, "config": config.to_dict(), "modified": result.modified,
                        "report": result.report, "seconds": round(time.perf_counter() - start, 3)})
        if progress is not None:
            progress(info.name)
    return gm, records
