"""Hugging Face checkpoints (a directory, or an in-memory PreTrainedModel) -> ModelSpec + canonical weights.

Reads config.json and *.safetensors directly (transformers is not needed for a directory); an
in-memory model brings its own config and state dict. Both the transformers 4 layouts of experts
(Mixtral `block_sparse_moe.experts.N.w1/w2/w3`, Qwen3-MoE `mlp.experts.N.gate_proj/up_proj/down_proj`)
and the fused transformers 5 one (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) are
accepted. MoE models must route every layer through experts, with no shared expert: the canonical
block has one form.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from fxforge.ir.errors import CorruptModelFileError, UnsupportedArchitectureError
from fxforge.ir.spec import ModelSpec
from fxforge.ir.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_MODEL_TYPES = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}


def _unsupported(what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{what} is not supported; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")


def architecture_of(config: dict) -> str:
    """The `*ForCausalLM` class a config describes (from `architectures`, else from `model_type`)."""
    archs = config.get("architectures") or []
    if archs:
        return archs[0]
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    return f"model_type {model_type!r}"


def spec_from_hf_config(config, architecture: str | None = None, name: str = "") -> ModelSpec:
    """ModelSpec of a transformers config (a PretrainedConfig or the dict of a config.json)."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    arch = architecture or architecture_of(cfg)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(f"architecture {arch}")
    family = SUPPORTED_ARCHITECTURES[arch]
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise _unsupported(f"{arch} with hidden_act={cfg.get('hidden_act')!r}, mlp_bias={cfg.get('mlp_bias')}")
    if family != "qwen2" and cfg.get("attention_bias"):
        # llama / qwen3 attention_bias also puts a bias on o_proj, which the canonical decoder lacks
        raise _unsupported(f"{arch} with attention_bias=True")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    num_experts, moe_intermediate = _experts(cfg, family, arch)
    theta, scaling = _rope(cfg, arch)
    eos = cfg.get("eos_token_id")
    return ModelSpec(
        family=family,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_window=_sliding_window(cfg, family, arch),
        num_experts=num_experts,
        num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if num_experts else 0,
        moe_intermediate_size=moe_intermediate,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) if family == "qwen3_moe" else True,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        name=name or cfg.get("_name_or_path", ""),
    )


def _experts(cfg: dict, family: str, arch: str) -> tuple[int, int]:
    """(experts, expert intermediate size); (0, 0) for a dense family. Refuses what the canonical MoE
    block cannot express: dense MLP layers among MoE ones, shared experts."""
    if family == "mixtral":
        return cfg.get("num_local_experts", 0), cfg["intermediate_size"]
    if family != "qwen3_moe":
        return 0, 0
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0  # transformers 4 / 5 name
    dense_layers = [i for i in range(cfg["num_hidden_layers"]) if i in (cfg.get("mlp_only_layers") or [])
                    or (i + 1) % cfg.get("decoder_sparse_step", 1)]
    if not num_experts or dense_layers:
        raise _unsupported(f"{arch} with dense MLP layers {dense_layers or 'everywhere'} (num_experts={num_experts}, "
                           f"decoder_sparse_step={cfg.get('decoder_sparse_step', 1)}, mlp_only_layers="
                           f"{cfg.get('mlp_only_layers')}); the canonical decoder's layers are all MoE or all dense")
    shared = {k: cfg[k] for k in ("shared_expert_intermediate_size", "num_shared_experts", "n_shared_experts")
              if cfg.get(k)}
    if shared:
        raise _unsupported(f"{arch} with a shared expert ({shared}); the canonical MoE block has routed experts only")
    return num_experts, cfg["moe_intermediate_size"]


