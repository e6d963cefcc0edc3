"""Pass registry and manager.

A pass is a frozen dataclass config (subclass of PassConfig, with a VERSION) plus a function
`(gm, config, ctx) -> PassResult`, registered under a stable name with `@register_pass`. The CLI,
logs and plan.json use the name; plans record each config's version and replay refuses another.
Ordering constraints (`after=`) are checked when the pipeline is built, against the passes a model
already ran too; `ir.verify` runs between passes; a failure names the pass, its position and the
passes before it. A pass declares the weights it rewrites (`rewrites=`, globs over parameter and
buffer names): unless the run is in place, those tensors are cloned before it runs, every other
tensor stays shared with the model the graph came from, and a pass that changes an undeclared
shared tensor is stopped with an error naming it. A pass whose data-dependent choices live in the
graph's structure rather than in its tensors (kv-mix's per-layer formats) returns a resolved config
that states them (`PassResult.config`); that one is recorded, so replay needs no data.
"""

from __future__ import annotations

import dataclasses
import enum
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch.fx as fx

from fxforge.ir.errors import FxforgeError, PassConfigError, PipelineError


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config. Subclasses validate their fields in __post_init__ (calling super's
    first, which turns strings into the declared str Enums). VERSION changes whenever a config's
    meaning changes; artifacts record it and replay refuses a different one."""

    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            enum_type = hints.get(f.name)
            value = getattr(self, f.name)
            if isinstance(enum_type, type) and issubclass(enum_type, enum.Enum) and not isinstance(value, enum_type):
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
        """JSON-ready values: enums by value, tuples as lists (as plan.json gives them back)."""
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _field_types(cls: type) -> dict[str, Any]:
    """Field annotations resolved against the config's own module (postponed annotations are strings)."""
    return typing.get_type_hints(cls)


def _coerce_enum(enum_type, value, key, cls):
    try:
        return enum_type(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        valid = [m.value for m in enum_type]
        raise ValueError(f"{key}={value!r} is not valid for pass {pass_name(cls)!r}; "
                         f"expected one of {valid}") from None


@dataclass
class PassContext:
    """What a pass may use besides the graph: the model (tokenizer, spec) and calibration texts.

    `restoring` is True when an artifact is being reloaded: the pass must rebuild the same graph
    structure without data-dependent work, since the saved weights overwrite every value.
    `inplace` is True when the graph's tensors are the caller's to rewrite (no copy-on-write).
    """

    model: Any = None
    calib: list[str] | None = None
    restoring: bool = False
    debug: bool = True
    inplace: bool = False


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)
    config: PassConfig | None = None  # recorded instead of the given config (same type), e.g. with choices filled in


@dataclass(frozen=True)
class PassInfo:
    name: str
    config_type: type
    fn: Callable[[fx.GraphModule, PassConfig, PassContext], PassResult]
    after: tuple[str, ...]  # if present in the pipeline, these passes must run earlier
    doc: str
    check: Callable | None = None  # check(config, spec): raise before any pass runs
    rewrites: Callable[[PassConfig], tuple[str, ...]] | None = None  # globs of the tensors it changes


_BY_NAME: dict[str, PassInfo] = {}
_BY_TYPE: dict[type, PassInfo] = {}


def register_pass(name: str, config_type: type, after: tuple[str, ...] = (), check: Callable | None = None,
                  rewrites: Callable | tuple[str, ...] = ()):
    """Decorator: register `fn(gm, config, ctx) -> PassResult` under `name` and `config_type`.

    `check(config, spec)` validates the config against the model before any pass of the pipeline
    runs (e.g. a block that does not divide head_dim), so bad input fails before work is done.
    `rewrites` names the parameters and buffers the pass changes, as globs over qualified names
    ("layers.*.attn.k_proj.*"), or a function config -> globs.
    """

    def wrap(fn):
        if name in _BY_NAME and _BY_NAME[name].fn is not fn:
            raise ValueError(f"pass name {name!r} is already registered (by {_qualname(_BY_NAME[name].fn)})")
        if config_type in _BY_TYPE and _BY_TYPE[config_type].name != name:
            raise ValueError(f"{_qualname(config_type)} is already the config of pass {_BY_TYPE[config_type].name!r}")
        declared = rewrites if callable(rewrites) else (lambda config, globs=tuple(rewrites): globs)
        info = PassInfo(name, config_type, fn, tuple(after), (fn.__doc__ or "").strip(), check, declared)
        _BY_NAME[name] = _BY_TYPE[config_type] = info
        return fn

    return wrap


