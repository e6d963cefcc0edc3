"""Recovery: distil a compiled model (the student) towards the original it was compiled from (the teacher).

    fxforge recover out/tied -o out/tied-recovered --minutes 10

The teacher is the model recorded as the artifact's source (plan.json `source`); the student is the
artifact, trained in the way its passes call for. What is trained, and how the student computes
logits with gradients, is a *student kind*, chosen by the passes the artifact ran (`STUDENT_KINDS`,
keyed by pass name): layer-tying trains its shared blocks and per-depth LoRA; a skip-decode pass
adds a kind whose forward applies its schedule. The loop itself knows nothing of either.

Loss: KL(teacher || student) on the logits of every position (temperature-scaled), plus optionally
cross-entropy on the next token. Training text: the calibration split of `data` (GSM8K problems
1000-1318) plus sequences the teacher samples from prompts of that split (data-free distillation as
in LLM-QAT); the evaluation split is never trained on. The report states both.

Bounded by a wall-time budget for the training steps (`minutes`, counted across resumed runs) and
optionally a step count. State lives in OUTPUT/recovery/: the training windows (written once), and
every `checkpoint_minutes` a step-NNNNNN/ directory of safetensors (trainable tensors, AdamW moments)
named by state.json, replaced atomically; running the same command again resumes from it, exactly
(data order and learning rate depend on the step only). OUTPUT itself is an artifact from the start
(the student before training) and holds the recovered student at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fxforge.errors import FxforgeError
from fxforge.ir.model import Model
from fxforge.ir.training import causal_logits

STATE_VERSION = 1
RECOVERY, STATE, DATA = "recovery", "state.json", "data.safetensors"


# -- students ---------------------------------------------------------------------------------------

class Student(Protocol):
    """What recovery trains (unique tensors by their stored name) and the student's training forward."""

    model: Model

    def trainable(self) -> dict[str, nn.Parameter]: ...

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LayersStudent:
    """Trains the parameters of the decoder layers (and a tied graph's LoRA), not embeddings or head:
    the layer-tying student (shared blocks + per-depth LoRA), and the layer-dropping baseline."""

    model: Model

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.module.named_parameters()  # a tied tensor once, first name
                if name.startswith(("layers.", "lora."))}

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return causal_logits(self.model.module, self.model.spec, input_ids)


@dataclass
class SkipStudent(LayersStudent):
    """A skip-decode model: the decoder layers (and a tied graph's LoRA) trained under the schedule. Each
    window's first quarter is its prompt (full depth); every later position runs the depth of its
    generated position (ir/skip.py skip_causal_logits), so the student learns to predict with the
    layers it will run when serving."""

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        from fxforge.ir.skip import skip_causal_logits, skip_schedule

        return skip_causal_logits(self.model.module, self.model.spec, skip_schedule(self.model), input_ids)


# pass name -> the student kind that recovers a model that ran it
STUDENT_KINDS: dict[str, Callable[[Model], Student]] = {"layer-tying": LayersStudent, "skip-decode": SkipStudent}


def student_for(model: Model) -> Student:
    """The student kind of the latest pass of model's history that recovery knows how to train."""
    for record in reversed(getattr(model, "passes", [])):
        if record["name"] in STUDENT_KINDS and record.get("modified", True):
            return STUDENT_KINDS[record["name"]](model)
    ran = [r["name"] for r in getattr(model, "passes", [])]
    raise FxforgeError(f"nothing to recover: the model ran passes {ran}, none of which recovery trains "
                       f"({sorted(STUDENT_KINDS)}, and only when it changed the model)")


def load_teacher(student: Model, device) -> Model:
    """The original model the student was compiled from (its recorded source), on `device`."""
    import fxforge

    source = student.source or {}
    if "source" not in source:
        raise FxforgeError(f"the model has no source to distil from (its plan.json source is {source}); "
                           "compile it from a named model, a .gguf file or an HF directory")
    teacher = fxforge.load(source["source"], dtype=source.get("dtype", "float32"), device=device,
                           random_init=source.get("random_init", False))
    if teacher.spec.vocab_size != student.spec.vocab_size or teacher.tokenizer is None:
        raise FxforgeError(f"source {source['source']!r} cannot teach this model: it needs the same vocabulary "
                           f"({student.spec.vocab_size} tokens) and a tokenizer")
    return teacher


