"""Pattern replacement on the ATen graph of the torch.compile backend (fxforge/compile_backend.py).

Runs on Inductor's post-grad forward graph (the functional ATen graph aot_autograd hands to its
fw_compiler, after Inductor's decompositions), before Inductor's own post-grad passes. Each matcher
anchors on the node whose value the pattern produces and checks the subgraph behind it; the anchor is
replaced by one fxforge op computing the same value, and dead-code elimination drops what nothing
reads any more (intermediates that other nodes still read stay). Recognised, in the forms
transformers' Llama-family models and the canonical decoder produce:

  RMSNorm   weight * (xf * rsqrt(mean(xf^2, -1, keepdim) + eps)).to(x.dtype), xf = x.float()
            -> fxforge::rmsnorm
  SwiGLU    silu(gate) * up (silu as aten.silu or Inductor's x / (1 + exp(-x)), with the float32
            round trip of half-precision graphs)                         -> fxforge::swiglu
  RoPE      x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin (HF rotate_half) -> fxforge::rotary
  SDPA      any of aten's scaled-dot-product-attention kernels (flash / efficient / cudnn / CPU flash)
            whose only output read is the attention result, without dropout -> fxforge::sdpa

Matchers are written out rather than traced with Inductor's pattern matcher: a traced pattern fixes
dtypes, the decomposition of silu and literal slice bounds, while these read shapes and dtypes from
node.meta["val"], so one matcher covers float32 and half-precision graphs and dynamic shapes.

KSort (weight-norm order, the paper's): the K (or V) input of each attention is followed back through
RoPE, views, QK-norm and the bias to its projection matmul; the projection weight's value is read from
the compiled graph's inputs, and its rows' L2 norms per KV head give the channel order, as the ksort
pass computes it. The orders become arguments of the attention op in the graph.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from fxforge.compile_ops import NATIVE, ROTARY, SDPA
from fxforge.ir import ops
from fxforge.ir.errors import FxforgeError, PassConfigError
from fxforge.kernels.bfp import parse_kv_format

aten, prims = torch.ops.aten, torch.ops.prims
RMSNORM, SWIGLU = ops.RMSNORM.default, ops.SWIGLU.default

_SDPA_KERNELS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}
_MASK_ARG = {aten._scaled_dot_product_efficient_attention.default: "attn_bias",
             aten._scaled_dot_product_cudnn_attention.default: "attn_bias"}
# ops a K/V projection output passes through on its way to attention (their input is args[0])
_PASS_THROUGH = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
                 aten.transpose.int, aten.clone.default, aten.unsqueeze.default, aten.expand.default,
                 prims.convert_element_type.default, RMSNORM, ROTARY}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _strip_convert(node, dtype: Optional[torch.dtype] = None):
    """node's input if node converts to `dtype` (any dtype when None), else node."""
    if _is(node, prims.convert_element_type.default) and (dtype is None or node.args[1] == dtype):
        return node.args[0]
    return node


def _other(node: fx.Node, operand) -> object:
    a, b = node.args[:2]
    return b if a is operand else a


# -- matchers: each returns (target, args) computing the anchor's value, or None ----------------------

def match_rmsnorm(node: fx.Node, impl: str):
    if not _is(node, aten.mul.Tensor):
        return None
    for weight, normed in (node.args[:2], node.args[1::-1]):
        x_dtype = _val(node).dtype if _val(node) is not None else None
        inner = _strip_convert(normed)
        if not _is(inner, aten.mul.Tensor):
            continue
        for xf, rsqrt in (inner.args[:2], inner.args[1::-1]):
            eps = _rsqrt_of_mean_square(rsqrt, xf)
            if eps is None:
                continue
            x = _strip_convert(xf, torch.float32)
            xv, wv = _val(x), _val(weight)
            if xv is None or wv is None or wv.dim() != 1 or wv.shape[0] != xv.shape[-1]:
                continue
            if normed is not inner and normed.args[1] != xv.dtype:  # the .to(x.dtype) must return to x's dtype
                continue
            if x_dtype != torch.promote_types(xv.dtype, wv.dtype):
                continue
            return RMSNORM, (x, weight, float(eps), impl)
    return None


def _rsqrt_of_mean_square(rsqrt, xf) -> Optional[float]:
    """eps if rsqrt is rsqrt(mean(xf^2, [-1], keepdim=True) + eps)."""
    if not _is(rsqrt, aten.rsqrt.default) or not _is(rsqrt.args[0], aten.add.Tensor):
        return None
    mean, eps = rsqrt.args[0].args[:2]
    if not isinstance(eps, (int, float)) or not _is(mean, aten.mean.dim):
        return None
    square, dims = mean.args[:2]
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    ndim = _val(square).dim() if _val(square) is not None else -1
    if not keepdim or list(dims) not in ([-1], [ndim - 1]):
        return None
    if not _is(square, aten.pow.Tensor_Scalar) or square.args[0] is not xf or square.args[1] != 2:
        return None
    return eps


