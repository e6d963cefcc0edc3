"""KV-cache storage formats: what one row of head_dim values costs and how it is laid out.

A format is one of
  dense   float32 / bfloat16 / float16: the row is stored as is, with no scale;
  bfp     block floating point (BFP12/14/16 = 4/6/8-bit signed mantissas) with one 8-bit shared
          exponent per block of 16, 32 or 64 values;
  mxfp4   OCP MX FP4: E2M1 elements with one E8M0 shared scale per block of 32.
The packed layout and the quantization rules are documented in kernels/bfp.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BFP_MANTISSA_BITS = {"bfp12": 4, "bfp14": 6, "bfp16": 8}
BFP_BLOCKS = (16, 32, 64)
MXFP4_BLOCKS = (32,)
DEFAULT_BLOCK = 32
SCALE_BITS = 8

DENSE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DENSE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
}
_KINDS = ("dense", "bfp", "mxfp4")


@dataclass(frozen=True)
class KVFormat:
    """A KV-cache format. Build one with `parse_kv_format`; `name` round-trips through it."""

    name: str  # canonical: "bfp12_32", "bfp16_64", "mxfp4_32", "float32", "bfloat16", "float16"
    kind: str  # "dense" | "bfp" | "mxfp4"
    mantissa_bits: int  # bfp: 4/6/8; mxfp4: 4 (E2M1 with sign); dense: bits of the dtype (16/32)
    block: int  # values per shared exponent; 0 for dense

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"KVFormat kind={self.kind!r} is not one of {_KINDS}")
        if self.kind == "dense":
            dtype = DENSE_DTYPES.get(self.name)
            consistent = dtype is not None and torch.finfo(dtype).bits == self.mantissa_bits and self.block == 0
        else:
            consistent = _canonical_name(self.kind, self.mantissa_bits, self.block) == self.name
        if not consistent:
            raise ValueError(
                f"inconsistent KVFormat(name={self.name!r}, kind={self.kind!r}, "
                f"mantissa_bits={self.mantissa_bits}, block={self.block}); build formats with parse_kv_format"
            )

    @property
    def is_dense(self) -> bool:
        return self.kind == "dense"

    def bits_per_value(self) -> float:
        """Storage bits per value, shared exponent included: m + 8/block (dense: the dtype's bits)."""
        if self.is_dense:
            return float(self.mantissa_bits)
        return self.mantissa_bits + SCALE_BITS / self.block

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of `data` per row of head_dim values (dense: head_dim * itemsize)."""
        self.check_head_dim(head_dim)
        return head_dim * self.mantissa_bits // 8

    def scale_cols(self, head_dim: int) -> int:
        """Shared-exponent bytes per row (head_dim // block; 0 for dense)."""
        self.check_head_dim(head_dim)
        return 0 if self.is_dense else head_dim // self.block

    def bytes_per_row(self, head_dim: int) -> int:
        """Real storage per row: packed data plus shared exponents."""
        return self.row_bytes(head_dim) + self.scale_cols(head_dim)

    def storage_dtype(self) -> torch.dtype:
        """dtype of the `data` tensor: uint8 for packed formats, the float dtype for dense."""
        return DENSE_DTYPES[self.name] if self.is_dense else torch.uint8

    def check_head_dim(self, head_dim: int) -> None:
        """ValueError unless rows of head_dim values split into whole blocks."""
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got head_dim={head_dim!r} (format {self.name})")
        if not self.is_dense and head_dim % self.block:
            raise ValueError(
                f"format {self.name}: head_dim={head_dim} is not a multiple of block={self.block}; "
                f"blocks never cross rows, so use a block that divides head_dim "
                f"(one of {[b for b in _valid_blocks(self.kind) if head_dim % b == 0] or 'none'})"
            )

    def __str__(self) -> str:
        return self.name


def _valid_blocks(kind: str) -> tuple[int, ...]:
    return MXFP4_BLOCKS if kind == "mxfp4" else BFP_BLOCKS


def _canonical_name(kind: str, mantissa_bits: int, block: int) -> str | None:
    """The name a (kind, mantissa_bits, block) triple must carry; None if the triple is invalid.
    Dense formats are named by dtype (bfloat16 and float16 share 16 bits), so their name is checked apart."""
    if kind == "mxfp4":
        return f"mxfp4_{block}" if mantissa_bits == 4 and block in MXFP4_BLOCKS else None
    family = {m: f for f, m in BFP_MANTISSA_BITS.items()}.get(mantissa_bits)
    return f"{family}_{block}" if family and block in BFP_BLOCKS else None


def valid_format_names() -> list[str]:
    """Every canonical format name, for error messages and CLIs."""
    names = [f"{f}_{b}" for f in BFP_MANTISSA_BITS for b in BFP_BLOCKS]
    return names + [f"mxfp4_{b}" for b in MXFP4_BLOCKS] + list(DENSE_DTYPES)


def parse_kv_format(spec: str | KVFormat, block: int | None = None) -> KVFormat:
    """Parse "bfp12", "bfp12_32", ("bfp12", block=32), "mxfp4", "bf16"/"bfloat16", "fp16", "fp32"/"float32".

    The block defaults to 32. For dense formats `block` is ignored (they have no blocks).
    Unknown names and unsupported blocks raise ValueError naming the bad value and the valid ones.
    """
    if isinstance(spec, KVFormat):
        if block is not None and not spec.is_dense and block != spec.block:
            raise ValueError(f"format {spec.name} has block={spec.block}, but block={block} was also given")
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"KV format must be a string such as 'bfp12_32', got {spec!r}")
    key = spec.strip().lower()
    if key in _DENSE_ALIASES:
        name = _DENSE_ALIASES[key]
        return KVFormat(name, "dense", torch.finfo(DENSE_DTYPES[name]).bits, 0)

    family, _, suffix = key.partition("_")
    if family not in BFP_MANTISSA_BITS and family != "mxfp4":
        raise ValueError(
            f"unknown KV format {spec!r}; valid: {', '.join(valid_format_names())} "
            f"(also 'bfp12'/'bfp14'/'bfp16'/'mxfp4' with block=..., and bf16/fp16/fp32)"
        )
    if suffix:
        if not suffix.isdigit():
            raise ValueError(f"KV format {spec!r}: block suffix {suffix!r} is not an integer; e.g. '{family}_32'")
        if block is not None and block != int(suffix):
            raise ValueError(f"KV format {spec!r} names block {suffix}, but block={block} was also given")
        block = int(suffix)
    block = DEFAULT_BLOCK if block is None else block
    kind = "mxfp4" if family == "mxfp4" else "bfp"
    if block not in _valid_blocks(kind):
        raise ValueError(
            f"KV format {spec!r}: unsupported block={block}; valid blocks for {family}: "
            f"{', '.join(map(str, _valid_blocks(kind)))}"
        )
    mantissa_bits = 4 if kind == "mxfp4" else BFP_MANTISSA_BITS[family]
    return KVFormat(f"{family}_{block}", kind, mantissa_bits, block)
