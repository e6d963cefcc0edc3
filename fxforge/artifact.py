"""Artifacts: a compiled model as a directory.

  plan.json            schema version, source model, spec, passes with configs and what each changed
  weights.safetensors  every parameter and buffer of the rewritten graph but runtime state (the MoE
                       expert counts, see ir/modules.py RUNTIME_BUFFERS); a tensor held under several
                       names (tied embeddings, layer-tied blocks) is stored once under its first name,
                       the others recorded in the file's metadata (`fxforge_aliases`) and restored on load
  graph.py             the readable fx code of the rewritten forward
  report.md            what was done, in words and numbers
  tokenizer/           tokenizer.json + tokenizer_config.json (when the model has a tokenizer)

Loading rebuilds the canonical module from the spec, replays the passes in restore mode (structure
only), then loads the saved tensors: logits equal the saved model's exactly. Saving writes into a
temporary sibling directory renamed at the end, so a failed save leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fxforge.errors import FxforgeError, OutputPathError
from fxforge.ir.capture import capture
from fxforge.ir.model import Model
from fxforge.ir.modules import is_runtime_buffer
from fxforge.ir.spec import ModelSpec

SCHEMA_VERSION = 2  # 2: pass records carry their config version; the plan records kernel bindings
PLAN, WEIGHTS, GRAPH, REPORT, TOKENIZER = "plan.json", "weights.safetensors", "graph.py", "report.md", "tokenizer"
ALIASES = "fxforge_aliases"  # safetensors metadata key: {name: the name its tensor is stored under}


def check_output_dir(directory) -> Path:
    """The resolved artifact path, after checking it can receive an artifact: new, empty or an artifact
    already, and writable (a real write probe, so root on a read-only mount is caught too)."""
    target = Path(directory).resolve()
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / PLAN).exists())):
        raise OutputPathError(f"output directory {str(target)!r} exists and is not an fxforge artifact; "
                              "choose a new or empty directory")
    probe = target
    while not probe.exists():
        probe = probe.parent
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".fxforge-probe-", dir=probe))
    except OSError as exc:
        raise _unwritable(target, exc) from None
    return target


def check_output_file(path, option: str) -> Path:
    """The resolved path of an output file, after checking (by a real write probe next to it) that it can
    be written, before any work is done; `option` names the CLI option in the error."""
    target = Path(path).resolve()
    if target.is_dir():
        raise OutputPathError(f"{option} {str(target)!r} is a directory; give a file path")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    try:
        with tempfile.NamedTemporaryFile(prefix=".fxforge-probe-", dir=folder):
            pass
    except OSError as exc:
        raise OutputPathError(f"cannot write {option} {str(target)!r} (not writable: {exc.strerror}); "
                              "choose a writable location") from None
    return target


def _unwritable(target: Path, exc: OSError) -> OutputPathError:
    return OutputPathError(f"cannot write to output directory {str(target)!r} (not writable: {exc.strerror}); "
                           "choose a writable location")


def save_artifact(model, directory, extra_report: str = "", write_extra=None) -> Path:
    """Write `model` (an OptimizedModel) to `directory` atomically; returns the final path.
    `write_extra(staging_dir)` adds files (model.onnx) before the directory is moved into place."""
    target = check_output_dir(directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise _unwritable(target, exc) from None
    try:
        _write(model, staging, extra_report)
        if write_extra is not None:
            write_extra(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write(model, staging: Path, extra_report: str) -> None:
    gm = model.module
    tensors, aliases = unique_state(gm)
    save_file(tensors, str(staging / WEIGHTS), metadata={"fxforge_schema": str(SCHEMA_VERSION),
                                                         ALIASES: json.dumps(aliases)})
    plan = {
        "schema_version": SCHEMA_VERSION,
        "source": model.source,
        "dtype": str(model.dtype).removeprefix("torch."),
        "spec": model.spec.to_dict(),
        "passes": getattr(model, "passes", []),
        "kv_formats": [list(f) for f in model.kv_formats()],
        "kv_bytes_per_token": model.kv_bytes_per_token(),
        "kernel_bindings": model.kernel_bindings(),
    }
    (staging / PLAN).write_text(json.dumps(plan, indent=2, default=str))
    (staging / GRAPH).write_text(f"# fx code of the rewritten forward ({model.spec.name or model.spec.family})\n"
                                 + gm.code)
    (staging / REPORT).write_text(render_report(plan) + extra_report)
    if model.tokenizer is not None:
        model.tokenizer.save(staging / TOKENIZER)


def unique_state(module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: tensor} with every tensor once, {alias: stored name}) over module's state dict."""
    tensors, aliases, first = {}, {}, {}
    for name, value in module.state_dict(keep_vars=True).items():
        if is_runtime_buffer(name):
            continue
        if id(value) in first:
            aliases[name] = first[id(value)]
            continue
        first[id(value)] = name
        tensors[name] = value.detach().contiguous().cpu()
    return tensors, aliases


