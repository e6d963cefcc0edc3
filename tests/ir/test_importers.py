"""Importers: GGUF files (written here, and the real SmolLM2), HF directories and configs, named shapes,
`fxforge.load` dispatch, bad input, and the wheel fetcher."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import platformdirs
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file
from tokenizers import pre_tokenizers

from fxforge.errors import CorruptModelFileError, FxforgeError, UnknownModelError, UnsupportedArchitectureError
from fxforge.ir.importers import fetch
from fxforge.ir.importers.fetch import SMOLLM2, FetchError, fetch_package_file
from fxforge.ir.importers.gguf import load_gguf, open_gguf, spec_from_gguf, unpermute_rope_rows
from fxforge.ir.importers.hf import canonical_state_dict, spec_from_hf_config
from fxforge.ir.importers.named import NAMED_SHAPES
from fxforge.loading import load

transformers = pytest.importorskip("transformers")
from tests.ir.test_equivalence import VOCAB, logprob_diff, tiny_hf_model, token_batch  # noqa: E402

Q8_0, F16, F32 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16, GGMLQuantizationType.F32


# -- GGUF files written from tiny HF models ---------------------------------------------------------------------


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF half-split rows -> interleaved RoPE rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(hf) -> dict[str, np.ndarray]:
    """The llama.cpp tensor names and (permuted) arrays of a tiny HF Llama/Mixtral model."""
    cfg, sd = hf.config, {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{i}.attn_q.weight": llamacpp_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads),
            f"blk.{i}.attn_k.weight": llamacpp_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
        })
        if hasattr(cfg, "num_local_experts"):
            gate, up = np.split(sd[p + "mlp.experts.gate_up_proj"], 2, axis=1)
            out.update({f"blk.{i}.ffn_gate_inp.weight": sd[p + "mlp.gate.weight"],
                        f"blk.{i}.ffn_gate_exps.weight": gate, f"blk.{i}.ffn_up_exps.weight": up,
                        f"blk.{i}.ffn_down_exps.weight": sd[p + "mlp.experts.down_proj"]})
        else:
            out.update({f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
                        f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
                        f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"]})
    return out


def _tokenizer_fields(writer: GGUFWriter) -> None:
    """A byte-level BPE vocab of VOCAB tokens: the 256 byte symbols, two merges, two control tokens, fillers."""
    tokens = ["<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he"]
    tokens += [f"filler{i}" for i in range(VOCAB - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)


def write_tiny_gguf(path, hf, quant=Q8_0, arch="llama"):
    """Write `hf` as a llama-arch GGUF with its matrices in `quant`, as llama.cpp's converter would.

    The HF model is first rounded to what `quant` can hold (block quantization runs along rows, which
    the converter's row permutation keeps intact), so both sides hold the same weights and only the
    importer's mapping and un-permutation are under test.
    """
    cfg = hf.config
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                w = p.detach().numpy().astype(np.float32)
                p.copy_(torch.from_numpy(dequantize(quantize(w, quant), quant).reshape(w.shape)))
    writer = GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if hasattr(cfg, "num_local_experts"):
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    _tokenizer_fields(writer)
    for name, w in _gguf_tensors(hf).items():
        qtype = quant if w.ndim >= 2 else F32
        writer.add_tensor(name, quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unpermute_inverts_llamacpp_permute():
    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    for heads in (1, 3, 6):
        back = unpermute_rope_rows(llamacpp_permute(w, heads), heads)
        assert np.array_equal(back, w), f"round trip with {heads} heads is not exact"
    assert not np.array_equal(llamacpp_permute(w, 3), w)


@pytest.mark.parametrize("kind, quant", [("llama", Q8_0), ("llama-mqa", F16), ("llama-tied", F32),
                                         ("mixtral-moe", Q8_0)],
                         ids=["llama-gqa-q8_0", "llama-mqa-f16", "llama-tied-f32", "mixtral-q8_0"])
def test_tiny_gguf_matches_hf(tmp_path, kind, quant, record_property):
    hf = tiny_hf_model(kind)
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", hf, quant)
    model = load(path)
    assert model.source["kind"] == "gguf" and model.source["path"] == str(path.resolve())
    assert model.spec.family == ("mixtral" if "mixtral" in kind else "llama")
    assert model.spec.num_kv_heads == hf.config.num_key_value_heads
    assert model.spec.tie_word_embeddings == bool(hf.config.tie_word_embeddings)
    assert model.spec.rope_interleaved is False
    ids = token_batch()
    with torch.no_grad():
        diff = logprob_diff(model.logits(ids), hf(ids).logits)
    record_property("max_abs_logprob_diff", diff)
    assert diff < 1e-3, f"{kind} GGUF ({quant.name}) vs HF: max |Δ log-prob| {diff:.3g}"


def test_tiny_gguf_dtype_and_tokenizer(tmp_path):
    hf = tiny_hf_model("llama")
    spec, state, tokenizer = load_gguf(write_tiny_gguf(tmp_path / "m.gguf", hf), dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    ref = hf.model.layers[1].self_attn.k_proj.weight.detach().to(torch.bfloat16)
    assert torch.equal(state["layers.1.attn.k_proj.weight"], ref)
    assert (spec.bos_token_id, spec.eos_token_ids) == (0, (1,))
    t_id = 2 + sorted(pre_tokenizers.ByteLevel.alphabet()).index("t")
    assert tokenizer.encode("the") == [t_id, 259]  # merge "h e" -> "he" (id 259)
    assert tokenizer.encode("<s> the</s>") == [0, 258, 259, 1]  # control tokens whole, "Ġ t" merged first
    assert tokenizer.decode([0, 258, 259, 1]) == " the"


# -- HF directories and configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama-tied", "qwen3-qknorm", "mixtral-moe", "qwen3-moe"])
def test_hf_directory_round_trip(tmp_path, kind):
    hf = tiny_hf_model(kind)
    hf.save_pretrained(tmp_path)
    model = load(tmp_path)
    assert model.source == {"kind": "hf-dir", "path": str(tmp_path.resolve()), "source": str(tmp_path),
                            "dtype": "float32", "random_init": False}
    ids = token_batch()
    with torch.no_grad():
        diff = logprob_diff(model.logits(ids), hf(ids).logits)
    assert diff < 1e-3, f"{kind} from save_pretrained: max |Δ log-prob| {diff:.3g}"


def test_sharded_hf_directory_reads_only_indexed_shards(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    save_file({"unrelated": torch.zeros(3)}, str(tmp_path / "adapter_model.safetensors"))
    ids = token_batch()
    with torch.no_grad():
        diff = logprob_diff(load(tmp_path).logits(ids), hf(ids).logits)
    assert diff < 1e-3


def test_mixtral_transformers4_expert_layout_equals_fused():
    hf = tiny_hf_model("mixtral-moe")
    spec = spec_from_hf_config(hf.config, "MixtralForCausalLM")
    fused = canonical_state_dict(hf.state_dict(), spec)
    legacy = {}
    for name, t in hf.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts")
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1))):
                legacy[f"{base}.{e}.w1.weight"], legacy[f"{base}.{e}.w3.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            base = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts")
            for e, down in enumerate(t):
                legacy[f"{base}.{e}.w2.weight"] = down
        else:
            legacy[name.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = t
    converted = canonical_state_dict(legacy, spec)
    assert converted.keys() == fused.keys()
    for k in fused:
        assert torch.equal(converted[k], fused[k]), k


def test_qwen3_moe_transformers4_expert_layout_equals_fused():
    hf = tiny_hf_model("qwen3-moe")
    spec = spec_from_hf_config(hf.config, "Qwen3MoeForCausalLM")
    fused = canonical_state_dict(hf.state_dict(), spec)
    legacy = {}
    for name, t in hf.state_dict().items():
        base = name.rsplit(".", 1)[0]
        if name.endswith("mlp.experts.gate_up_proj"):
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1))):
                legacy[f"{base}.{e}.gate_proj.weight"], legacy[f"{base}.{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            legacy.update({f"{base}.{e}.down_proj.weight": down for e, down in enumerate(t)})
        else:
            legacy[name] = t
    converted = canonical_state_dict(legacy, spec)
    assert converted.keys() == fused.keys()
    for k in fused:
        assert torch.equal(converted[k], fused[k]), k


def test_qwen3_moe_spec_from_a_transformers4_config_json():
    """transformers 4 names the expert count `num_experts`; norm_topk_prob comes from the config."""
    hf = tiny_hf_model("qwen3-moe-raw-topk")
    d = hf.config.to_dict()
    d["num_experts"] = d.pop("num_local_experts")
    d["architectures"] = ["Qwen3MoeForCausalLM"]
    spec = spec_from_hf_config(d)
    assert spec == spec_from_hf_config(hf.config, "Qwen3MoeForCausalLM")
    assert (spec.family, spec.qk_norm, spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size,
            spec.norm_topk_prob) == ("qwen3_moe", True, 8, 2, 48, False)


@pytest.mark.parametrize("change, message", [
    ({"decoder_sparse_step": 2}, "dense MLP layers \\[0\\] .*decoder_sparse_step=2"),
    ({"mlp_only_layers": [1]}, "dense MLP layers \\[1\\] .*mlp_only_layers=\\[1\\]"),
    ({"num_local_experts": 0}, "dense MLP layers everywhere"),
    ({"shared_expert_intermediate_size": 64}, "a shared expert \\(\\{'shared_expert_intermediate_size': 64\\}\\)"),
], ids=["sparse-step", "mlp-only-layers", "no-experts", "shared-expert"])
def test_qwen3_moe_the_canonical_block_cannot_express_is_refused(change, message):
    config = {**tiny_hf_model("qwen3-moe").config.to_dict(), **change}
    with pytest.raises(UnsupportedArchitectureError, match=f"Qwen3MoeForCausalLM with {message}"):
        spec_from_hf_config(config, "Qwen3MoeForCausalLM")


def test_spec_from_config_json_transformers4_style():
    """A config.json written by transformers 4 (rope_theta / rope_scaling at top level) gives the same spec."""
    v5 = tiny_hf_model("llama-rope-llama3").config
    d = v5.to_dict()
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = {**{k: v for k, v in rope.items() if k != "rope_type"}, "type": "llama3"}
    d["architectures"] = ["LlamaForCausalLM"]
    assert spec_from_hf_config(d) == spec_from_hf_config(v5, "LlamaForCausalLM")
    assert spec_from_hf_config(d).rope_scaling["rope_type"] == "llama3"


def test_qwen_sliding_window_rules():
    base = transformers.Qwen2Config(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=96, vocab_size=128, sliding_window=16).to_dict()
    assert spec_from_hf_config({**base, "use_sliding_window": False}, "Qwen2ForCausalLM").sliding_window == 0
    everywhere = {**base, "use_sliding_window": True, "sliding_window": 16, "layer_types": ["sliding_attention"] * 4}
    assert spec_from_hf_config(everywhere, "Qwen2ForCausalLM").sliding_window == 16
    mixed = {**everywhere, "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 2}
    with pytest.raises(UnsupportedArchitectureError, match="some layers"):
        spec_from_hf_config(mixed, "Qwen2ForCausalLM")


def test_spec_families_and_flags():
    assert spec_from_hf_config(tiny_hf_model("qwen2-bias").config, "Qwen2ForCausalLM").attention_bias
    q3 = spec_from_hf_config(tiny_hf_model("qwen3-qknorm").config, "Qwen3ForCausalLM")
    assert (q3.family, q3.qk_norm, q3.head_dim) == ("qwen3", True, 32)
    mx = spec_from_hf_config(tiny_hf_model("mixtral-moe").config, "MixtralForCausalLM")
    assert (mx.num_experts, mx.num_experts_per_tok, mx.moe_intermediate_size) == (4, 2, 128)
    assert spec_from_hf_config(tiny_hf_model("mistral-sliding").config, "MistralForCausalLM").sliding_window == 6


# -- named shapes and load() ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, params", [("smollm2-135m", 134.5e6), ("llama-3-8b", 8.03e9),
                                          ("mixtral-8x7b", 46.7e9), ("qwen3-30b-a3b", 30.5e9), ("qwen2.5-0.5b", 494e6)])
def test_named_shapes_have_the_published_sizes(name, params):
    model = load(name, random_init=True, device="meta")
    assert model.spec is NAMED_SHAPES[name]
    assert model.source == {"kind": "named", "name": name, "source": name, "dtype": "float32", "random_init": True}
    counted = sum(p.numel() for p in model.module.parameters())
    assert abs(counted - params) / params < 0.01, f"{name}: {counted / 1e6:.1f}M parameters, not {params / 1e6:.1f}M"


def test_random_init_named_model_runs():
    model = load("smollm2-135m", random_init=True, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.tokenizer is None
    out = model.logits(torch.tensor([1, 2, 3]))
    assert out.shape == (3, 49152) and torch.isfinite(out).all()


# -- bad input --------------------------------------------------------------------------------------------------


def test_unknown_name():
    with pytest.raises(UnknownModelError, match="unknown model 'gpt-17'.*smollm2-135m.*llama-3-8b"):
        load("gpt-17")


def test_named_shape_without_weights():
    with pytest.raises(UnknownModelError, match="'llama-3-8b' are not available.*random_init=True"):
        load("llama-3-8b")


def test_non_gguf_file(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_text("definitely not a model\n")
    with pytest.raises(CorruptModelFileError, match=f"{path}.*not a valid GGUF"):
        load(path)


def test_truncated_tiny_gguf(tmp_path):
    full = write_tiny_gguf(tmp_path / "full.gguf", tiny_hf_model("llama")).read_bytes()
    for cut in (100, len(full) // 2, len(full) - 7):  # in the header, in the tensor data, at the very end
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(full[:cut])
        with pytest.raises(CorruptModelFileError, match=f"{path}.*not a valid GGUF"):
            load(path)


def test_unsupported_gguf_architecture(tmp_path):
    writer = GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.gguf has GGUF architecture 'gpt2'; supported: llama"):
        load(tmp_path / "gpt2.gguf")


def test_unsupported_hf_architecture(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        load(gpt2)
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel is not supported.*MixtralForCausalLM"):
        load(tmp_path)


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(UnknownModelError, match="neither config.json.*nor plan.json"):
        load(tmp_path)


def test_bad_dtype():
    with pytest.raises(FxforgeError, match="dtype 'int8'"):
        load("smollm2-135m", random_init=True, dtype="int8")


# -- the real SmolLM2 file --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_path():
    return fetch_package_file(*SMOLLM2)


@pytest.mark.slow
def test_smollm2_spec_matches_named_shape(smollm2_path):
    spec = spec_from_gguf(open_gguf(smollm2_path), smollm2_path)
    assert dataclasses.replace(spec, name="smollm2-135m") == NAMED_SHAPES["smollm2-135m"]


@pytest.mark.slow
def test_truncated_smollm2_gguf(tmp_path, smollm2_path):
    path = tmp_path / "smollm2-truncated.gguf"
    with open(smollm2_path, "rb") as f:
        path.write_bytes(f.read(1000))
    with pytest.raises(CorruptModelFileError, match=f"{path}.*not a valid GGUF"):
        load(path)


# -- fetch ------------------------------------------------------------------------------------------------------


def _fake_index(tmp_path, content: bytes = b"payload\n" * 1000):
    """A local 'package index' holding one wheel, fakepkg, with a data file inside."""
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / "fakepkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fakepkg/__init__.py", "")
        zf.writestr("fakepkg/data/blob.bin", content)
        zf.writestr("fakepkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
        zf.writestr("fakepkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fakepkg-1.0.dist-info/RECORD", "")
    return index


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    """pip resolves against a local folder only, and the cache lives in tmp_path."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(_fake_index(tmp_path)))
    monkeypatch.setenv("FXFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_fetch_honours_cache_override_and_caches(offline_pip, monkeypatch):
    assert fetch.cache_dir() == offline_pip
    path = fetch_package_file("fakepkg", "fakepkg/data/blob.bin")
    assert path == offline_pip / "fakepkg" / "fakepkg" / "data" / "blob.bin"
    assert path.read_bytes() == b"payload\n" * 1000
    monkeypatch.setattr(fetch, "_download_wheel", lambda *a: pytest.fail("a cached file was downloaded again"))
    assert fetch_package_file("fakepkg", "fakepkg/data/blob.bin") == path
    monkeypatch.delenv("FXFORGE_CACHE")
    assert fetch.cache_dir() == Path(platformdirs.user_cache_dir("fxforge"))


def test_fetch_failures_name_the_input(offline_pip):
    with pytest.raises(FetchError, match="could not download package 'no-such-package-xyz'"):
        fetch_package_file("no-such-package-xyz", "x/y.bin")
    with pytest.raises(FetchError, match="has no file 'fakepkg/missing.bin'"):
        fetch_package_file("fakepkg", "fakepkg/missing.bin")
    assert not (offline_pip / "fakepkg" / "fakepkg" / "missing.bin").exists()


def test_fetch_extract_is_atomic(offline_pip, monkeypatch):
    """A failure half-way through extraction leaves neither the file nor a temp file behind."""
    written = []

    class FailingFile:
        def __init__(self, f):
            self.f = f

        def write(self, chunk):
            written.append(len(chunk))
            self.f.write(chunk[: len(chunk) // 2])
            raise OSError("disk full")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_fdopen = fetch.os.fdopen
    monkeypatch.setattr(fetch.os, "fdopen", lambda fd, mode: FailingFile(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="disk full"):
        fetch_package_file("fakepkg", "fakepkg/data/blob.bin")
    assert written, "the failure was never injected"
    folder = offline_pip / "fakepkg" / "fakepkg" / "data"
    assert list(folder.iterdir()) == [], f"left behind: {list(folder.iterdir())}"
    monkeypatch.setattr(fetch.os, "fdopen", real_fdopen)
    assert fetch_package_file("fakepkg", "fakepkg/data/blob.bin").read_bytes() == b"payload\n" * 1000


def test_gsm8k_json_lines_are_readable():
    """The GSM8K member is a JSON-lines file of question/answer rows (downloads it once, ~1 MB)."""
    from fxforge.ir.importers.fetch import GSM8K

    with open(fetch_package_file(*GSM8K), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1319 and {"question", "answer"} <= rows[0].keys()
