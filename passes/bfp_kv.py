"""bfp-kv: store K and V in the paged cache in block-floating-point (or MXFP4) formats.

Rewrites the format arguments of every `kv_write` and `attention` node: the cache is allocated in
the packed format, K/V rows are quantized when written and dequantized when attention reads them.
K and V are configured separately; "native" leaves one as the model dtype.
Requires: `kv_write` / `attention` role metadata. Runs after `ksort` when both are present.
Guarantees: kv_write and attention of a layer agree on formats (checked by ir.verify).
"""

from __future__ import annotations

from dataclasses import dataclass

from fxforge.ir.capture import annotate, kv_formats, meta, nodes_by_role, set_kv_format_args, spec_of
from fxforge.ir.model import kv_bytes_per_token
from fxforge.kernels.bfp import parse_kv_format
from fxforge.passes.manager import PassConfig, PassResult, register_pass

NATIVE = "native"


def _resolve(fmt: str, block: int, native: str) -> str:
    return native if fmt == NATIVE else parse_kv_format(fmt, None if "_" in fmt else block).name


@dataclass(frozen=True)
class BFPKVCache(PassConfig):
    """k_format / v_format: bfp12, bfp14, bfp16, mxfp4, bfloat16, float16, float32 or native."""

    k_format: str = "bfp12"
    v_format: str = "bfp16"
    block: int = 32

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


@register_pass("bfp-kv", BFPKVCache, after=("ksort",), check=_check)
def bfp_kv(gm, config: BFPKVCache, ctx) -> PassResult:
    """Quantize the KV cache into the configured formats."""
    spec = spec_of(gm)
    before = kv_formats(gm, spec.num_layers)
    native = before[0][0] if parse_kv_format(before[0][0]).is_dense else "float32"
    k_fmt, v_fmt = config.formats(native)
    for node in nodes_by_role(gm, "kv_write") + nodes_by_role(gm, "attention"):
        set_kv_format_args(node, k_fmt, v_fmt)
        meta(node).notes["bfp-kv"] = {"k_format": k_fmt, "v_format": v_fmt}
    annotate(gm, spec)
    return PassResult(gm, [(k_fmt, v_fmt)] * spec.num_layers != before, _memory_report(spec, before, k_fmt, v_fmt))


def _memory_report(spec, before, k_fmt: str, v_fmt: str) -> dict:
    old, new = kv_bytes_per_token(spec, before), kv_bytes_per_token(spec, [(k_fmt, v_fmt)] * spec.num_layers)
    return {"k_format": k_fmt, "v_format": v_fmt,
            "k_bits_per_value": parse_kv_format(k_fmt).bits_per_value(),
            "v_bits_per_value": parse_kv_format(v_fmt).bits_per_value(),
            "kv_bytes_per_token_before": old, "kv_bytes_per_token": new,
            "kv_memory_saving_pct": round(100.0 * (1 - new / old), 2)}
