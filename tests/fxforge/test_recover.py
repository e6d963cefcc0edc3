"""fxforge recover: distillation of a tied artifact from its source on CPU (a tiny random model with a
real tokenizer), checkpoints and exact resume, the report, and bad input (one error line, exit 2,
nothing written)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

import fxforge
from fxforge.artifact import load_artifact
from fxforge.cli import app
from fxforge.errors import FxforgeError
from fxforge.passes import LayerTying
from fxforge.recover import LayersStudent, RecoverySettings, batch_indices, prepare, run, student_for
from tests.conftest import tiny_model

runner = CliRunner()
DOCS = [f"Question: Tom has {n} apples and buys {n + 3} more. How many apples does he have?\n"
        f"Answer: {n} + {n + 3} = {2 * n + 3}. #### {2 * n + 3}" for n in range(12)]


def write_checkpoint(folder: Path, num_layers: int = 4) -> Path:
    """A tiny HF checkpoint directory: Llama config and a byte-level BPE tokenizer (weights come from
    --random-init, seeded, so the teacher reloads exactly)."""
    folder.mkdir(parents=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 320, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": num_layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True,
              "eos_token_id": 0, "rms_norm_eps": 1e-5}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_text(path: Path) -> str:
    path.write_text("\n\n".join(DOCS))
    return str(path)


@pytest.fixture
def tied(tmp_path) -> Path:
    """An artifact of the tiny checkpoint tied to 2 blocks with rank-4 LoRA, compiled by the CLI."""
    source = write_checkpoint(tmp_path / "hf")
    result = runner.invoke(app, ["compile", str(source), "--random-init", "--passes", "layer-tying", "--option",
                                 "unique_layers=2", "--option", "rank=4", "--no-eval", "-o", str(tmp_path / "tied")])
    assert result.exit_code == 0, result.output
    return tmp_path / "tied"


SMALL = dict(batch_size=2, seq_len=16, samples=2, sample_tokens=8, lr=3e-3, warmup_steps=1)


def settings(**changes) -> RecoverySettings:
    return RecoverySettings(**{"minutes": 5.0, "max_steps": 4, **SMALL, **changes})


def test_cli_recovers_and_reports(tied, tmp_path):
    text = write_text(tmp_path / "text.txt")
    args = ["recover", str(tied), "-o", str(tmp_path / "out"), "--minutes", "2", "--device", "cpu", "--max-steps", "6",
            "--data", text, "--eval-tokens", "64", "--eval-context", "32", *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "recovery.json").read_text())
    assert summary["steps"] == 6 and summary["train_tokens"] == 6 * 2 * 16
    assert summary["text"]["calibration_text"]["split"] == "calib" and summary["text"]["teacher_samples"]["sequences"] == 2
    assert "evaluation split (never trained on)" in summary["text"]["evaluation_text"]
    for key in ("teacher_perplexity", "student_perplexity_before", "student_perplexity_after"):
        assert key in result.output and summary[key] > 1
    assert summary["student_perplexity_after"] < summary["student_perplexity_before"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Recovery" in report and "calib split" in report
    recovered, initial = load_artifact(tmp_path / "out"), load_artifact(tied)
    trained = load_file(str(next((tmp_path / "out" / "recovery").glob("step-*")) / "trainable.safetensors"))
    name = "lora.q_proj.B"
    assert torch.equal(recovered.module.get_parameter(name), trained[name])
    assert not torch.equal(recovered.module.get_parameter(name), initial.module.get_parameter(name))
    assert torch.equal(recovered.module.get_parameter("embed.weight"), initial.module.get_parameter("embed.weight"))


def test_interrupted_recovery_resumes_exactly(tied, tmp_path):
    text = write_text(tmp_path / "text.txt")
    straight = run(prepare(tied, tmp_path / "straight", settings(), text, eval_tokens=32, eval_context=16))

    def interrupt(trainer):
        if trainer.state.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(prepare(tied, tmp_path / "resumed", settings(), text, eval_tokens=32, eval_context=16), on_step=interrupt)
    state = json.loads((tmp_path / "resumed" / "recovery" / "state.json").read_text())
    assert state["loop"]["step"] == 2 and (tmp_path / "resumed" / "recovery" / state["checkpoint"]).is_dir()
    resumed = run(prepare(tied, tmp_path / "resumed", settings(), text, eval_tokens=32, eval_context=16))
    assert resumed["steps"] == straight["steps"] == 4
    a, b = load_artifact(tmp_path / "straight"), load_artifact(tmp_path / "resumed")
    for name, param in a.module.named_parameters():
        assert torch.equal(param, b.module.get_parameter(name)), name
    longer = run(prepare(tied, tmp_path / "resumed", settings(max_steps=5), text, eval_tokens=32, eval_context=16))
    assert longer["steps"] == 5  # more steps (or minutes) continue a finished recovery


def test_time_budget_bounds_training(tied, tmp_path):
    text = write_text(tmp_path / "text.txt")
    summary = run(prepare(tied, tmp_path / "out", settings(minutes=0.002, max_steps=None), text, eval_tokens=32, eval_context=16))
    assert 1 <= summary["steps"] and summary["train_seconds"] < 0.002 * 60 + 5


def test_batches_cover_every_window_each_epoch():
    seen = torch.cat([batch_indices(step, 10, 3, seed=1) for step in range(10)])  # 3 epochs of 10 windows
    for epoch in range(3):
        assert sorted(seen[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:20]), "each epoch has its own order"


def test_the_tied_student_trains_blocks_and_lora_not_embeddings():
    opt = fxforge.optimize(tiny_model("llama-mqa-tied"), passes=[LayerTying(unique_layers=1, rank=2)])
    student = student_for(opt)
    assert isinstance(student, LayersStudent)
    names = set(student.trainable())
    assert "lora.up_proj.A" in names and "layers.0.attn.q_proj.weight" in names
    assert "layers.1.attn.q_proj.weight" not in names, "a tied tensor is trained once"
    assert not any(n.startswith(("embed", "lm_head", "norm")) for n in names)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def _fails_cleanly(args, message, output: Path):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output
    assert not output.exists(), "a failed recover left output behind"


def test_a_model_without_a_source_is_refused(tmp_path):
    fxforge.optimize(tiny_model(), passes=[LayerTying(unique_layers=1, rank=2)]).save(tmp_path / "art")
    _fails_cleanly(["recover", str(tmp_path / "art"), "-o", str(tmp_path / "out"), "--minutes", "1"],
                   "no source to distil from", tmp_path / "out")


def test_nothing_to_recover_and_not_an_artifact(tmp_path):
    source = write_checkpoint(tmp_path / "hf")
    assert runner.invoke(app, ["compile", str(source), "--random-init", "--passes", "", "--no-eval", "-o",
                               str(tmp_path / "plain")]).exit_code == 0
    _fails_cleanly(["recover", str(tmp_path / "plain"), "-o", str(tmp_path / "out"), "--minutes", "1"],
                   "nothing to recover", tmp_path / "out")
    _fails_cleanly(["recover", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--minutes", "1"],
                   "not an fxforge artifact", tmp_path / "out")


def test_bad_options_and_another_runs_directory(tied, tmp_path):
    _fails_cleanly(["recover", str(tied), "-o", str(tmp_path / "out"), "--minutes", "0"], "--minutes must be > 0",
                   tmp_path / "out")
    _fails_cleanly(["compile", str(tmp_path / "hf"), "--random-init", "--passes", "layer-tying", "--option", "loops=3",
                    "--no-eval", "-o", str(tmp_path / "bad")], "loops=3 must divide", tmp_path / "bad")
    _fails_cleanly(["compile", str(tmp_path / "hf"), "--random-init", "--passes", "layer-tying", "--option",
                    "flavour=1", "--no-eval", "-o", str(tmp_path / "bad")], "no pass in ['layer-tying']", tmp_path / "bad")
    text = write_text(tmp_path / "text.txt")
    run(prepare(tied, tmp_path / "out", settings(max_steps=1), text, eval_tokens=32, eval_context=16))
    with pytest.raises(FxforgeError, match="holds a recovery of another run"):
        prepare(tied, tmp_path / "out", settings(lr=1e-3), text, eval_tokens=32, eval_context=16)


def test_perplexity_counts_quantized_caches(tokens):
    """Dense caches are scored through the dense forward (same numbers), quantized ones through the paged one."""
    from fxforge.evaluate import perplexity
    from fxforge.passes import BFPKVCache
    from fxforge.recover import perplexity_of

    model = tiny_model()
    windows = torch.randint(0, 257, (3, 24), generator=torch.Generator().manual_seed(2))
    assert perplexity_of(model, windows) == pytest.approx(perplexity(model, windows, show_progress=False).perplexity, rel=1e-5)
    quantized = fxforge.optimize(model, passes=[BFPKVCache(k_format="bfp12", v_format="bfp12", block=16)])
    assert perplexity_of(quantized, windows) == perplexity(quantized, windows, show_progress=False).perplexity
    assert perplexity_of(quantized, windows) != pytest.approx(perplexity_of(model, windows), rel=1e-4)


@pytest.mark.usefixtures("example_passes")
def test_another_pass_plugs_in_its_own_student_kind(monkeypatch):
    """The extension point skip-decode uses: a pass names the student kind that trains its models
    (here only the scaled o_proj, with the model's own training forward); the loop is unchanged."""
    from fxforge.ir.training import causal_logits
    from fxforge.recover import STUDENT_KINDS, Trainer

    class OProjStudent:
        def __init__(self, model):
            self.model = model

        def trainable(self):
            return {"layers.0.attn.o_proj.weight": self.model.module.get_parameter("layers.0.attn.o_proj.weight")}

        def logits(self, input_ids):
            return causal_logits(self.model.module, self.model.spec, input_ids)

    monkeypatch.setitem(STUDENT_KINDS, "test-scale-oproj", OProjStudent)
    teacher = tiny_model()
    student = student_for(fxforge.optimize(teacher, passes=[{"name": "test-scale-oproj", "factor": 3.0}]))
    assert isinstance(student, OProjStudent)
    before = {n: p.detach().clone() for n, p in student.model.module.named_parameters()}
    windows = torch.randint(0, 257, (4, 12), generator=torch.Generator().manual_seed(1))
    trainer = Trainer(student, teacher, windows, settings(max_steps=2, batch_size=2, lr=1e-2))
    trainer.run()
    changed = {n for n, p in student.model.module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"layers.0.attn.o_proj.weight"} and trainer.state.step == 2