# -- settings and text -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecoverySettings:
    """How recovery trains. `minutes` and `max_steps` bound it (either may grow on resume); the rest
    must stay as they were when the run started."""

    minutes: float
    max_steps: int | None = None
    lr: float = 1e-4
    warmup_steps: int = 10
    batch_size: int = 8
    seq_len: int = 256
    temperature: float = 1.0  # KD temperature
    ce_weight: float = 0.0  # weight of next-token cross-entropy next to the KL
    grad_clip: float = 1.0
    samples: int = 128  # sequences sampled from the teacher
    sample_tokens: int = 128  # tokens generated per sampled sequence (at most)
    sample_temperature: float = 1.0
    checkpoint_minutes: float = 5.0
    seed: int = 0

    def __post_init__(self):
        positive = ("minutes", "lr", "batch_size", "seq_len", "temperature", "grad_clip", "sample_tokens",
                    "checkpoint_minutes")
        for name in positive:
            if not getattr(self, name) > 0:
                raise FxforgeError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "ce_weight", "samples", "sample_temperature", "seed"):
            if getattr(self, name) < 0:
                raise FxforgeError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise FxforgeError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.seq_len < 2:
            raise FxforgeError(f"--seq-len must be >= 2, got {self.seq_len}")

    def fixed(self) -> dict:
        """The settings a resumed run must share with the run it resumes."""
        values = dataclasses.asdict(self)
        for name in ("minutes", "max_steps", "checkpoint_minutes"):
            values.pop(name)
        return values


@dataclass
class TrainingText:
    windows: torch.Tensor  # [N, seq_len] token ids
    description: dict  # what text it is, for the report


def training_text(teacher: Model, data: str, settings: RecoverySettings, progress=None) -> TrainingText:
    """The calibration split of `data` plus the teacher's samples on prompts from it, as windows."""
    from fxforge.data import load_texts

    docs = load_texts(data, "calib")
    doc_ids = [teacher.tokenizer.encode(doc + "\n\n", add_special_tokens=False) for doc in docs]
    samples = _teacher_samples(teacher, docs, settings, progress) if settings.samples else []
    ids = [t for seq in doc_ids + samples for t in seq]
    count = len(ids) // settings.seq_len
    if count < 1:
        raise FxforgeError(f"the training text has {len(ids)} tokens, fewer than one window of --seq-len "
                           f"{settings.seq_len}")
    windows = torch.tensor(ids[: count * settings.seq_len], dtype=torch.int32).view(count, settings.seq_len)
    description = {
        "calibration_text": {"data": data, "split": "calib", "documents": len(docs), "tokens": sum(map(len, doc_ids))},
        "teacher_samples": {"prompts": f"{len(samples)} prompts from the {data} calibration split",
                            "sequences": len(samples), "tokens": sum(map(len, samples)),
                            "temperature": settings.sample_temperature, "max_new_tokens": settings.sample_tokens},
        "evaluation_text": f"{data} evaluation split (never trained on)", "windows": count, "seq_len": settings.seq_len}
    return TrainingText(windows, description)


def _prompt(doc: str) -> str:
    """The question of a GSM8K document ("Question: ...\\nAnswer: ..."), else the document's first line."""
    head = doc.split("\nAnswer:")[0] if "\nAnswer:" in doc else doc.strip().splitlines()[0]
    return head.removeprefix("Question:").strip()[:2000] or doc[:200]


