"""The SkipDecode quality study (issue 10): SmolLM2-135M under SkipDecode schedules at target layer
speed-ups, against static early exit at the same average depth and the same training budget,
before and after training.

    fxforge skip-study --device cuda --json-out skip_study.json --markdown-out skip_study.md --plot skip_study.png

Per target speed-up s (average active layers N / s over the generated tokens):
  skip-decode   the pass with target_speedup=s (span = the generated length, so the schedule's mean
                depth over a generation is N / s); prompts at full depth; trained by `recover`'s
                SkipStudent (the schedule applied to each window's positions after its first quarter)
  static-exit   the bottom round(N / s) layers and the head for every token (the top layers
                truncated), trained as a shallower model (LayersStudent)
Both get the same training text (GSM8K calibration split + the original's samples; see recover.py)
and the same `train_seconds`. Quality, before and after training:
  (i)  perplexity of the evaluation split teacher-forced through the model (skip-decode: each
       window's first quarter as the prompt, the rest at the schedule's depths), next to the full
       model's on the same tokens;
  (ii) exact match and token agreement of greedy generations with the full model's, on `prompts`
       held-out GSM8K questions (evaluation split), served by the engine (skip-decode: policy bucket).
Target: trained skip-decode beats trained static exit at every speed-up (lower perplexity).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fxforge.ir.model import Model
from fxforge.recover import (LayersStudent, RecoverySettings, SkipStudent, Trainer, TrainingText, _prompt,
                             perplexity_of, student_perplexity)

METHODS = ("skip-decode", "static-exit")


@dataclass(frozen=True)
class StudyOptions:
    speedups: tuple[float, ...] = (1.5, 2.0, 3.0)
    warmup_layers: int = 1
    decay: str = "linear"
    prompts: int = 200  # held-out GSM8K questions generated greedily
    max_new_tokens: int = 128  # also the schedule's span


def skip_student(teacher: Model, speedup: float, options: StudyOptions) -> Model:
    import fxforge
    from fxforge.passes import SkipDecode

    config = SkipDecode(target_speedup=speedup, warmup_layers=options.warmup_layers, decay=options.decay,
                        span=options.max_new_tokens)
    return fxforge.optimize(teacher, passes=[config])


def static_exit(teacher: Model, keep: int) -> Model:
    """The teacher's bottom `keep` layers, its final norm and head: early exit at a fixed depth."""
    spec = teacher.spec
    state = {name: tensor.clone() for name, tensor in teacher.module.state_dict().items()
             if not name.startswith("layers.") or int(name.split(".")[1]) < keep}
    return Model.from_state_dict(dataclasses.replace(spec, num_layers=keep), state, teacher.tokenizer, teacher.dtype,
                                 teacher.device, dict(teacher.source))


def held_out_prompts(model: Model, data: str, count: int) -> list[list[int]]:
    """The first `count` questions of the evaluation split, in the model's chat template, as token ids."""
    from fxforge.data import load_texts

    docs = load_texts(data, "eval")[:count]
    return [model.encode_prompt(_prompt(doc), chat=True) for doc in docs]