def match_swiglu(node: fx.Node, impl: str):
    if not _is(node, aten.mul.Tensor) or not all(isinstance(a, fx.Node) for a in node.args[:2]):
        return None
    for act, up in (node.args[:2], node.args[1::-1]):
        gate = _silu_input(act)
        if gate is None:
            continue
        gv, uv, ov = _val(gate), _val(up), _val(node)
        if gv is None or uv is None or not (gv.shape == uv.shape == ov.shape and gv.dtype == uv.dtype == ov.dtype):
            continue
        return SWIGLU, (gate, up, impl)
    return None


def _silu_input(act) -> Optional[fx.Node]:
    """g if act is silu(g): aten.silu, or g / (1 + exp(-g)), either inside a float32 round trip."""
    inner = _strip_convert(act)
    if _is(inner, aten.silu.default):
        g = inner.args[0]
    elif _is(inner, aten.div.Tensor) and _is(inner.args[1], aten.add.Tensor):
        g, denominator = inner.args[:2]
        exp, one = denominator.args[:2]
        if not (one == 1 and _is(exp, aten.exp.default) and _is(exp.args[0], aten.neg.default)
                and exp.args[0].args[0] is g):
            return None
    else:
        return None
    if inner is not act:  # a round trip: g is the float32 upcast of the gate, act the downcast
        if not _is(act, prims.convert_element_type.default):
            return None
        g = _strip_convert(g, torch.float32)
        if _val(g) is None or _val(g).dtype != act.args[1]:
            return None
    return g


def match_rotary(node: fx.Node, impl: str):
    if not _is(node, aten.add.Tensor) or not all(_is(a, aten.mul.Tensor) for a in node.args[:2]):
        return None
    for plain, rotated in (node.args[:2], node.args[1::-1]):
        for rot, sin in (rotated.args[:2], rotated.args[1::-1]):
            x = _rotate_half_input(rot)
            if x is None or x not in plain.args[:2]:
                continue
            cos = _other(plain, x)
            xv, cv, sv, ov = _val(x), _val(cos), _val(sin), _val(node)
            if any(v is None for v in (xv, cv, sv, ov)) or ov.shape != xv.shape or ov.dtype != xv.dtype:
                continue
            return ROTARY, (x, cos, sin, impl)
    return None