def _teacher_samples(teacher: Model, docs: list[str], settings: RecoverySettings, progress) -> list[list[int]]:
    """Prompt + sampled continuation token ids, one list per sampled sequence (seeded per sequence)."""
    from fxforge.runtime.engine import Engine
    from fxforge.runtime.sequence import SamplingParams

    prompts = [_prompt(docs[i % len(docs)]) for i in range(settings.samples)]
    greedy = settings.sample_temperature == 0
    params = [SamplingParams(temperature=settings.sample_temperature, max_new_tokens=settings.sample_tokens,
                             seed=None if greedy else settings.seed * 1_000_003 + i) for i in range(len(prompts))]
    if teacher.device.type == "cuda":  # sample through the Triton kernels (CUDA graphs, decode windows)
        import fxforge

        teacher = fxforge.optimize(teacher, passes=[{"name": "lower"}])
    seats, max_len = min(256, len(prompts)), _sample_len(teacher, settings)
    engine = Engine(teacher, max_num_seqs=seats, max_model_len=max_len, num_pages=seats * -(-max_len // 16))
    outputs = engine.generate(prompts, params, progress=progress)
    return [o.prompt_token_ids + o.token_ids for o in outputs]


def _sample_len(teacher: Model, settings: RecoverySettings) -> int:
    return min(teacher.spec.max_position_embeddings, 2048 + settings.sample_tokens)


# -- the training loop ---------------------------------------------------------------------------------

@dataclass
class LoopState:
    step: int = 0
    seconds: float = 0.0  # training time so far, over every run of this recovery
    tokens: int = 0
    loss: float = float("nan")
    kl: float = float("nan")


def batch_indices(step: int, num_windows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Windows of step `step`: consecutive slices of one seeded permutation per epoch."""
    picks = [divmod(position, num_windows) for position in range(step * batch_size, (step + 1) * batch_size)]
    return torch.tensor([int(_epoch_order(num_windows, seed, epoch)[index]) for epoch, index in picks])


@functools.lru_cache(maxsize=4)
def _epoch_order(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_windows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def learning_rate(step: int, settings: RecoverySettings) -> float:
    """Linear warm-up, then constant (a step-only schedule, so a resumed run repeats it exactly)."""
    return settings.lr * min(1.0, (step + 1) / max(1, settings.warmup_steps))


def kd_loss(student_logits, teacher_logits, input_ids, settings: RecoverySettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, KL): T^2 * KL(softmax(t/T) || softmax(s/T)) per position, + ce_weight * next-token CE."""
    temperature = settings.temperature
    s = (student_logits.float() / temperature).log_softmax(-1)
    t = (teacher_logits.float() / temperature).log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2
    loss = kl
    if settings.ce_weight:
        ce = F.cross_entropy(student_logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten().long())
        loss = loss + settings.ce_weight * ce
    return loss, kl


class Trainer:
    """Steps of KD for one student against one teacher over fixed windows, resumable from its state."""

    def __init__(self, student: Student, teacher: Model, windows: torch.Tensor, settings: RecoverySettings):
        self.student, self.teacher, self.windows, self.settings = student, teacher, windows, settings
        self.params = student.trainable()
        with torch.no_grad():
            for param in self.params.values():  # own what is trained: never write storage shared copy-on-write
                param.data = param.data.clone()
        for name, param in self.student.model.module.named_parameters():
            param.requires_grad_(name in self.params)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=settings.lr, betas=(0.9, 0.95),
                                           weight_decay=0.0)
        self.device = student.model.device
        self.state = LoopState()

    def step(self) -> None:
        """One optimizer step on the next batch."""
        settings, state = self.settings, self.state
        ids = self.windows[batch_indices(state.step, len(self.windows), settings.batch_size, settings.seed)]
        ids = ids.to(self.device, torch.int64)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(state.step, settings)
        with self._autocast():
            with torch.no_grad():
                teacher_logits = causal_logits(self.teacher.module, self.teacher.spec, ids)
            loss, kl = kd_loss(self.student.logits(ids), teacher_logits, ids, settings)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), settings.grad_clip)
        self.optimizer.step()
        state.step += 1
        state.tokens += ids.numel()
        state.loss, state.kl = float(loss.detach()), float(kl.detach())

    def _autocast(self):
        """bf16 autocast on CUDA (fp32 master weights); full precision on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def run(self, on_step: Callable[["Trainer"], None] | None = None,
            on_checkpoint: Callable[["Trainer"], None] | None = None) -> None:
        """Step until the time budget or max_steps is reached; checkpoint every checkpoint_minutes."""
        settings, state = self.settings, self.state
        budget, last_checkpoint = settings.minutes * 60, state.seconds
        while state.seconds < budget and (settings.max_steps is None or state.step < settings.max_steps):
            start = time.perf_counter()
            self.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            state.seconds += time.perf_counter() - start
            if on_step is not None:
                on_step(self)
            if on_checkpoint is not None and state.seconds - last_checkpoint >= settings.checkpoint_minutes * 60:
                on_checkpoint(self)
                last_checkpoint = state.seconds

    # -- state ------------------------------------------------------------------------------------
    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(trainable tensors, AdamW moments and step counts) by name."""
        trainable = {name: p.detach().contiguous().cpu() for name, p in self.params.items()}
        moments = {}
        for name, param in self.params.items():
            for key, value in self.optimizer.state.get(param, {}).items():
                moments[f"{name}/{key}"] = value.detach().contiguous().cpu()
        return trainable, moments

    def load(self, trainable: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], state: LoopState) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(trainable[name])
        for name, param in self.params.items():
            keys = {k.split("/", 1)[1]: v for k, v in moments.items() if k.split("/", 1)[0] == name}
            if keys:
                self.optimizer.state[param] = {k: v.to(param.device) if k != "step" else v for k, v in keys.items()}
        self.state = state


