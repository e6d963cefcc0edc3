"""The fxforge ops in standard ONNX: the bodies of the `fxforge` domain's functions (fxforge/onnx_export.py).

Each body is built node by node (onnx.helper) for one variant of its op: the node's attributes and its
inputs' static dims are fixed, so formats, block sizes and head counts are Python values here. A body
computes what its op's reference computes (kernels/), vectorised and without bit casts, which ONNX
lacks: the shared exponent floor(log2(amax)) comes from Log and is corrected by exact powers of two,
codes are packed and unpacked byte by byte with integer Div and Mod on values below 256. Quantized
bytes equal the references' bit for bit (tests/fxforge/test_onnx_export.py runs the bodies in ONNX
Runtime against kernels/).

  RoPE / RMSNorm / SiluMul  rope_ref / rmsnorm_ref / swiglu_ref, float32 inside, cast back like x
  KVWrite                   functional kv_write_pair_ref: returns the updated k_data, k_scale, v_data, v_scale
  PagedAttention            attention_ref for every query token at once: each token gathers its
                            sequence's pages, dequantizes them and masks by position
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fxforge.kernels.bfp import FP32_MAX, FP32_MIN_NORMAL, parse_kv_format

FLOAT, INT64, UINT8 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.UINT8
_LAST = [-1]


def onnx_dtype(dtype: torch.dtype) -> int:
    """The TensorProto element type of a torch dtype."""
    return {torch.float32: FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
            torch.int64: INT64, torch.int32: TensorProto.INT32, torch.uint8: UINT8}[dtype]


class Body:
    """The nodes of one body. `b.Add(x, y)` appends an Add node and returns its output's name; inputs are
    value names, or Python numbers and lists, which become Constants (int -> int64, float -> float32)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs, outputs: int = 1, **attributes):
        names = [f"{op_type[0].lower()}{op_type[1:]}_{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, [self._value(x) for x in inputs], names, **attributes))
        return names[0] if outputs == 1 else names

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attributes: self.op(op_type, *inputs, **attributes)

    def _value(self, x) -> str:
        if x is None or isinstance(x, str):
            return x or ""
        dtype = np.float32 if isinstance(x, float) or (isinstance(x, list) and isinstance(x[0], float)) else np.int64
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(x, dtype=dtype)))

    def lead(self, x: str, last) -> str:
        """The shape of x with its last dim replaced by `last` (a number or a 1-D int64 value)."""
        return self.Concat(self.Shape(x, end=-1), [last] if isinstance(last, int) else last, axis=0)


# -- BFP quantize / dequantize, on rows of head_dim values -----------------------------------------------

def _floor_log2(b: Body, amax: str) -> str:
    """floor(log2(amax)) exactly, for amax > 0 normal (float32); int64."""
    guess = b.Floor(b.Div(b.Log(amax), float(np.log(2.0))))
    guess = b.Where(b.Greater(b.Pow(2.0, guess), amax), b.Sub(guess, 1.0), guess)
    guess = b.Where(b.LessOrEqual(b.Pow(2.0, b.Add(guess, 1.0)), amax), b.Add(guess, 1.0), guess)
    return b.Cast(guess, to=INT64)


def _columns(b: Body, x: str, count: int) -> list[str]:
    """x [N, G, count] -> its `count` columns, each [N, G, 1]."""
    return [b.Slice(x, [i], [i + 1], _LAST) for i in range(count)]


