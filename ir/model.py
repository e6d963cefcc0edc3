"""Model: a canonical decoder (eager or captured) plus its spec and tokenizer.

`logits(input_ids)` runs the full sequence through the runtime-shaped forward with a fresh paged
cache; `generate(prompts, max_new_tokens)` is the reference greedy decoder over the same forward
(prefill once, then one token per step, KV read back from the cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from fxforge.ir.modules import EXPERT_COUNTS, TENSORS_PER_LAYER, DecoderLM
from fxforge.ir.ops import REFERENCE, TRITON, bindings
from fxforge.ir.spec import ModelSpec
from fxforge.kernels.bfp import parse_kv_format
from fxforge.kernels.kv_cache import allocate_kv_pair

DEFAULT_PAGE_SIZE = 16


@dataclass
class BatchInputs:
    """Flat, runtime-shaped inputs of one forward call (see ir/modules.py)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    page_table: torch.Tensor
    query_start: torch.Tensor
    seq_lens: torch.Tensor
    logits_indices: torch.Tensor

    def args(self) -> tuple:
        return (self.input_ids, self.positions, self.slot_mapping, self.page_table, self.query_start,
                self.seq_lens, self.logits_indices)


def build_batch(chunks: list[list[int]], past_lens: list[int], page_tables: list[list[int]], page_size: int,
                device: torch.device | str, all_logits: bool = False) -> BatchInputs:
    """Metadata for sequences whose `chunks` of new tokens follow `past_lens` cached tokens.

    Logits are requested for every token (all_logits) or for the last token of each chunk.
    """
    ids, pos, slots, starts, lens, last = [], [], [], [0], [], []
    for chunk, past, pages in zip(chunks, past_lens, page_tables):
        p = list(range(past, past + len(chunk)))
        ids += chunk
        pos += p
        slots += [pages[i // page_size] * page_size + i % page_size for i in p]
        starts.append(starts[-1] + len(chunk))
        lens.append(past + len(chunk))
        last.append(starts[-1] - 1)
    width = max(len(p) for p in page_tables)
    table = [p + [0] * (width - len(p)) for p in page_tables]

    def t(x, dtype=torch.int64):
        return torch.tensor(x, dtype=dtype, device=device)

    return BatchInputs(t(ids), t(pos), t(slots), t(table, torch.int32), t(starts, torch.int32), t(lens, torch.int32),
                       torch.arange(len(ids), device=device) if all_logits else t(last))


class Model:
    """A canonical decoder ready to run. `module` is a DecoderLM or its captured GraphModule."""

    def __init__(self, module: nn.Module, spec: ModelSpec, tokenizer=None, source: dict | None = None):
        self.module = module
        self.spec = spec
        self.tokenizer = tokenizer
        self.source = source or {}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, spec: ModelSpec, state_dict: dict[str, torch.Tensor] | None, tokenizer=None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        source: dict | None = None, seed: int = 0) -> "Model":
        """Build the canonical module; state_dict=None gives a seeded random init (speed work only)."""
        with torch.device("meta"):
            module = DecoderLM(spec)
        module = module.to(dtype).to_empty(device=device)  # in dtype at once: Mixtral in float32 outgrows an H200
        if spec.tie_word_embeddings:  # materialising from meta unties shared parameters
            module.lm_head.weight = module.embed.weight
        for layer in module.layers:
            layer.attn.inv_freq = spec.rope_inv_freq().to(device)
            if spec.is_moe:
                layer.mlp.experts.expert_counts.zero_()
        if state_dict is None:
            _random_init(module, seed)
        else:
            _load_canonical(module, state_dict, spec)
        module.set_kv_format(_dtype_name(dtype))
        return cls(module.eval(), spec, tokenizer, source)

    # -- facts --------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.module.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(p for p in self.module.parameters()).device

    def kv_formats(self) -> list[tuple[str, str]]:
        """(k_format, v_format) of every layer, as the graph or modules state them."""
        from fxforge.ir.capture import kv_formats

        return kv_formats(self.module, self.spec.num_layers)

    def kernel_bindings(self) -> dict[str, str]:
        """{custom op: impl} of this model (ir/ops.py); an eager canonical module runs the references."""
        if isinstance(self.module, fx.GraphModule):
            return bindings(self.module)
        ops = ("rope", "kv_write", "attention", "moe") if self.spec.is_moe else ("rope", "kv_write", "attention")
        return dict.fromkeys(ops, REFERENCE)

    def expert_counts(self) -> torch.Tensor | None:
        """int32 [MoE layers, E] on the model's device: the (token, slot) pairs the last forward pass (or
        CUDA-graph replay) routed to each expert of each layer, rows that pad a graph batch included;
        None for a dense model. Reading it does not sync the host."""
        counts = [b for name, b in self.module.named_buffers() if name.rsplit(".", 1)[-1] == EXPERT_COUNTS]
        return torch.stack(counts) if counts else None

    def kv_bytes_per_token(self) -> int:
        """Real bytes of KV storage per token over all layers (data + shared exponents)."""
        return kv_bytes_per_token(self.spec, self.kv_formats())

    def new_kv_cache(self, num_pages: int | list[int], page_size: int = DEFAULT_PAGE_SIZE,
                     device=None, v_layout: str = "rows") -> list[torch.Tensor]:
        """The paged KV cache: num_pages pages for every layer, or num_pages[layer] per layer; v_layout
        "channels" stores every layer's (packed) V channels by tokens (kernels/kv_cache.allocate_kv_pair),
        "auto" as resolve_v_layout decides."""
        v_layout = self.cache_v_layout(v_layout, device)
        pages = [num_pages] * self.spec.num_layers if isinstance(num_pages, int) else list(num_pages)
        if len(pages) != self.spec.num_layers:
            raise ValueError(f"num_pages has {len(pages)} entries; the model has {self.spec.num_layers} layers")
        cache = []
        for layer_pages, (k_fmt, v_fmt) in zip(pages, self.kv_formats()):
            cache += allocate_kv_pair(layer_pages, page_size, self.spec.num_kv_heads, self.spec.head_dim,
                                      k_fmt, v_fmt, device or self.device, v_layout)
        assert len(cache) == TENSORS_PER_LAYER * self.spec.num_layers
        return cache

    def cache_v_layout(self, v_layout: str, device=None) -> str:
        """The V layout a cache is made in: "auto" resolved (resolve_v_layout), an explicit "channels"
        refused where i8t cannot run a layer ("auto" resolves to channels only where it can)."""
        if v_layout == "channels":
            self._check_channels_decode(torch.device(device or self.device))
        return self.resolve_v_layout(v_layout, device)

    def resolve_v_layout(self, v_layout: str, device=None) -> str:
        """EngineConfig.v_layout for this model on `device`: "rows" and "channels" as given; "auto" is
        "channels" where the GPU decode would read it with "i8t" (CUDA, Triton kernels, every layer's
        V packed and a shape i8t runs) and this device's tuned decode configs hold an i8t entry for
        every layer's shape (kernels/configs: the tuner timed it there), else "rows"."""
        if v_layout != "auto":
            return v_layout
        device = torch.device(device or self.device)
        # tuned decode configs are kept per CUDA device only (pick_decode_config), so the interpreted CPU
        # resolves to rows
        if device.type != "cuda" or not self._decodes_with_triton(device) or self._i8t_refusal() is not None:
            return "rows"
        from fxforge.kernels import paged_attention as pa

        tuned = pa.tuned_decode_configs(pa._device_name(device))
        spec = self.spec
        keys = {pa.decode_config_key(parse_kv_format(k), parse_kv_format(v), spec.head_dim,
                                     spec.num_heads // spec.num_kv_heads, self.dtype, "channels")
                for k, v in self.kv_formats()}
        return "channels" if all(pa.nearest_tuned_config(tuned, key, None) is not None for key in keys) else "rows"

    def _decodes_with_triton(self, device: torch.device) -> bool:
        """Whether decode attention runs the Triton kernels here: CUDA, or the CPU under TRITON_INTERPRET=1
        (the references read any V layout)."""
        from fxforge.kernels.triton_support import launches_on

        return launches_on(device) and self.kernel_bindings().get("attention") == TRITON

    def _i8t_refusal(self) -> str | None:
        """Why the "i8t" decode kernel cannot run some layer of this model (the first), or None."""
        from fxforge.ir.verify import _pre_rope_layers
        from fxforge.kernels.paged_attention import decode_kernel_supports

        pre_rope = _pre_rope_layers(self.module) if isinstance(self.module, fx.GraphModule) else set()
        for layer, (k_fmt, v_fmt) in enumerate(self.kv_formats()):
            if not decode_kernel_supports("i8t", parse_kv_format(k_fmt), parse_kv_format(v_fmt), self.spec.head_dim,
                                          layer in pre_rope, self.dtype):
                return (f"layer {layer} (K {k_fmt}, V {v_fmt}, head_dim {self.spec.head_dim}, "
                        f"{'pre-RoPE keys, ' if layer in pre_rope else ''}{self.dtype}) cannot be decoded by the 'i8t' "
                        "kernel, the only one that reads that layout on the GPU; it needs a bfloat16 model, post-RoPE "
                        "keys in BFP16 or BFP12 (BFP12 needs a head_dim above 32) and V in BFP16 or BFP12 of K's "
                        "block size. Use v_layout='rows' for this model")
        return None

    def _check_channels_decode(self, device: torch.device) -> None:
        """A V stored channels by tokens is read on the GPU by the "i8t" decode kernel only: refuse the
        layout up front where a layer's shape is one i8t cannot run."""
        refusal = self._i8t_refusal() if self._decodes_with_triton(device) else None
        if refusal is not None:
            raise ValueError(f"v_layout='channels': {refusal}")

    # -- running ------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, batch: BatchInputs, kv_cache: list[torch.Tensor]) -> torch.Tensor:
        return self.module(*batch.args(), kv_cache)

    @torch.no_grad()
    def logits(self, input_ids, page_size: int = DEFAULT_PAGE_SIZE) -> torch.Tensor:
        """Full-sequence forward: input_ids [B, T] (or [T]) -> float32 logits [B, T, V] (or [T, V])."""
        ids = torch.as_tensor(input_ids, dtype=torch.int64)
        squeeze = ids.dim() == 1
        ids = ids.view(1, -1) if squeeze else ids
        batch_size, length = ids.shape
        pages_per_seq = math.ceil(length / page_size)
        tables = [list(range(b * pages_per_seq, (b + 1) * pages_per_seq)) for b in range(batch_size)]
        batch = build_batch(ids.tolist(), [0] * batch_size, tables, page_size, self.device, all_logits=True)
        cache = self.new_kv_cache(batch_size * pages_per_seq, page_size)
        out = self.forward(batch, cache).float().view(batch_size, length, -1)
        return out[0] if squeeze else out

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token id lists instead of strings")
        if chat and self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    @torch.no_grad()
    def generate(self, prompts: list, max_new_tokens: int = 32, chat: bool = True,
                 page_size: int = DEFAULT_PAGE_SIZE) -> list:
        """Greedy decoding through the paged-KV forward. Strings in -> strings out; id lists in -> id lists out."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        as_text = all(isinstance(p, str) for p in prompts)
        token_lists = [self.encode_prompt(p, chat) if isinstance(p, str) else list(p) for p in prompts]
        if any(len(t) == 0 for t in token_lists):
            raise ValueError("a prompt is empty; every prompt needs at least one token")
        outputs = _greedy(self, token_lists, max_new_tokens, page_size)
        return [self.tokenizer.decode(o) for o in outputs] if as_text else outputs


def kv_bytes_per_token(spec: ModelSpec, formats: list[tuple[str, str]]) -> int:
    """Bytes one token occupies in a cache whose layers use these (k_format, v_format) pairs."""
    d, h = spec.head_dim, spec.num_kv_heads
    return sum(h * (parse_kv_format(k).bytes_per_row(d) + parse_kv_format(v).bytes_per_row(d)) for k, v in formats)


def _greedy(model: Model, prompts: list[list[int]], max_new_tokens: int, page_size: int) -> list[list[int]]:
    eos = set(model.spec.eos_token_ids)
    tables, next_page = [], 0
    for p in prompts:
        n = math.ceil((len(p) + max_new_tokens) / page_size)
        tables.append(list(range(next_page, next_page + n)))
        next_page += n
    cache = model.new_kv_cache(next_page, page_size)
    outputs = [[] for _ in prompts]
    active = list(range(len(prompts)))
    chunks, past = [list(p) for p in prompts], [0] * len(prompts)
    for _ in range(max_new_tokens):
        batch = build_batch([chunks[i] for i in active], [past[i] for i in active], [tables[i] for i in active],
                            page_size, model.device)
        next_tokens = model.forward(batch, cache).argmax(dim=-1).tolist()
        still = []
        for i, tok in zip(active, next_tokens):
            past[i] += len(chunks[i])
            outputs[i].append(tok)
            chunks[i] = [tok]
            if tok not in eos:
                still.append(i)
        active = still
        if not active:
            break
    return outputs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _random_init(module: DecoderLM, seed: int) -> None:
    """N(0, 0.02) weights drawn on the parameters' own device (fast for 8B shapes on a GPU)."""
    device = next(module.parameters()).device
    if device.type == "meta":
        return
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def _load_canonical(module: DecoderLM, state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    expected = {k for k in module.state_dict() if not k.endswith("inv_freq")}
    if spec.tie_word_embeddings:
        expected.discard("lm_head.weight")
    given = {k for k in state_dict if not k.endswith("inv_freq")}  # recomputed from the spec
    missing, unexpected = expected - given, given - expected - {"lm_head.weight"}
    if missing or unexpected:
        raise ValueError(f"weights do not match the {spec.family} spec: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    params = dict(module.named_parameters(remove_duplicate=False))
    for name in expected:
        src, dst = state_dict[name], params[name]
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"weight {name} has shape {tuple(src.shape)}; the spec needs {tuple(dst.shape)}")
        dst.data.copy_(src.to(dst.dtype))