def _rope(cfg: dict, arch: str) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5 `rope_parameters` or transformers 4 `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise _unsupported(f"{arch} with rope scaling {kind!r} (only 'llama3' is)")
    params.pop("type", None)
    params["rope_type"] = kind
    return float(theta), params


def _sliding_window(cfg: dict, family: str, arch: str) -> int:
    """The attention window if every layer uses it, 0 if none does; a per-layer mix is unsupported."""
    window = cfg.get("sliding_window")
    if family in ("mistral", "mixtral"):
        return int(window or 0)
    if family not in ("qwen2", "qwen3", "qwen3_moe") or not cfg.get("use_sliding_window") or not window:
        return 0
    layers = cfg.get("layer_types") or ["sliding_attention" if i >= cfg.get("max_window_layers", 0)
                                        else "full_attention" for i in range(cfg["num_hidden_layers"])]
    if all(t == "sliding_attention" for t in layers):
        return int(window)
    if any(t == "sliding_attention" for t in layers):
        raise _unsupported(f"{arch} with sliding-window attention on some layers only")
    return 0


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate.weight": "mlp.router.weight",  # transformers 5 Mixtral router
    "block_sparse_moe.gate.weight": "mlp.router.weight",  # transformers 4
    "mlp.experts.down_proj": "mlp.experts.w_down",
}
_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")
_PROJ = re.compile(r"(self_attn|mlp)\.([qkvo]_proj|gate_proj|up_proj|down_proj)\.(weight|bias)")
# transformers 4 per-expert weights: Mixtral's block_sparse_moe w1/w3/w2, Qwen3-MoE's mlp gate/up/down_proj
_OLD_EXPERT = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_OLD_EXPERT_NAMES = {"w1": "w_gate", "w3": "w_up", "w2": "w_down", "gate_proj": "w_gate", "up_proj": "w_up",
                     "down_proj": "w_down"}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def canonical_state_dict(hf_state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """HF parameter names -> canonical names (ir/modules.py); experts stacked [E, ...]."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    unmapped = []
    for name, tensor in hf_state_dict.items():
        if _IGNORED.fullmatch(name) or (name == "lm_head.weight" and spec.tie_word_embeddings):
            continue
        top = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "lm_head.weight"}.get(name)
        if top:
            out[top] = tensor
            continue
        layer = _LAYER.fullmatch(name)
        rest = layer.group(2) if layer else ""
        if rest in _LAYER_NAMES:
            out[f"layers.{layer.group(1)}.{_LAYER_NAMES[rest]}"] = tensor
        elif proj := _PROJ.fullmatch(rest):
            prefix = "attn" if proj.group(1) == "self_attn" else "mlp"
            out[f"layers.{layer.group(1)}.{prefix}.{proj.group(2)}.{proj.group(3)}"] = tensor
        elif rest == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows first, then up
            gate, up = tensor.chunk(2, dim=1)
            out[f"layers.{layer.group(1)}.mlp.experts.w_gate"] = gate
            out[f"layers.{layer.group(1)}.mlp.experts.w_up"] = up
        elif old := _OLD_EXPERT.fullmatch(rest):
            key = (int(layer.group(1)), _OLD_EXPERT_NAMES[old.group(2)])
            experts.setdefault(key, {})[int(old.group(1))] = tensor
        else:
            unmapped.append(name)
    if unmapped:
        raise _unsupported(f"a {spec.family} checkpoint with weights {unmapped[:4]}")
    for (layer, which), per_expert in experts.items():
        out[f"layers.{layer}.mlp.experts.{which}"] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    return out


def load_hf_dir(path: str | Path, dtype: torch.dtype = torch.float32,
                weights: bool = True) -> tuple[ModelSpec, dict[str, torch.Tensor] | None, Tokenizer | None]:
    """config.json + *.safetensors (+ tokenizer.json if present) of a local HF checkpoint directory."""
    path = Path(path)
    config = _read_json(path / "config.json")
    generation = _read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    spec = spec_from_hf_config(config, name=path.name)
    extra_eos = generation.get("eos_token_id")
    if extra_eos is not None:
        ids = extra_eos if isinstance(extra_eos, list) else [extra_eos]
        spec = _with_eos(spec, ids)
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    if not weights:
        return spec, None, tokenizer
    state = {k: v.to(dtype) for k, v in _read_weights(path).items()}
    return spec, canonical_state_dict(state, spec), tokenizer


def from_hf_model(model, dtype: torch.dtype = torch.float32) -> tuple[ModelSpec, dict[str, torch.Tensor], None]:
    """An in-memory transformers model (its weights are copied, the model is left untouched)."""
    arch = type(model).__name__
    spec = spec_from_hf_config(model.config, architecture=arch, name=getattr(model, "name_or_path", "") or arch)
    state = {k: v.detach().to("cpu", dtype, copy=True) for k, v in model.state_dict().items()}
    return spec, canonical_state_dict(state, spec), None


def _with_eos(spec: ModelSpec, ids: list[int]) -> ModelSpec:
    return dataclasses.replace(spec, eos_token_ids=tuple(dict.fromkeys([*spec.eos_token_ids, *ids])))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CorruptModelFileError(f"{path} is missing; an HF checkpoint directory needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptModelFileError(f"{path} is not valid JSON: {e}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: only the shards the index names (other *.safetensors may be adapters)
        files = [path / f for f in sorted(set(_read_json(index)["weight_map"].values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CorruptModelFileError(f"{path} has no *.safetensors weights (convert .bin checkpoints to safetensors)")
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except SafetensorError as e:
            raise CorruptModelFileError(f"{f} is not a valid safetensors file: {e}") from None
    return state