def generate(model: Model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy outputs through the engine (a skip-decode model under policy bucket); lowered on CUDA."""
    import fxforge
    from fxforge.runtime.engine import Engine
    from fxforge.runtime.sequence import SamplingParams

    if model.device.type == "cuda":
        model = fxforge.optimize(model, passes=[{"name": "lower"}])
    seats, max_len = min(64, len(prompts)), max(map(len, prompts)) + max_new_tokens + 1
    engine = Engine(model, max_num_seqs=seats, max_model_len=max_len, num_pages=seats * -(-max_len // 16),
                    skip_policy="bucket")
    return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))]


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> dict:
    """exact_match: share of outputs equal to the reference's; token_agreement: share of reference
    positions where the output holds the same token."""
    exact = sum(o == r for o, r in zip(outputs, reference)) / len(reference)
    same = sum(sum(a == b for a, b in zip(o, r)) for o, r in zip(outputs, reference))
    return {"exact_match": exact, "token_agreement": same / max(1, sum(map(len, reference)))}


def quality(method: str, model: Model, windows: torch.Tensor, prompts: list, reference: list, options) -> dict:
    perplexity = (student_perplexity(SkipStudent(model), windows) if method == "skip-decode"
                  else perplexity_of(model, windows))
    return {"perplexity": perplexity, **agreement(generate(model, prompts, options.max_new_tokens), reference)}


def run_one(teacher: Model, method: str, speedup: float, text: TrainingText, windows: torch.Tensor, prompts: list,
            reference: list, settings: RecoverySettings, options: StudyOptions) -> dict:
    from fxforge.ir.skip import skip_schedule

    started = time.perf_counter()
    if method == "skip-decode":
        model = skip_student(teacher, speedup, options)
        schedule = skip_schedule(model)
        depth, student = schedule.mean_depth(), SkipStudent(model)
        detail = {"min_layers": schedule.min_layers, "max_layers": schedule.max_layers,
                  "warmup_layers": schedule.warmup}
    else:
        keep = max(1, round(teacher.spec.num_layers / speedup))
        model = static_exit(teacher, keep)
        depth, student, detail = keep, LayersStudent(model), {"layers": keep}
    before = quality(method, model, windows, prompts, reference, options)
    trainer = Trainer(student, teacher, text.windows, settings)
    trainer.run()
    after = quality(method, model, windows, prompts, reference, options)
    return {"method": method, "target_speedup": speedup, "mean_depth": depth,
            "layer_speedup": teacher.spec.num_layers / depth, **detail, "before": before, "after": after,
            "steps": trainer.state.step, "train_tokens": trainer.state.tokens,
            "train_seconds": round(trainer.state.seconds, 1), "total_seconds": round(time.perf_counter() - started, 1)}


def targets(rows: list[dict]) -> dict:
    """Trained skip-decode against trained static exit at each speed-up."""
    by = {(r["method"], r["target_speedup"]): r for r in rows}
    pairs = []
    for (method, speedup), row in by.items():
        static = by.get(("static-exit", speedup))
        if method == "skip-decode" and static is not None:
            skip_after, static_after = row["after"], static["after"]
            pairs.append({"target_speedup": speedup, "skip_perplexity": skip_after["perplexity"],
                          "static_perplexity": static_after["perplexity"],
                          "skip_token_agreement": skip_after["token_agreement"],
                          "static_token_agreement": static_after["token_agreement"],
                          "met": skip_after["perplexity"] < static_after["perplexity"]})
    return {"skip_beats_static_exit": {"met": bool(pairs) and all(p["met"] for p in pairs), "pairs": pairs}}


def run_study(teacher: Model, text: TrainingText, windows: torch.Tensor, data: str, settings: RecoverySettings,
              options: StudyOptions, progress=None, deadline: float | None = None) -> dict:
    """Every (speed-up, method) run in order until time.perf_counter() passes `deadline` (the rest are
    listed as skipped); `progress(results so far)` after each."""
    prompts = held_out_prompts(teacher, data, options.prompts)
    reference = generate(teacher, prompts, options.max_new_tokens)
    results = {"model": teacher.spec.name or teacher.spec.family, "layers": teacher.spec.num_layers,
               "teacher_perplexity": perplexity_of(teacher, windows), "eval_tokens": int(windows[:, 1:].numel()),
               "prompts": len(prompts), "reference_tokens": sum(map(len, reference)),
               "settings": dataclasses.asdict(settings), "options": dataclasses.asdict(options),
               "text": text.description, "runs": [], "skipped": []}
    for speedup in options.speedups:
        for method in METHODS:
            if deadline is not None and time.perf_counter() > deadline:
                results["skipped"].append(f"{method} {speedup}x")
                continue
            results["runs"].append(run_one(teacher, method, speedup, text, windows, prompts, reference, settings,
                                           options))
            results["targets"] = targets(results["runs"])
            if progress is not None:
                progress(results)
            if teacher.device.type == "cuda":
                torch.cuda.empty_cache()
    results["targets"] = targets(results["runs"])
    return results


def markdown(results: dict) -> str:
    budget = results["settings"]["minutes"] * 60
    lines = [f"| target | method | mean layers | perplexity before / after {budget:.0f} s | exact match before / after "
             "| token agreement before / after |", "|---|---|---|---|---|---|",
             f"| 1x | full model ({results['layers']} layers) | {results['layers']} | "
             f"{results['teacher_perplexity']:.3f} | 1 | 1 |"]
    for r in results["runs"]:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['target_speedup']}x | {r['method']} | {r['mean_depth']:.2f} | {b['perplexity']:.3f} / "
                     f"{a['perplexity']:.3f} | {b['exact_match']:.3f} / {a['exact_match']:.3f} | "
                     f"{b['token_agreement']:.3f} / {a['token_agreement']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Perplexity and token agreement against the layer speed-up, per method, before and after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for method in METHODS:
        rows = sorted((r for r in results["runs"] if r["method"] == method), key=lambda r: r["layer_speedup"])
        if not rows:
            continue
        speed = [r["layer_speedup"] for r in rows]
        for when, style in (("before", ":"), ("after", "-")):
            label = f"{method} ({when} training)"
            left.plot(speed, [r[when]["perplexity"] for r in rows], style, marker="o", label=label)
            right.plot(speed, [r[when]["token_agreement"] for r in rows], style, marker="o", label=label)
    left.axhline(results["teacher_perplexity"], color="black", linestyle="--", linewidth=1, label="full model")
    left.set(xlabel="layer speed-up (N / mean active layers)", ylabel="perplexity, teacher-forced (log)", yscale="log")
    right.set(xlabel="layer speed-up (N / mean active layers)", ylabel="token agreement with the full model",
              ylim=(0, 1))
    left.legend(fontsize=7)
    fig.suptitle(f"{results['model']}: SkipDecode vs static early exit, "
                 f"{results['settings']['minutes'] * 60:.0f} s training per run")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def save(results: dict, json_out: Path, markdown_out: Path | None, plot_out: Path | None = None) -> None:
    json_out.write_text(json.dumps(results, indent=2))
    if markdown_out is not None:
        markdown_out.write_text(markdown(results))
    if plot_out is not None:
        plot(results, plot_out)