def _rotate_half_input(cat) -> Optional[fx.Node]:
    """x if cat is cat([-x[..., D/2:], x[..., :D/2]], -1)."""
    if not _is(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    neg, first = cat.args[0]
    if not _is(neg, aten.neg.default):
        return None
    second = neg.args[0]
    if not (_is(first, aten.slice.Tensor) and _is(second, aten.slice.Tensor)) or first.args[0] is not second.args[0]:
        return None
    x = first.args[0]
    xv = _val(x)
    if xv is None:
        return None
    last, half = xv.dim() - 1, xv.shape[-1] // 2
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim not in (-1, last) or first.args[1] not in (-1, last) or second.args[1] not in (-1, last):
        return None
    first_bounds, second_bounds = tuple(first.args[2:4]), tuple(second.args[2:4])
    if first_bounds != (0, half) or second_bounds[0] != half or second_bounds[1] < xv.shape[-1]:
        return None
    return x


def match_sdpa(node: fx.Node, formats: tuple[str, str], impl: str):
    """The getitem(·, 0) of an attention kernel -> (SDPA, args without the permutations)."""
    if not (_is(node, operator.getitem) and node.args[1] == 0 and _is(node.args[0], *_SDPA_KERNELS)):
        return None
    kernel = node.args[0]
    if any(user.args[1] != 0 for user in kernel.users):
        return None  # logsumexp etc. are read (a training graph): not ours to replace
    args = _normalized(kernel)
    if args is None or args.get("dropout_p", 0.0) != 0.0:
        return None
    q = args["query"]
    scale = args.get("scale")
    scale = float(scale) if scale is not None else _val(q).shape[-1] ** -0.5
    mask = args.get(_MASK_ARG.get(kernel.target, "attn_mask"))
    return SDPA, (q, args["key"], args["value"], mask, bool(args.get("is_causal", False)), scale, *formats)


def _normalized(node: fx.Node) -> Optional[dict]:
    from torch.fx.operator_schemas import normalize_function

    found = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return found.kwargs if found is not None else None


# -- KSort: the projection weight behind attention's K or V --------------------------------------------

def projection_weight(node: fx.Node) -> Optional[fx.Node]:
    """The placeholder W of the matmul x @ W^T that produced `node` (through views, RoPE, QK-norm, bias)."""
    while isinstance(node, fx.Node):
        if _is(node, *_PASS_THROUGH):
            node = node.args[0]
        elif _is(node, aten.add.Tensor) and _val(node.args[1]) is not None and _val(node.args[1]).dim() == 1:
            node = node.args[0]  # + bias
        elif _is(node, aten.mm.default, aten.addmm.default):
            weight_t = node.args[-1]
            if _is(weight_t, aten.permute.default) and list(weight_t.args[1]) == [1, 0]:
                weight_t = weight_t.args[0]
            elif _is(weight_t, aten.t.default):
                weight_t = weight_t.args[0]
            return weight_t if weight_t.op == "placeholder" else None
        else:
            return None
    return None


def weight_norm_order(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per KV head, channels by descending L2 norm of their W rows (stable), as the ksort pass orders them."""
    rows = weight.detach().float().cpu()
    norms = rows.view(-1, head_dim, rows.shape[-1]).norm(dim=-1)
    return norms.argsort(dim=-1, descending=True, stable=True)


def _check_head_dim(option: str, fmt: str, tensor: fx.Node, attention: fx.Node) -> None:
    """PassConfigError unless rows of `tensor` (K or V of `attention`) split into whole blocks of `fmt`."""
    if fmt == NATIVE:
        return
    try:
        parse_kv_format(fmt).check_head_dim(int(_val(tensor).shape[-1]))
    except ValueError as exc:
        raise PassConfigError(f"backend 'fxforge': option {option}={fmt!r} cannot quantize {tensor.name}, an input "
                              f"of attention {attention.name}: {exc}") from None


# -- the pass ------------------------------------------------------------------------------------------

class Replacer:
    """Finds the patterns of one graph and rewrites them; `counts` says how many of each it replaced."""

    def __init__(self, options, impl: str, inputs: Sequence = ()):
        self.options, self.impl, self.inputs = options, impl, list(inputs)
        self.counts: Counter = Counter()

    def __call__(self, graph: fx.Graph) -> Counter:
        opts = self.options
        matchers: list[tuple[str, Callable]] = []
        if opts.rmsnorm:
            matchers.append(("rmsnorm", lambda n: match_rmsnorm(n, self.impl)))
        if opts.swiglu:
            matchers.append(("swiglu", lambda n: match_swiglu(n, self.impl)))
        if opts.rope:
            matchers.append(("rope", lambda n: match_rotary(n, self.impl)))
        for name, matcher in matchers:  # norms before RoPE before attention: the KSort walk reads them
            self._replace_all(graph, name, matcher)
        if opts.attention:
            self._replace_all(graph, "attention", lambda n: self._attention(graph, n))
        graph.eliminate_dead_code()
        graph.lint()
        return self.counts

    def _replace_all(self, graph: fx.Graph, name: str, matcher: Callable) -> None:
        for node in list(graph.nodes):
            found = matcher(node)
            if found is None:
                continue
            target, args = found
            with graph.inserting_before(node):
                new = graph.call_function(target, args)
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            new.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(new)
            self.counts[name] += 1

    def _attention(self, graph: fx.Graph, node: fx.Node):
        found = match_sdpa(node, (self.options.k_format_name, self.options.v_format_name), self.impl)
        if found is None:
            return None
        target, args = found
        q, k, v = args[:3]
        for option, fmt, tensor in (("k_format", self.options.k_format_name, k),
                                    ("v_format", self.options.v_format_name, v)):
            _check_head_dim(option, fmt, tensor, node)
        k_perm = self._order(graph, node, k) if self.options.ksort else None
        v_perm = self._order(graph, node, v) if self.options.ksort_v else None
        return target, (*args, k_perm, v_perm, self.impl)

    def _order(self, graph: fx.Graph, attention: fx.Node, tensor: fx.Node) -> list[int]:
        weight = projection_weight(tensor)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if weight is None or placeholders.index(weight) >= len(self.inputs):
            raise FxforgeError(f"ksort: cannot find the projection weight behind {tensor.name} (input of attention "
                               f"{attention.name}); KSort needs the Llama-family q/k/v projections")
        return weight_norm_order(self.inputs[placeholders.index(weight)], _val(tensor).shape[-1]).flatten().tolist()
