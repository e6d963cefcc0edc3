"""The layer-tying quality study (issue 9): perplexity of tied / relaxed SmolLM2-135M against baselines
at equal unique parameters and an equal recovery budget, before and after recovery.

    fxforge tying-study --device cuda --json-out tying_study.json --plot tying_study.png   # ~8 min on an H200 (estimate)

Runs (each recovered for the same `train_seconds` by distillation from the original, on the same
text, scored on the same held-out windows):
  relaxed     layer-tying cycle, K unique layers, init stepwise / average, LoRA rank r from the SVD
              (r = 0: pure tying)
  zero-lora   the same with zero-initialised LoRA (average init), at each r > 0
  layer-drop  the original's stepwise-selected layers, no looping, as many as match a relaxed run's
              unique parameters (K layers for r = 0)
Targets: every relaxed run beats the layer-drop run at its parameter count; SVD beats zero init.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fxforge.ir.model import Model
from fxforge.ir.recursive import stepwise_layers
from fxforge.recover import LayersStudent, RecoverySettings, Trainer, TrainingText, perplexity_of

METHODS = ("relaxed", "zero-lora", "layer-drop")


@dataclass(frozen=True)
class Run:
    method: str
    layers: int  # unique layers K (layer-drop: the layers kept)
    init: str = "-"
    rank: int = 0

    @property
    def label(self) -> str:
        if self.method == "layer-drop":
            return f"drop to {self.layers} layers"
        return f"{self.method} K={self.layers} {self.init} r={self.rank}"


def layer_parameters(spec) -> int:
    """Parameters of one decoder layer (dense SwiGLU, the norms and biases included)."""
    h, q, kv, i = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    bias = (q + 2 * kv) if spec.attention_bias else 0
    qk_norm = 2 * spec.head_dim if spec.qk_norm else 0
    return h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + bias + qk_norm


def tied_parameters(spec, unique_layers: int, rank: int) -> int:
    """Unique parameters of a cycle-tied model with rank-r LoRA on all 7 projections of every depth."""
    h, q, kv, i = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    lora = rank * ((h + q) + 2 * (h + kv) + (q + h) + 3 * (h + i)) * spec.num_layers if unique_layers < spec.num_layers else 0
    return _outside_layers(spec) + unique_layers * layer_parameters(spec) + lora


def _outside_layers(spec) -> int:
    return spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2) + spec.hidden_size


def study_runs(spec, unique_layers=(15, 10), inits=("stepwise", "average"), ranks=(0, 32, 128)) -> list[Run]:
    """Per K: its layer-drop baselines, the relaxed runs, the zero-init ones (so a study cut short
    still holds whole comparisons for the K values it reached)."""
    zero_init = "average" if "average" in inits else inits[0]
    runs: list[Run] = []
    for k in unique_layers:
        drops = [Run("layer-drop", equal_drop(spec, k, r)) for r in ranks]
        runs += [d for i, d in enumerate(drops) if d not in runs and d not in drops[:i]]
        runs += [Run("relaxed", k, init, r) for init in inits for r in ranks]
        runs += [Run("zero-lora", k, zero_init, r) for r in ranks if r > 0]
    return runs


def equal_drop(spec, unique_layers: int, rank: int) -> int:
    """Layers a layer-dropped model keeps to match a relaxed model's unique parameters."""
    layers = round((tied_parameters(spec, unique_layers, rank) - _outside_layers(spec)) / layer_parameters(spec))
    return max(1, min(spec.num_layers, layers))


def build_student(teacher: Model, run: Run) -> Model:
    """The run's student from the teacher (tied graphs share no storage the trainer will write)."""
    import fxforge
    from fxforge.passes import LayerTying

    if run.method == "layer-drop":
        return drop_layers(teacher, run.layers)
    config = LayerTying(unique_layers=run.layers, init=run.init, rank=run.rank,
                        lora_init="zero" if run.method == "zero-lora" else "svd")
    return fxforge.optimize(teacher, passes=[config])


def drop_layers(teacher: Model, keep: int) -> Model:
    """The teacher's stepwise-selected `keep` layers as a shallower canonical model."""
    spec = teacher.spec
    kept = stepwise_layers(0, spec.num_layers - 1, keep)
    state = {}
    for name, tensor in teacher.module.state_dict().items():
        if not name.startswith("layers."):
            state[name] = tensor.clone()
            continue
        _, old, rest = name.split(".", 2)
        if int(old) in kept:
            state[f"layers.{kept.index(int(old))}.{rest}"] = tensor.clone()
    return Model.from_state_dict(dataclasses.replace(spec, num_layers=keep), state, teacher.tokenizer, teacher.dtype,
                                 teacher.device, dict(teacher.source))


def run_one(teacher: Model, run: Run, text: TrainingText, windows: torch.Tensor, settings: RecoverySettings) -> dict:
    started = time.perf_counter()
    student = build_student(teacher, run)
    setup = time.perf_counter() - started
    unique = sum(p.numel() for p in student.module.parameters())
    before = perplexity_of(student, windows)
    trainer = Trainer(LayersStudent(student), teacher, text.windows, settings)
    trainer.run()
    after = perplexity_of(student, windows)
    loop = trainer.state
    return {**dataclasses.asdict(run), "label": run.label, "unique_parameters": unique, "perplexity_before": before,
            "perplexity_after": after, "steps": loop.step, "train_tokens": loop.tokens,
            "train_seconds": round(loop.seconds, 1), "setup_seconds": round(setup, 1),
            "total_seconds": round(time.perf_counter() - started, 1)}


