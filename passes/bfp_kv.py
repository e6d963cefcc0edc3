"""bfp-kv: store K and V in the paged cache in block-floating-point (or MXFP4) formats.

Rewrites the format arguments of every `kv_write` and `attention` node: the cache is allocated in
the packed format, K/V rows are quantized when written and dequantized when attention reads them.
K and V are configured separately; "native" leaves one as the model dtype.

`pre_rope`: the cache stores keys before RoPE, and attention rotates them as it reads them (at the
key's position; kernels/rope.py's key_rope table, read by both attention implementations). Per
layer, K's rope node goes away, kv_write takes the key as it enters RoPE, and attention gets the
layer's `key_rope` buffer. The stored channel order must be a key-RoPE layout (channels j and
j + D/2 hold a RoPE pair): a half-split model's own order is one, and ksort with pre_rope=True keeps
one; any other order (interleaved RoPE, a post-RoPE ksort order) is rearranged into the canonical
one here, which rewrites the rows of W_q / W_k (exact). Per-channel key scales left by ksort
(pre_rope=True, scale=True) move from the graph into the table.

Requires: `kv_write` / `attention` / `rope` role metadata. Runs after `ksort` when both are present.
Guarantees: kv_write and attention of a layer agree on formats (checked by ir.verify); logits
unchanged by pre_rope without quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxforge.ir.capture import annotate, kv_formats, meta, nodes_by_role, set_kv_format_args, spec_of
from fxforge.ir.errors import PassConfigError
from fxforge.ir.model import kv_bytes_per_token
from fxforge.kernels.bfp import parse_kv_format
from fxforge.kernels.rope import key_rope_table
from fxforge.passes.ksort import K_SCALE, _apply_k, _is_scale_node, canonical_key_order
from fxforge.passes.manager import PassConfig, PassResult, register_pass

NATIVE = "native"
KEY_ROPE = "key_rope"  # per-layer buffer [Hkv, 3, D/2] that attention reads pre-RoPE keys with


def _resolve(fmt: str, block: int, native: str) -> str:
    return native if fmt == NATIVE else parse_kv_format(fmt, None if "_" in fmt else block).name


@dataclass(frozen=True)
class BFPKVCache(PassConfig):
    """k_format / v_format: bfp12, bfp14, bfp16, mxfp4, bfloat16, float16, float32 or native;
    pre_rope: cache keys before RoPE, rotated by attention on read."""

    k_format: str = "bfp12"
    v_format: str = "bfp16"
    block: int = 32
    pre_rope: bool = False

    def __post_init__(self):
        super().__post_init__()
        for field_name in ("k_format", "v_format"):
            value = getattr(self, field_name)
            if value != NATIVE:
                try:
                    parse_kv_format(value, None if "_" in value else self.block)
                except ValueError as exc:
                    given = " (the pass default)" if value == _DEFAULTS[field_name] else ""
                    raise ValueError(f"{field_name}={value!r}{given} with block={self.block}: {exc}") from None

    def formats(self, native: str) -> tuple[str, str]:
        return _resolve(self.k_format, self.block, native), _resolve(self.v_format, self.block, native)


_DEFAULTS = {name: f.default for name, f in BFPKVCache.__dataclass_fields__.items()}


def _check(config: BFPKVCache, spec) -> None:
    for fmt in config.formats("float32"):
        parse_kv_format(fmt).check_head_dim(spec.head_dim)


def _rewrites(config: BFPKVCache) -> tuple[str, ...]:
    """pre_rope may rearrange K's channel order into a key-RoPE layout: rows of W_q / W_k and QK-norms."""
    if not config.pre_rope:
        return ()
    return ("layers.*.attn.q_proj.*", "layers.*.attn.k_proj.*", "layers.*.attn.q_norm.*", "layers.*.attn.k_norm.*")