# -- checkpoints ---------------------------------------------------------------------------------------

class Checkpoints:
    """OUTPUT/recovery: data.safetensors (the windows), step-NNNNNN/ tensors, state.json naming the latest."""

    def __init__(self, output: Path):
        self.root = output / RECOVERY

    def exists(self) -> bool:
        return (self.root / STATE).is_file()

    def read_state(self) -> dict:
        try:
            return json.loads((self.root / STATE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FxforgeError(f"cannot read the recovery state in {str(self.root)!r} ({exc}); choose a new "
                               "output directory") from None

    def write_data(self, text: TrainingText) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        save_file({"windows": text.windows.contiguous()}, str(self.root / DATA),
                  metadata={"description": json.dumps(text.description)})

    def read_data(self) -> TrainingText:
        from safetensors import safe_open

        with safe_open(str(self.root / DATA), framework="pt") as f:
            return TrainingText(f.get_tensor("windows"), json.loads(f.metadata()["description"]))

    def save(self, trainer: Trainer, record: dict) -> None:
        """Write the trainer's tensors to a new step directory, then point state.json at it atomically."""
        name = f"step-{trainer.state.step:06d}"
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        trainable, moments = trainer.tensors()
        save_file(trainable, str(folder / "trainable.safetensors"))
        save_file(moments, str(folder / "optimizer.safetensors"))
        state = {**record, "version": STATE_VERSION, "checkpoint": name, "loop": dataclasses.asdict(trainer.state)}
        temporary = self.root / f".{STATE}.tmp"
        temporary.write_text(json.dumps(state, indent=2))
        os.replace(temporary, self.root / STATE)
        for old in self.root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, trainer: Trainer, state: dict) -> None:
        folder = self.root / state["checkpoint"]
        trainer.load(load_file(str(folder / "trainable.safetensors")), load_file(str(folder / "optimizer.safetensors")),
                     LoopState(**state["loop"]))


# -- one recovery, start to end ------------------------------------------------------------------------------

@dataclass
class Recovery:
    """Everything recovery needs, checked before anything is written."""

    artifact: Path
    output: Path
    student: Student
    teacher: Model
    settings: RecoverySettings
    data: str
    eval_tokens: int
    eval_context: int


def prepare(artifact, output, settings: RecoverySettings, data: str = "gsm8k", device: str = "cpu",
            eval_tokens: int = 16384, eval_context: int = 512) -> Recovery:
    """Load and check the student, its teacher and the output directory (writes nothing)."""
    from fxforge.artifact import PLAN, check_output_dir, load_artifact
    from fxforge.data import load_texts

    artifact = Path(artifact)
    if not (artifact / PLAN).is_file():
        raise FxforgeError(f"{str(artifact)!r} is not an fxforge artifact directory (no {PLAN}); recover trains "
                           "an artifact made by `fxforge compile ... --passes layer-tying` (or skip-decode)")
    output = check_output_dir(output)
    if output == artifact.resolve():
        raise FxforgeError("the output directory must differ from the artifact being recovered")
    student_model = load_artifact(artifact, device=device)
    student = student_for(student_model)
    teacher = load_teacher(student_model, device)
    for split in ("calib", "eval"):  # the text exists before any work
        load_texts(data, split)
    if eval_tokens < 1 or eval_context < 2:
        raise FxforgeError(f"--eval-tokens must be >= 1 and --eval-context >= 2, got {eval_tokens}, {eval_context}")
    recovery = Recovery(artifact, output, student, teacher, settings, data, eval_tokens, eval_context)
    if Checkpoints(output).exists():
        _check_resumable(recovery, Checkpoints(output).read_state())
    return recovery


def _check_resumable(recovery: Recovery, state: dict) -> None:
    want = {"artifact": str(recovery.artifact.resolve()), "settings": recovery.settings.fixed(), "data": recovery.data}
    got = {key: state.get(key) for key in want}
    if state.get("version") != STATE_VERSION or got != want:
        raise FxforgeError(f"{str(recovery.output)!r} holds a recovery of another run ({got}); this run is {want}: "
                           "repeat that run's options to resume it, or choose a new output directory")


def evaluation_windows(recovery: Recovery) -> torch.Tensor:
    from fxforge.data import load_texts
    from fxforge.ir.tokenizer import token_windows

    texts = load_texts(recovery.data, "eval")
    return token_windows(recovery.teacher.tokenizer, texts, recovery.eval_context, recovery.eval_tokens)


def perplexity_of(model: Model, windows: torch.Tensor) -> float:
    """Perplexity over `windows`: through the dense training forward when the KV cache keeps the
    model's dtype (the same logits as the paged forward, tests/ir/test_training.py, at SDPA speed),
    else through the paged inference forward, so quantized caches count."""
    from fxforge.evaluate import perplexity
    from fxforge.kernels.bfp import parse_kv_format

    dense = all(parse_kv_format(fmt).is_dense for pair in model.kv_formats() for fmt in pair)
    return perplexity(_DenseScorer(model) if dense else model, windows, show_progress=False).perplexity


def student_perplexity(student: Student, windows: torch.Tensor) -> float:
    """Perplexity of the student as it trains: a skip-decode student teacher-forced under its schedule,
    any other through perplexity_of."""
    from fxforge.evaluate import perplexity

    if isinstance(student, SkipStudent):
        return perplexity(_StudentScorer(student), windows, show_progress=False).perplexity
    return perplexity_of(student.model, windows)


@dataclass
class _StudentScorer:
    student: Student

    @torch.no_grad()
    def logits(self, input_ids) -> torch.Tensor:
        return self.student.logits(torch.as_tensor(input_ids, device=self.student.model.device)).float()


@dataclass
class _DenseScorer:
    model: Model

    @torch.no_grad()
    def logits(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, device=self.model.device)
        return causal_logits(self.model.module, self.model.spec, ids).float()


def run(recovery: Recovery, console=None, on_step=None) -> dict:
    """Train (or resume), checkpoint, evaluate and save the recovered student to recovery.output; the
    summary it returns is also written to OUTPUT/recovery.json. KeyboardInterrupt (or one raised by
    on_step) is caught long enough to write a checkpoint, then raised again."""
    checkpoints = Checkpoints(recovery.output)
    windows = evaluation_windows(recovery)
    started = time.perf_counter()
    if checkpoints.exists():
        state = checkpoints.read_state()
        text = checkpoints.read_data()
    else:
        text = training_text(recovery.teacher, recovery.data, recovery.settings)
        state = _initial_state(recovery, text, windows, time.perf_counter() - started)
        _save_student(recovery, extra_report="", write_recovery=lambda staging: _first_checkpoint(staging, text))
    trainer = Trainer(recovery.student, recovery.teacher, text.windows, recovery.settings)
    if "checkpoint" in state:
        checkpoints.restore(trainer, state)
    save = lambda t: checkpoints.save(t, state)  # noqa: E731
    try:
        _train(trainer, console, on_step, save)
    except KeyboardInterrupt:
        save(trainer)
        raise
    save(trainer)
    return _finish(recovery, trainer, state, text, windows)


def _initial_state(recovery: Recovery, text: TrainingText, windows: torch.Tensor, data_seconds: float) -> dict:
    return {"artifact": str(recovery.artifact.resolve()), "settings": recovery.settings.fixed(), "data": recovery.data,
            "data_seconds": round(data_seconds, 1), "text": text.description,
            "before": {"teacher_perplexity": perplexity_of(recovery.teacher, windows),
                       "student_perplexity": student_perplexity(recovery.student, windows)}}


def _first_checkpoint(staging: Path, text: TrainingText) -> None:
    Checkpoints(staging).write_data(text)


def _train(trainer: Trainer, console, on_step, save) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    settings = trainer.settings
    columns = (TextColumn("recover"), BarColumn(), TextColumn("step {task.fields[step]}  loss {task.fields[loss]:.4f}  "
                                                              "{task.fields[tps]:.0f} tok/s"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=console is None) as progress:
        task = progress.add_task("recover", total=settings.minutes * 60, completed=trainer.state.seconds,
                                 step=trainer.state.step, loss=float("nan"), tps=0.0)

        def report(t: Trainer) -> None:
            s = t.state
            progress.update(task, completed=min(s.seconds, settings.minutes * 60), step=s.step, loss=s.loss,
                            tps=s.tokens / max(s.seconds, 1e-9))
            if on_step is not None:
                on_step(t)

        trainer.run(report, save)


def _finish(recovery: Recovery, trainer: Trainer, state: dict, text: TrainingText, windows: torch.Tensor) -> dict:
    after = student_perplexity(recovery.student, windows)
    loop = trainer.state
    summary = {"artifact": str(recovery.artifact), "output": str(recovery.output), "student": type(recovery.student).__name__,
               "teacher_source": recovery.teacher.source.get("source"), "text": text.description,
               "steps": loop.step, "train_tokens": loop.tokens, "train_seconds": round(loop.seconds, 1),
               "final_kl": loop.kl, "teacher_perplexity": state["before"]["teacher_perplexity"],
               "student_perplexity_before": state["before"]["student_perplexity"], "student_perplexity_after": after,
               "eval_tokens": int(windows[:, 1:].numel()), "eval_context": recovery.eval_context,
               "settings": dataclasses.asdict(recovery.settings)}
    checkpoints = Checkpoints(recovery.output)

    def write_recovery(staging: Path) -> None:
        shutil.copytree(checkpoints.root, staging / RECOVERY)
        (staging / "recovery.json").write_text(json.dumps(summary, indent=2))

    _save_student(recovery, _markdown(summary), write_recovery)
    return summary


def _save_student(recovery: Recovery, extra_report: str, write_recovery) -> None:
    from fxforge.artifact import save_artifact

    save_artifact(recovery.student.model, recovery.output, extra_report, write_extra=write_recovery)


def _markdown(summary: dict) -> str:
    text = summary["text"]
    calib, samples = text["calibration_text"], text["teacher_samples"]
    return ("\n## Recovery (knowledge distillation from the source model)\n\n"
            f"- teacher: {summary['teacher_source']}; student kind: {summary['student']}\n"
            f"- training text: {calib['data']} {calib['split']} split ({calib['documents']} documents, "
            f"{calib['tokens']} tokens) + {samples['sequences']} sequences sampled from the teacher on its prompts "
            f"({samples['tokens']} tokens, temperature {samples['temperature']}); {text['evaluation_text']}\n"
            f"- {summary['steps']} steps, {summary['train_tokens']} tokens, {summary['train_seconds']} s of training\n"
            f"- perplexity on {summary['eval_tokens']} evaluation tokens: teacher {summary['teacher_perplexity']:.4f}, "
            f"student before {summary['student_perplexity_before']:.4f}, after {summary['student_perplexity_after']:.4f}\n")