def unregister_pass(name: str) -> None:
    """Remove a registered pass (tests register their own passes for the duration of a fixture)."""
    info = _BY_NAME.pop(name)
    del _BY_TYPE[info.config_type]


def _qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


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


def record_configs(records: list[dict]) -> list[PassConfig]:
    """The configs of a model's pass history (plan.json records), checking each recorded version."""
    configs = []
    for i, record in enumerate(records):
        config = resolve({"name": record["name"], **record["config"]})
        if record.get("version") != config.VERSION:
            raise PassConfigError(f"pass {record['name']!r} (#{i + 1} of the model's history) was recorded with "
                                  f"config version {record.get('version')}; this fxforge's is {config.VERSION}: "
                                  "compile the model again from its source")
        configs.append(config)
    return configs


def build_pipeline(passes: list, history: list[PassConfig] = ()) -> list[PassConfig]:
    """Resolve every entry and check ordering constraints before any work is done; `history` are the
    passes the model already ran (they count as earlier in the pipeline)."""
    configs = [resolve(p) for p in passes]
    done = [_BY_TYPE[type(c)].name for c in history]
    names = done + [_BY_TYPE[type(c)].name for c in configs]
    for i, name in enumerate(names):
        for earlier in _BY_TYPE[type((list(history) + configs)[i])].after:
            if earlier not in names[i + 1:]:
                continue
            if i < len(done):
                raise PassConfigError(f"the model already ran {name!r}, and {earlier!r} must run before it; apply "
                                      f"{earlier!r} to the source model instead (history {done}, new {names[len(done):]})")
            raise PassConfigError(f"pass {name!r} must run after {earlier!r}; reorder the pass list (got {names[len(done):]})")
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


def record(config: PassConfig, result: PassResult, seconds: float) -> dict:
    """One entry of a model's pass history, as plan.json stores it (the resolved config if the pass gave one)."""
    if result.config is not None:
        if type(result.config) is not type(config):
            raise PipelineError(f"pass {_BY_TYPE[type(config)].name!r} resolved its config to a "
                                f"{type(result.config).__name__}; it must stay a {type(config).__name__}")
        config = result.config
    return {"name": _BY_TYPE[type(config)].name, "version": config.VERSION, "config": config.to_dict(),
            "modified": result.modified, "report": result.report, "seconds": round(seconds, 3)}


def run_pipeline(gm: fx.GraphModule, configs: list[PassConfig], ctx: PassContext,
                 progress=None) -> tuple[fx.GraphModule, list[dict]]:
    """Run passes in order with ir.verify between them; return the graph and one record per pass.

    Unless ctx.inplace (or restoring), gm's tensors are taken as shared with the caller's model:
    each pass gets clones of the tensors it declares, and may change no other.
    """
    from fxforge.ir.sharing import TensorGuard, own
    from fxforge.ir.verify import verify

    check_pipeline(configs, gm.meta["spec"])
    guard = None if ctx.inplace or ctx.restoring else TensorGuard(gm)
    if ctx.debug:
        _checked(lambda: verify(gm), "the IR check before the first pass", [])
    records = []
    for i, config in enumerate(configs):
        info = _BY_TYPE[type(config)]
        where = f"pass {info.name!r} (#{i + 1} of {len(configs)})"
        before = [r["name"] for r in records]
        if guard is not None:
            own(gm, info.rewrites(config))
            guard.release(gm)
        start = time.perf_counter()
        result = _checked(lambda: info.fn(gm, config, ctx), where, before)
        gm = result.gm
        gm.recompile()
        if guard is not None and guard.changed():
            raise PipelineError(f"{where} changed tensors it shares with the original model without declaring them "
                                f"(register_pass(rewrites=...)): {guard.changed()[:5]}")
        if ctx.debug:
            _checked(lambda: verify(gm), f"the IR check after {where}", before)
        records.append(record(config, result, time.perf_counter() - start))
        if progress is not None:
            progress(info.name)
    return gm, records


def _checked(step: Callable, where: str, before: list[str]):
    """Run step(); a failure is re-raised naming where it happened and the passes that ran before."""
    try:
        return step()
    except Exception as exc:
        context = f"{where} failed (after {before or 'no other pass'}): {exc}"
        if isinstance(exc, FxforgeError):  # bad input found mid-pass: still the user's to fix
            raise type(exc)(context) from exc
        raise PipelineError(context) from exc