@register_pass("bfp-kv", BFPKVCache, after=("ksort",), check=_check, rewrites=_rewrites)
def bfp_kv(gm, config: BFPKVCache, ctx) -> PassResult:
    """Quantize the KV cache into the configured formats (keys before RoPE with pre_rope)."""
    spec = spec_of(gm)
    before = kv_formats(gm, spec.num_layers)
    native = before[0][0] if parse_kv_format(before[0][0]).is_dense else "float32"
    k_fmt, v_fmt = config.formats(native)
    rearranged = 0
    for layer in range(spec.num_layers):
        if config.pre_rope:
            rearranged += _store_keys_before_rope(gm, layer, spec)
        elif any(_is_scale_node(n.args[0]) for n in nodes_by_role(gm, "rope", layer)):
            raise PassConfigError("ksort ran with pre_rope=True (per-channel key scales before RoPE), which only acts "
                                  "on a pre-RoPE cache: run bfp-kv with pre_rope=True too")
    for node in nodes_by_role(gm, "kv_write") + nodes_by_role(gm, "attention"):
        set_kv_format_args(node, k_fmt, v_fmt)
        meta(node).notes["bfp-kv"] = {"k_format": k_fmt, "v_format": v_fmt, "pre_rope": config.pre_rope}
    gm.graph.lint()
    annotate(gm, spec)
    report = _memory_report(spec, before, k_fmt, v_fmt)
    if config.pre_rope:
        report["pre_rope"] = True
        report["layers_rearranged"] = rearranged
    changed = [(k_fmt, v_fmt)] * spec.num_layers != before or config.pre_rope
    return PassResult(gm, changed, report)


def _store_keys_before_rope(gm: fx.GraphModule, layer: int, spec) -> int:
    """Rewire one layer for pre-RoPE keys; returns 1 if K's channel order had to be rearranged."""
    (attention,) = nodes_by_role(gm, "attention", layer)
    if attention.args[12] is not None:  # already pre-RoPE (bfp-kv ran before): formats only
        return 0
    (rope,) = [n for n in nodes_by_role(gm, "rope", layer) if meta(n).tensor == "k"]
    (write,) = nodes_by_role(gm, "kv_write", layer)
    attn = gm.get_submodule(f"layers.{layer}.attn")
    perm = gm.get_buffer(rope.args[4].target) if isinstance(rope.args[4], fx.Node) else None
    order = canonical_key_order(perm, spec)
    rearrange = not torch.equal(order, torch.arange(spec.head_dim).expand_as(order))
    if rearrange:
        _apply_k(gm, layer, order, spec)
        perm = gm.get_buffer(rope.args[4].target)
    stored, scale_node = rope.args[0], None
    if _is_scale_node(stored):
        scale_node, stored = stored, stored.args[0]
    scale = getattr(attn, K_SCALE) if scale_node is not None else None
    table = key_rope_table(attn.inv_freq, spec.rope_interleaved, perm, spec.num_kv_heads, spec.head_dim, scale)
    attn.register_buffer(KEY_ROPE, table.to(attn.inv_freq.device))
    with gm.graph.inserting_before(attention):
        getter = gm.graph.get_attr(f"layers.{layer}.attn.{KEY_ROPE}")
    attention.update_arg(12, getter)
    write.update_arg(0, stored)
    dead = [rope, rope.args[4]] + ([scale_node, scale_node.args[1]] if scale_node is not None else [])
    for node in dead:  # K's rope and the scale before it feed nothing now, nor do their buffers' getters
        if isinstance(node, fx.Node) and not node.users:
            gm.graph.erase_node(node)
    return int(rearrange)


def _memory_report(spec, before, k_fmt: str, v_fmt: str) -> dict:
    old, new = kv_bytes_per_token(spec, before), kv_bytes_per_token(spec, [(k_fmt, v_fmt)] * spec.num_layers)
    return {"k_format": k_fmt, "v_format": v_fmt,
            "k_bits_per_value": parse_kv_format(k_fmt).bits_per_value(),
            "v_bits_per_value": parse_kv_format(v_fmt).bits_per_value(),
            "kv_bytes_per_token_before": old, "kv_bytes_per_token": new,
            "kv_memory_saving_pct": round(100.0 * (1 - new / old), 2)}