def targets(rows: list[dict], spec) -> dict:
    """Relaxed vs layer-drop at equal parameters; SVD vs zero init at equal rank."""
    by = {(r["method"], r["layers"], r["init"], r["rank"]): r for r in rows}
    versus_drop, versus_zero = [], []
    for r in rows:
        if r["method"] != "relaxed":
            continue
        ppl = r["perplexity_after"]
        drop = by.get(("layer-drop", equal_drop(spec, r["layers"], r["rank"]), "-", 0))
        if drop:
            versus_drop.append({"relaxed": r["label"], "layer_drop": drop["label"], "relaxed_ppl": ppl,
                                "layer_drop_ppl": drop["perplexity_after"], "met": ppl < drop["perplexity_after"]})
        zero = by.get(("zero-lora", r["layers"], r["init"], r["rank"]))
        if zero:
            versus_zero.append({"svd": r["label"], "svd_ppl": ppl, "zero_ppl": zero["perplexity_after"],
                                "met": ppl < zero["perplexity_after"]})
    return {"relaxed_beats_layer_drop": {"met": all(p["met"] for p in versus_drop), "pairs": versus_drop},
            "svd_beats_zero_init": {"met": all(p["met"] for p in versus_zero), "pairs": versus_zero}}


def markdown(results: dict) -> str:
    teacher = results["teacher_perplexity"]
    budget = results["settings"]["minutes"] * 60
    lines = [f"| run | unique params | perplexity before | after {budget:.0f} s recovery | Δ vs original |",
             "|---|---|---|---|---|",
             f"| original ({results['spec_layers']} layers) | {_count(results['original_parameters'])} | {teacher:.3f} "
             "| – | – |"]
    for r in results["runs"]:
        lines.append(f"| {r['label']} | {_count(r['unique_parameters'])} | {r['perplexity_before']:.4g} | "
                     f"{r['perplexity_after']:.3f} | {100 * (r['perplexity_after'] / teacher - 1):+.1f}% |")
    return "\n".join(lines) + "\n"


def _count(parameters: int) -> str:
    return f"{parameters / 1e6:.1f}M" if parameters >= 1e6 else f"{parameters:,}"


def plot(results: dict, path: Path) -> None:
    """Perplexity after recovery against unique parameters, one series per method (and init)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list] = {}
    for r in results["runs"]:
        name = r["method"] if r["method"] != "relaxed" else f"relaxed ({r['init']})"
        series.setdefault(name, []).append((r["unique_parameters"] / 1e6, r["perplexity_after"]))
    for name, points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    ax.axhline(results["teacher_perplexity"], color="black", linestyle="--", linewidth=1, label="original")
    ax.set_xlabel("unique parameters (M)")
    ax.set_ylabel("GSM8K perplexity after recovery (log)")
    ax.set_yscale("log")
    ax.set_title(f"{results['model']}: layer tying, {results['settings']['minutes'] * 60:.0f} s recovery per run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_study(teacher: Model, runs: list[Run], text: TrainingText, windows: torch.Tensor, settings: RecoverySettings,
              progress=None, deadline: float | None = None, previous: dict | None = None) -> dict:
    """Every run, in order, until time.perf_counter() passes `deadline` (the runs not started are
    listed as skipped); `progress(results so far)` after each run. `previous` results (same settings
    and text, see load_previous) are kept and their runs not repeated."""
    results = {"model": teacher.spec.name or teacher.spec.family, "spec_layers": teacher.spec.num_layers,
               "original_parameters": sum(p.numel() for p in teacher.module.parameters()),
               "teacher_perplexity": perplexity_of(teacher, windows), "eval_tokens": int(windows[:, 1:].numel()),
               "settings": dataclasses.asdict(settings), "text": text.description, "runs": [], "skipped": []}
    if previous is not None:
        results["runs"] = list(previous["runs"])
    done = {r["label"] for r in results["runs"]}
    for run in runs:
        if run.label in done:
            continue
        if deadline is not None and time.perf_counter() > deadline:
            results["skipped"].append(run.label)
            continue
        results["runs"].append(run_one(teacher, run, text, windows, settings))
        results["targets"] = targets(results["runs"], teacher.spec)
        if progress is not None:
            progress(results)
        if teacher.device.type == "cuda":
            torch.cuda.empty_cache()
    results["targets"] = targets(results["runs"], teacher.spec)
    return results


TEXT_SUFFIX = ".text.safetensors"  # the training text of a study, next to its JSON, for --resume


def save_text(text: TrainingText, json_out: Path) -> None:
    from safetensors.torch import save_file

    save_file({"windows": text.windows.contiguous()}, str(json_out) + TEXT_SUFFIX,
              metadata={"description": json.dumps(text.description)})


def load_previous(path: Path, settings: RecoverySettings) -> tuple[dict, TrainingText]:
    """The results of an earlier (possibly partial) study and its training text; FxforgeError unless
    it ran with these settings (every run must get the same budget and text)."""
    from safetensors import safe_open

    from fxforge.errors import FxforgeError

    try:
        previous = json.loads(Path(path).read_text())
        with safe_open(str(path) + TEXT_SUFFIX, framework="pt") as f:
            text = TrainingText(f.get_tensor("windows"), json.loads(f.metadata()["description"]))
    except (OSError, ValueError, KeyError) as exc:
        raise FxforgeError(f"--resume {str(path)!r}: cannot read the earlier study and its {TEXT_SUFFIX} ({exc})") from None
    if previous.get("settings") != dataclasses.asdict(settings):
        raise FxforgeError(f"--resume {str(path)!r} ran with settings {previous.get('settings')}; this run's are "
                           f"{dataclasses.asdict(settings)}: give the same options")
    return previous, text


def save(results: dict, json_out: Path, plot_out: Path, markdown_out: Path | None) -> None:
    json_out.write_text(json.dumps(results, indent=2))
    plot(results, plot_out)
    if markdown_out is not None:
        markdown_out.write_text(markdown(results))