def _pack(b: Body, codes: str, m: int, head_dim: int) -> str:
    """m-bit codes [N, D] (int64) -> bytes [N, D * m / 8] (kernels/bfp.py layout)."""
    if m == 8:
        return codes
    if m == 4:
        low, high = _columns(b, b.Reshape(codes, [-1, head_dim // 2, 2]), 2)
        packed = b.Add(low, b.Mul(high, 16))
    else:  # m == 6: 4 codes in 3 bytes
        c0, c1, c2, c3 = _columns(b, b.Reshape(codes, [-1, head_dim // 4, 4]), 4)
        packed = b.Concat(b.Add(c0, b.Mul(b.Mod(c1, 4), 64)), b.Add(b.Div(c1, 4), b.Mul(b.Mod(c2, 16), 16)),
                          b.Add(b.Div(c2, 16), b.Mul(c3, 4)), axis=-1)
    return b.Reshape(packed, [-1, head_dim * m // 8])


def _unpack(b: Body, data: str, m: int, head_dim: int) -> str:
    """Inverse of _pack: bytes [N, D * m / 8] (int64) -> unsigned codes [N, D]."""
    if m == 8:
        return data
    if m == 4:
        codes = b.Concat(b.Unsqueeze(b.Mod(data, 16), _LAST), b.Unsqueeze(b.Div(data, 16), _LAST), axis=-1)
    else:
        b0, b1, b2 = _columns(b, b.Reshape(data, [-1, head_dim // 4, 3]), 3)
        codes = b.Concat(b.Mod(b0, 64), b.Add(b.Div(b0, 64), b.Mul(b.Mod(b1, 16), 4)),
                         b.Add(b.Div(b1, 16), b.Mul(b.Mod(b2, 4), 16)), b.Div(b2, 4), axis=-1)
    return b.Reshape(codes, [-1, head_dim])


def quantize(b: Body, x: str, fmt_name: str, head_dim: int) -> tuple[str, str]:
    """kernels/bfp.py quantize_ref (check_finite=False) for dense and BFP formats: (data, scale) of x [..., D]."""
    fmt = parse_kv_format(fmt_name)
    if fmt.is_dense:
        return b.Cast(x, to=onnx_dtype(fmt.storage_dtype())), None
    m, block, blocks_per_row = fmt.mantissa_bits, fmt.block, head_dim // fmt.block
    blocks = b.Reshape(b.Cast(x, to=FLOAT), [-1, blocks_per_row, block])
    magnitude = b.Abs(blocks)
    finite = b.LessOrEqual(magnitude, float(FP32_MAX))  # NaN compares false
    nonfinite = b.Greater(b.ReduceMax(b.Cast(b.Not(finite), to=FLOAT), _LAST, keepdims=0), 0.0)
    kept = b.And(finite, b.GreaterOrEqual(magnitude, float(FP32_MIN_NORMAL)))  # denormals flush to 0
    blocks = b.Where(kept, blocks, 0.0)
    amax = b.ReduceMax(b.Abs(blocks), _LAST, keepdims=0)
    nonzero = b.Greater(amax, 0.0)
    exponent = _floor_log2(b, b.Where(nonzero, amax, 1.0))
    biased = b.Where(nonzero, b.Min(b.Max(b.Add(exponent, 127 - (m - 2)), 1), 254), 0)
    y = b.Mul(blocks, b.Unsqueeze(b.Pow(2.0, b.Cast(b.Sub(127, biased), to=FLOAT)), _LAST))
    qmax = float(2 ** (m - 1) - 1)
    q = b.Cast(b.Clip(b.Round(y), -qmax, qmax), to=INT64)
    codes = b.Where(b.Less(q, 0), b.Add(q, 2 ** m), q)
    codes = b.Where(b.Unsqueeze(nonfinite, _LAST), 0, codes)
    packed = _pack(b, b.Reshape(codes, [-1, head_dim]), m, head_dim)
    scale = b.Where(nonfinite, 255, biased)
    return (b.Reshape(b.Cast(packed, to=UINT8), b.lead(x, head_dim * m // 8)),
            b.Reshape(b.Cast(scale, to=UINT8), b.lead(x, blocks_per_row)))


def dequantize(b: Body, data: str, scale: str, fmt_name: str, head_dim: int) -> str:
    """kernels/bfp.py dequantize_ref to float32: [..., D]."""
    fmt = parse_kv_format(fmt_name)
    if fmt.is_dense:
        return b.Cast(data, to=FLOAT)
    m, block, blocks_per_row = fmt.mantissa_bits, fmt.block, head_dim // fmt.block
    codes = _unpack(b, b.Reshape(b.Cast(data, to=INT64), [-1, head_dim * m // 8]), m, head_dim)
    values = b.Cast(b.Where(b.GreaterOrEqual(codes, 2 ** (m - 1)), b.Sub(codes, 2 ** m), codes), to=FLOAT)
    biased = b.Reshape(b.Cast(scale, to=INT64), [-1, blocks_per_row])
    factor = b.Where(b.Equal(biased, 0), 0.0, b.Pow(2.0, b.Cast(b.Sub(biased, 127), to=FLOAT)))
    rows = b.Mul(b.Reshape(values, [-1, blocks_per_row, block]), b.Unsqueeze(factor, _LAST))
    return b.Reshape(rows, b.lead(data, head_dim))


# -- the ops: each takes the body, its inputs' names, their example tensors and the node's attributes ------

def rope(b: Body, names: list, examples: list, attributes: dict) -> list[str]:
    x, positions, inv_freq, *perm = names
    head_dim = examples[0].shape[-1]
    angles = b.Mul(b.Unsqueeze(b.Cast(positions, to=FLOAT), [1]), b.Unsqueeze(b.Cast(inv_freq, to=FLOAT), [0]))
    cos, sin = b.Unsqueeze(b.Cos(angles), [1]), b.Unsqueeze(b.Sin(angles), [1])  # [T, 1, D/2]
    xf = b.Cast(x, to=FLOAT)
    if perm:  # channel c holds original channel perm[h, c]: rotate in the original order, then permute back
        index = b.Expand(b.Unsqueeze(b.Cast(perm[0], to=INT64), [0]), b.Shape(xf))
        xf = b.ScatterElements(xf, index, xf, axis=-1)
    if attributes["interleaved"]:  # pairs (2i, 2i+1)
        x1, x2 = b.Slice(xf, [0], [head_dim], _LAST, [2]), b.Slice(xf, [1], [head_dim], _LAST, [2])
    else:  # pairs (i, i + D/2)
        x1, x2 = b.Slice(xf, [0], [head_dim // 2], _LAST), b.Slice(xf, [head_dim // 2], [head_dim], _LAST)
    first, second = b.Sub(b.Mul(x1, cos), b.Mul(x2, sin)), b.Add(b.Mul(x2, cos), b.Mul(x1, sin))
    if attributes["interleaved"]:
        out = b.Reshape(b.Concat(b.Unsqueeze(first, _LAST), b.Unsqueeze(second, _LAST), axis=-1), b.Shape(xf))
    else:
        out = b.Concat(first, second, axis=-1)
    if perm:
        out = b.GatherElements(out, index, axis=-1)
    return [b.CastLike(out, x)]


def rmsnorm(b: Body, names: list, examples: list, attributes: dict) -> list[str]:
    x, weight = names
    xf = b.Cast(x, to=FLOAT)
    inverse_rms = b.Reciprocal(b.Sqrt(b.Add(b.ReduceMean(b.Mul(xf, xf), _LAST, keepdims=1), attributes["eps"])))
    out_type = onnx_dtype(torch.promote_types(examples[0].dtype, examples[1].dtype))  # weight * y promotes
    normed = b.Cast(b.CastLike(b.Mul(xf, inverse_rms), x), to=out_type)
    return [b.Mul(b.Cast(weight, to=out_type), normed)]


def silu_mul(b: Body, names: list, examples: list, attributes: dict) -> list[str]:
    gate, up = names
    g = b.Cast(gate, to=FLOAT)
    silu = b.Div(g, b.Add(1.0, b.Exp(b.Neg(g))))  # torch's form of silu
    return [b.CastLike(b.Mul(silu, b.Cast(up, to=FLOAT)), gate)]


def _write(b: Body, x: str, data: str, scale: str, slots: str, fmt_name: str, head_dim: int) -> tuple[str, str]:
    """Row t of x quantized into slot slots[t] of the cache [pages, page_size, Hkv, bytes]."""
    q_data, q_scale = quantize(b, x, fmt_name, head_dim)
    index = b.Unsqueeze(slots, _LAST)
    rows = b.Concat([-1], b.Shape(data, start=2), axis=0)  # pages and page_size flattened into slots
    new_data = b.Reshape(b.ScatterND(b.Reshape(data, rows), index, q_data), b.Shape(data))
    if q_scale is None:  # dense formats keep an empty scale tensor
        return new_data, b.Identity(scale)
    rows = b.Concat([-1], b.Shape(scale, start=2), axis=0)
    return new_data, b.Reshape(b.ScatterND(b.Reshape(scale, rows), index, q_scale), b.Shape(scale))


def kv_write(b: Body, names: list, examples: list, attributes: dict) -> list[str]:
    k, v, k_data, k_scale, v_data, v_scale, slot_mapping = names
    head_dim = examples[0].shape[-1]
    slots = b.Cast(slot_mapping, to=INT64)
    return [*_write(b, k, k_data, k_scale, slots, attributes["k_format"], head_dim),
            *_write(b, v, v_data, v_scale, slots, attributes["v_format"], head_dim)]


def paged_attention(b: Body, names: list, examples: list, attributes: dict) -> list[str]:
    q, k_data, k_scale, v_data, v_scale, page_table, query_start, seq_lens = names
    num_heads, head_dim = examples[0].shape[1:]
    group = num_heads // examples[1].shape[2]
    pages = b.Cast(page_table, to=INT64)
    token = b.Range(0, b.Squeeze(b.Shape(q, end=1), [0]), 1)
    ends = b.Cast(b.Slice(query_start, [1], [2 ** 62]), to=INT64)
    seq = b.ReduceSum(b.Cast(b.GreaterOrEqual(b.Unsqueeze(token, [1]), b.Unsqueeze(ends, [0])), to=INT64), _LAST,
                      keepdims=0)  # the sequence each query token belongs to
    position = b.Sub(b.Gather(b.Cast(seq_lens, to=INT64), seq), b.Sub(b.Gather(ends, seq), token))

    def context(data, scale, fmt):  # [T, L, Hq, D]: the pages of each token's sequence, GQA-repeated
        rows = dequantize(b, b.Gather(data, pages), b.Gather(scale, pages), fmt, head_dim)  # [S, P, page, Hkv, D]
        rows = b.Gather(b.Reshape(rows, [0, -1, num_heads // group, head_dim]), seq)
        return b.Reshape(b.Expand(b.Unsqueeze(rows, [3]), [1, 1, 1, group, 1]), [0, 0, num_heads, head_dim])

    keys = context(k_data, k_scale, attributes["k_format"])
    values = context(v_data, v_scale, attributes["v_format"])
    scores = b.Mul(b.Einsum(b.Cast(q, to=FLOAT), keys, equation="thd,tlhd->thl"), attributes["scale"])
    key_pos = b.Range(0, b.Squeeze(b.Shape(keys, start=1, end=2), [0]), 1)
    query_pos = b.Unsqueeze(position, [1])
    visible = b.LessOrEqual(key_pos, query_pos)
    if attributes["sliding_window"] > 0:
        visible = b.And(visible, b.Greater(key_pos, b.Sub(query_pos, attributes["sliding_window"])))
    scores = b.Where(b.Unsqueeze(visible, [1]), scores, float("-inf"))
    out = b.Einsum(b.Softmax(scores, axis=-1), values, equation="thl,tlhd->thd")
    return [b.CastLike(out, q)]


BODIES = {"RoPE": rope, "RMSNorm": rmsnorm, "SiluMul": silu_mul, "KVWrite": kv_write, "PagedAttention": paged_attention}


def function(domain: str, op_type: str, names: list[str], examples: list, attributes: dict,
             attribute_names: list[str], overload: str, opset: int) -> onnx.FunctionProto:
    """The FunctionProto of one variant of op_type: inputs `names` (shaped like `examples`), the node's
    `attributes` fixed in the body, `attribute_names` declared so that the node may carry them."""
    b = Body()
    outputs = BODIES[op_type](b, list(names), examples, attributes)
    proto = helper.make_function(domain, op_type, list(names), outputs, b.nodes, [helper.make_opsetid("", opset)],
                                 attributes=attribute_names)
    proto.overload = overload
    return proto