def render_report(plan: dict) -> str:
    spec = plan["spec"]
    lines = [f"# fxforge artifact: {spec.get('name') or spec['family']}", "",
             f"- source: {_describe_source(plan['source'])}", f"- dtype: {plan['dtype']}",
             f"- KV bytes per token (all layers): {plan['kv_bytes_per_token']}", "", "## Passes", ""]
    if not plan["passes"]:
        lines.append("none (identity pipeline)")
    for record in plan["passes"]:
        lines.append(f"### {record['name']} ({'modified the graph' if record['modified'] else 'no change'})")
        lines.append(f"config: `{json.dumps(record['config'])}`")
        for key, value in record["report"].items():
            if not isinstance(value, (list, dict)) or len(str(value)) < 200:
                lines.append(f"- {key}: {value}")
        lines.append("")
    return "\n".join(lines) + "\n"


def _describe_source(source: dict) -> str:
    """'named smollm2-135m (real weights, /path/model.gguf)' rather than the raw record."""
    what = source.get("source") or source.get("name") or "in-memory model"
    details = ["random weights" if source.get("random_init") else "real weights", source.get("dtype"),
               source.get("path")]
    return f"{source.get('kind', 'model')} {what} ({', '.join(str(d) for d in details if d)})"


def load_artifact(directory, device: str | torch.device = "cpu") -> Model:
    """Restore an artifact directory into an OptimizedModel with identical logits."""
    from fxforge.optimizer import OptimizedModel
    from fxforge.passes.manager import PassContext, record_configs, run_pipeline

    path = Path(directory)
    try:
        plan = json.loads((path / PLAN).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FxforgeError(f"{str(path)!r} is not a readable fxforge artifact ({PLAN}: {exc})") from None
    if plan.get("schema_version") != SCHEMA_VERSION:
        raise FxforgeError(f"artifact {str(path)!r} has schema_version {plan.get('schema_version')}; "
                           f"this fxforge reads {SCHEMA_VERSION}: compile it again from its source")
    spec = ModelSpec.from_dict(plan["spec"])
    dtype = getattr(torch, plan["dtype"])
    tokenizer = None
    if (path / TOKENIZER).exists():
        from fxforge.ir.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(path / TOKENIZER)
    skeleton = Model.from_state_dict(spec, None, tokenizer, dtype, device)
    try:
        configs = record_configs(plan["passes"])
    except FxforgeError as exc:
        raise FxforgeError(f"artifact {str(path)!r}: {exc}") from None
    gm, _ = run_pipeline(capture(skeleton.module), configs, PassContext(model=skeleton, restoring=True))
    tensors, aliases = _read_weights(path / WEIGHTS, spec, device)
    missing, unexpected = gm.load_state_dict(tensors, strict=False)
    missing = [name for name in missing if not is_runtime_buffer(name)]
    if missing or unexpected:
        raise FxforgeError(f"artifact {str(path)!r} weights do not match its plan: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model = OptimizedModel(gm, spec, tokenizer, plan["source"], plan["passes"])
    _check_restored(model, plan, path)
    if unique_state(gm)[1] != aliases:
        raise FxforgeError(f"artifact {str(path)!r}: replaying its passes ties tensors {unique_state(gm)[1]} but the "
                           f"weights file records {aliases}; compile it again from its source")
    return model


def _read_weights(path: Path, spec: ModelSpec, device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The stored tensors with every alias filled in, and the aliases."""
    tensors = load_file(str(path), device=str(device))
    with safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get(ALIASES)
    # artifacts written before aliases were recorded stored tied embeddings once, as embed.weight
    aliases = json.loads(recorded) if recorded else ({"lm_head.weight": "embed.weight"} if spec.tie_word_embeddings else {})
    tensors.update({alias: tensors[stored] for alias, stored in aliases.items()})
    return tensors, aliases


def _check_restored(model, plan: dict, path: Path) -> None:
    """What loaded must be what the plan says was saved: never a silent fallback to other formats or kernels."""
    found = {"kv_formats": [list(f) for f in model.kv_formats()], "kernel_bindings": model.kernel_bindings()}
    for key, value in found.items():
        if plan[key] != value:
            raise FxforgeError(f"artifact {str(path)!r} does not restore to its plan: plan.json says {key} "
                               f"{plan[key]}, replaying its passes gives {value}; compile it again from its source")
