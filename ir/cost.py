"""Cost model: FLOPs, bytes moved and Op/B of every compute node for one batch composition.

`annotate_costs(gm, spec, batch)` writes `node.meta["cost"] = NodeCost(...)` on each compute node of
a captured graph and returns the list. The model is analytic (no tensors run) and counts the
minimum traffic of each op: every operand read once, every result written once (weights in
`batch.dtype`, activations in `batch.dtype`, KV rows at the real bytes of the graph's k/v format,
shared exponents included, so BFP caches move fewer bytes). FLOPs count a multiply-add as 2.

Per node (T = tokens this step, R = logit rows = one per sequence, g = GQA group size):
  q/k/v/o proj, mlp_*, router, lm_head   2*rows*in*out FLOPs; weight once + rows*(in+out) activations
  qkv_proj, mlp_gate_up (fused projections)  the sum of their parts, each costed as the projection it
                 replaced (its input read included), so totals and per-role tables match the unfused
                 graph; NodeCost.parts holds one NodeCost per part (role q_proj, ..., the fused node's name)
  attention      4*Hq*D per (query, key) pair: causal prefill sum_i (i+1), decode `context` keys per
                 sequence; bytes = K and V rows read once per sequence + q read + o written
                 (decode Op/B ~ g for 16-bit KV, higher for BFP KV); pre-RoPE keys add the
                 rotation of every K value read
  kv_write       0 FLOPs; k, v read + T rows written in the cache format (rope_kv_write, role kv_write: plus
                 K's rope FLOPs and positions; the rotated K never goes through memory)
  lora           per-depth LoRA of a tied graph: 2*rows*r*(in+out) + the add; the slot's A and B once
                 + x read, base read, result written
  expert         tokens per active expert ~ T*k/E; FLOPs 3*2*T*k*H*I; bytes = weights of every expert
                 that receives tokens (all E when T*k >= E) + activations; Op/B ~ tokens per expert
  rope, norm, mlp_act (silu, gating mul), residual, router softmax/top-k: elementwise counts; the
                 lowered fxforge::rmsnorm / swiglu as the modules they replace (swiglu reads gate and up once);
                 add_rmsnorm (role norm) = the residual add + the norm, less one read of the sum
  embed          a gather: T rows of the table read, T rows written, 0 FLOPs
Nodes that only reshape or index (view, getitem, narrow, dtype casts) get no cost. NodeCost.role is the
node's fxforge role, except for elementwise `op` nodes, which get "mlp_act", "residual" or "router".
node.meta["cost"] is the whole node's cost; `annotate_costs` returns a fused projection as its parts.

`layer_table(costs, device)` sums per layer with a roofline time per node,
max(FLOPs/peak, bytes/bandwidth) (no overlap between ops, no launch cost), and `placement_hint`
compares that time on two devices (the Duplex xPU vs Logic-PIM decision).
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxforge.ir.errors import FxforgeError
from fxforge.ir.capture import META_KEY, kv_format_args, meta
from fxforge.ir.devices import DeviceSpec
from fxforge.ir.modules import MLP, DecoderLayer, FusedLinear, MoE, RMSNorm
from fxforge.ir.ops import ADD_RMSNORM, ATTENTION, KV_WRITE, LORA, MOE, RMSNORM, ROPE, ROPE_KV_WRITE, SWIGLU
from fxforge.ir.spec import ModelSpec
from fxforge.kernels.bfp import parse_kv_format

COST_KEY = "cost"
PHASES = ("prefill", "decode", "mixed")
INDEX_BYTES = 8  # token ids, positions, slots, expert ids are int64
ROTATE_FLOPS = 6  # per pre-RoPE key value read: scale, then a 2-d rotation (cos/sin not counted)


class SeqGroup(NamedTuple):
    """`count` sequences, each computing `new_tokens` tokens that end at length `length`."""

    count: int
    new_tokens: int
    length: int


@dataclass(frozen=True)
class BatchDesc:
    """One forward step's batch composition.

    prefill: `batch` sequences of `context` prompt tokens each (T = batch * context).
    decode:  `batch` sequences generating one token each, attending to `context` keys (T = batch).
    mixed:   the decode batch above plus one new sequence prefilling `prefill_tokens` tokens.
    `dtype` is the weight and activation dtype ("bfloat16", "float16", "float32"; bf16/fp16/fp32 accepted).
    """

    phase: str
    batch: int
    context: int
    dtype: str = "bfloat16"
    prefill_tokens: int = 0

    def __post_init__(self):
        if self.phase not in PHASES:
            raise FxforgeError(f"phase={self.phase!r} is not one of {PHASES}")
        for name in ("batch", "context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FxforgeError(f"{name}={value!r} must be a positive integer")
        p = self.prefill_tokens
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise FxforgeError(f"prefill_tokens={p!r} must be a non-negative integer")
        if self.phase == "mixed" and p == 0:
            raise FxforgeError("phase='mixed' needs prefill_tokens >= 1 (the new sequence's prompt tokens)")
        if self.phase != "mixed" and p:
            raise FxforgeError(f"prefill_tokens={p} is only meaningful with phase='mixed', not {self.phase!r}; "
                               "for a prefill step set context to the prompt length")
        try:
            fmt = parse_kv_format(self.dtype) if isinstance(self.dtype, str) else None
        except ValueError:
            fmt = None
        if fmt is None or not fmt.is_dense:
            raise FxforgeError(f"dtype={self.dtype!r} is not a dense float dtype; "
                               "expected 'bfloat16', 'float16' or 'float32'")
        object.__setattr__(self, "dtype", fmt.name)

    @property
    def dtype_bytes(self) -> int:
        return parse_kv_format(self.dtype).bytes_per_row(1)

    def sequences(self) -> list[SeqGroup]:
        if self.phase == "prefill":
            return [SeqGroup(self.batch, self.context, self.context)]
        groups = [SeqGroup(self.batch, 1, self.context)]
        if self.phase == "mixed":
            groups.append(SeqGroup(1, self.prefill_tokens, self.prefill_tokens))
        return groups

    @property
    def num_tokens(self) -> int:
        """T: tokens computed this step."""
        return sum(g.count * g.new_tokens for g in self.sequences())

    @property
    def num_sequences(self) -> int:
        """Sequences in the step = rows of logits (one per sequence)."""
        return sum(g.count for g in self.sequences())


@dataclass(frozen=True)
class NodeCost:
    node_name: str
    role: str
    layer: int | None
    flops: int
    bytes: int
    op_per_byte: float
    parts: tuple["NodeCost", ...] = ()  # a fused projection's parts, which sum to this cost

    @classmethod
    def of(cls, node: fx.Node, role: str, flops: float, nbytes: float) -> "NodeCost":
        flops, nbytes = int(round(flops)), int(round(nbytes))
        return cls(node.name, role, meta(node).layer, flops, nbytes, flops / nbytes if nbytes else 0.0)

    @classmethod
    def total(cls, node: fx.Node, role: str, parts: tuple["NodeCost", ...]) -> "NodeCost":
        flops, nbytes = sum(p.flops for p in parts), sum(p.bytes for p in parts)
        return cls(node.name, role, meta(node).layer, flops, nbytes, flops / nbytes if nbytes else 0.0, parts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Step:
    """What every node formula needs: the spec, the batch, and their derived sizes."""

    spec: ModelSpec
    batch: BatchDesc

    @property
    def tokens(self) -> int:
        return self.batch.num_tokens

    @property
    def act(self) -> int:  # bytes per activation / weight element
        return self.batch.dtype_bytes


def annotate_costs(gm: fx.GraphModule, spec: ModelSpec, batch: BatchDesc) -> list[NodeCost]:
    """Write node.meta["cost"] on every compute node (clearing stale ones) and return the costs in graph
    order, a fused projection's as its parts (so grouping by role sees q_proj, k_proj, ...)."""
    step = _Step(spec, batch)
    costs = []
    for node in gm.graph.nodes:
        cost = _node_cost(gm, node, step) if META_KEY in node.meta else None
        if cost is None:
            node.meta.pop(COST_KEY, None)
            continue
        node.meta[COST_KEY] = cost
        costs.extend(cost.parts or (cost,))
    return costs


def _node_cost(gm: fx.GraphModule, node: fx.Node, step: _Step) -> NodeCost | None:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        role = meta(node).role
        if isinstance(module, nn.Embedding):
            return _embed_cost(node, module, step)
        if isinstance(module, FusedLinear):
            bias = module.bias is not None
            return NodeCost.total(node, role, tuple(_linear_cost(node, p.role, module.in_features, p.stop - p.start,
                                                                 bias, step.tokens, step) for p in module.parts))
        if isinstance(module, nn.Linear):
            rows = step.batch.num_sequences if role == "lm_head" else step.tokens
            return _linear_cost(node, role, module.in_features, module.out_features, module.bias is not None, rows,
                                step)
        if isinstance(module, RMSNorm):
            return _norm_cost(node, module, step)
        return None
    if node.op == "call_function" and node.target is MOE:
        return _expert_cost(node, gm.get_parameter(node.args[1].target).shape, step)
    if node.op == "call_function" and node.target is LORA:
        slots, rank, n_in = gm.get_parameter(node.args[2].target).shape
        return _lora_cost(node, rank, n_in, gm.get_parameter(node.args[3].target).shape[1], step)
    if node.op == "call_function" and node.target is ATTENTION:
        return _attention_cost(node, step)
    if node.op == "call_function" and node.target in (KV_WRITE, ROPE_KV_WRITE):
        return _kv_write_cost(node, step)
    if node.op == "call_function" and node.target in (RMSNORM, ADD_RMSNORM):
        return _lowered_norm_cost(gm, node, step)
    if node.op == "call_function" and node.target is SWIGLU:
        n = step.tokens * step.spec.intermediate_size
        return NodeCost.of(node, "mlp_act", 5 * n, 3 * n * step.act)  # silu (4) and the gating mul (1)
    if node.op == "call_function" and node.target is ROPE:
        return _rope_cost(node, step)
    return _elementwise_cost(node, step)


def _lora_cost(node, rank: int, n_in: int, n_out: int, step: _Step) -> NodeCost:
    rows = step.tokens
    flops = 2 * rows * rank * (n_in + n_out) + rows * n_out
    return NodeCost.of(node, "lora", flops, step.act * (rank * (n_in + n_out) + rows * (n_in + 2 * n_out)))


def _linear_cost(node, role, n_in: int, n_out: int, bias: bool, rows: int, step: _Step) -> NodeCost:
    weights = n_in * n_out + (n_out if bias else 0)
    flops = 2 * rows * n_in * n_out + (rows * n_out if bias else 0)
    return NodeCost.of(node, role, flops, step.act * (weights + rows * (n_in + n_out)))


def _embed_cost(node, module: nn.Embedding, step: _Step) -> NodeCost:
    t, h = step.tokens, module.embedding_dim
    return NodeCost.of(node, "embed", 0, 2 * t * h * step.act + t * INDEX_BYTES)


def _norm_cost(node, module: RMSNorm, step: _Step) -> NodeCost:
    spec, t = step.spec, step.tokens
    width = {"attn.q_norm": spec.num_heads * spec.head_dim,
             "attn.k_norm": spec.num_kv_heads * spec.head_dim}.get(node.target.split(".", 2)[-1], spec.hidden_size)
    elements = t * width
    # square, sum, scale by rsqrt, multiply by the weight
    return NodeCost.of(node, "norm", 4 * elements, step.act * (2 * elements + module.weight.numel()))


def _expert_cost(node, w_gate_shape: torch.Size, step: _Step) -> NodeCost:
    num_experts, inter, hidden = w_gate_shape
    routed = step.tokens * step.spec.num_experts_per_tok  # (token, expert) pairs
    active = min(num_experts, routed)  # experts that receive at least one token, on average
    flops = 3 * 2 * routed * hidden * inter
    weights = active * 3 * hidden * inter
    activations = 2 * routed * hidden  # each expert reads its tokens' rows and writes its weighted outputs
    routing = routed * (INDEX_BYTES + step.act)  # expert ids and combine weights
    return NodeCost.of(node, "expert", flops, step.act * (weights + activations) + routing)


def _attention_cost(node, step: _Step) -> NodeCost:
    heads = meta(node).heads
    k_fmt, v_fmt, window = node.args[8], node.args[9], node.args[11]
    kv_row = parse_kv_format(k_fmt).bytes_per_row(heads.head_dim) + parse_kv_format(v_fmt).bytes_per_row(heads.head_dim)
    pairs = kv_rows = 0
    for group in step.batch.sequences():
        pairs += group.count * _keys_attended(group.length - group.new_tokens, group.length, window)
        visible = min(group.length, window + group.new_tokens - 1) if window else group.length
        kv_rows += group.count * visible
    flops = 2 * 2 * heads.num_heads * heads.head_dim * pairs  # q.k and p.v, one multiply-add each
    if node.args[12] is not None:  # pre-RoPE keys: each key row read is scaled and rotated
        flops += ROTATE_FLOPS * kv_rows * heads.num_kv_heads * heads.head_dim
    qo_bytes = 2 * step.tokens * heads.num_heads * heads.head_dim * step.act
    return NodeCost.of(node, "attention", flops, kv_rows * heads.num_kv_heads * kv_row + qo_bytes)


def _keys_attended(past: int, length: int, window: int) -> int:
    """Sum over query positions past..length-1 of the keys each sees: causal, optionally windowed."""
    def causal(n: int) -> int:  # sum_{j=1..n} min(j, window)
        if not window or n <= window:
            return n * (n + 1) // 2
        return window * (window + 1) // 2 + (n - window) * window

    return causal(length) - causal(past)


def _kv_write_cost(node, step: _Step) -> NodeCost:
    heads = meta(node).heads
    k_fmt, v_fmt = kv_format_args(node)
    written = parse_kv_format(k_fmt).bytes_per_row(heads.head_dim) + parse_kv_format(v_fmt).bytes_per_row(heads.head_dim)
    rows = step.tokens * heads.num_kv_heads
    read = rows * 2 * heads.head_dim * step.act
    if node.target is ROPE_KV_WRITE:  # K rotated in registers: _rope_cost's FLOPs, positions read
        return NodeCost.of(node, "kv_write", 3 * rows * heads.head_dim,
                           read + rows * written + 2 * step.tokens * INDEX_BYTES)
    return NodeCost.of(node, "kv_write", 0, read + rows * written + step.tokens * INDEX_BYTES)


def _lowered_norm_cost(gm: fx.GraphModule, node: fx.Node, step: _Step) -> NodeCost:
    """fxforge::rmsnorm as _norm_cost counts the module; add_rmsnorm adds the residual add (x and
    residual read, the sum written) and saves the norm's read of the sum."""
    spec, fused = step.spec, node.target is ADD_RMSNORM
    weight = node.args[2 if fused else 1]
    name = str(weight.target) if isinstance(weight, fx.Node) and weight.op == "get_attr" else ""
    width = (spec.num_heads * spec.head_dim if name.endswith("attn.q_norm.weight") else
             spec.num_kv_heads * spec.head_dim if name.endswith("attn.k_norm.weight") else spec.hidden_size)
    weights = gm.get_parameter(name).numel() if name else width
    elements = step.tokens * width
    flops, moved = 4 * elements, 2 * elements + weights  # square, sum, scale by rsqrt, weight; x read, y written
    if fused:
        flops, moved = flops + elements, moved + 2 * elements
    return NodeCost.of(node, "norm", flops, step.act * moved)


def _rope_cost(node, step: _Step) -> NodeCost:
    heads = meta(node).heads
    num = heads.num_kv_heads if meta(node).tensor == "k" else heads.num_heads
    elements = step.tokens * num * heads.head_dim
    # per element: x*cos + rotate(x)*sin (2 mul, 1 add)
    return NodeCost.of(node, "rope", 3 * elements, 2 * elements * step.act + step.tokens * INDEX_BYTES)


def _owner(node: fx.Node) -> type | None:
    """Class of the innermost module the node was traced in."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][1] if stack else None


def _elementwise_cost(node: fx.Node, step: _Step) -> NodeCost | None:
    """silu / gating mul in the SwiGLU MLP, residual adds, router softmax and top-k."""
    spec, t, act, owner = step.spec, step.tokens, step.act, _owner(node)
    if owner is MLP and node.target is F.silu:
        n = t * spec.intermediate_size
        return NodeCost.of(node, "mlp_act", 4 * n, 2 * n * act)  # x * sigmoid(x): neg, exp, add, div+mul
    if owner is MLP and node.target is operator.mul:
        n = t * spec.intermediate_size
        return NodeCost.of(node, "mlp_act", n, 3 * n * act)
    if owner is DecoderLayer and node.target is operator.add:
        n = t * spec.hidden_size
        return NodeCost.of(node, "residual", n, 3 * n * act)
    if owner is MoE and node.op == "call_method" and node.target == "softmax":
        n = t * spec.num_experts
        return NodeCost.of(node, "router", 5 * n, 2 * n * 4)  # float32 logits: max, sub, exp, sum, div
    if owner is MoE and node.op == "call_method" and node.target == "topk":
        n, k = t * spec.num_experts, t * spec.num_experts_per_tok
        return NodeCost.of(node, "router", n, 4 * n + k * (4 + INDEX_BYTES))
    return None


# -- per-layer and per-role summaries ----------------------------------------------------------

def summarize(costs: Iterable[NodeCost], device: DeviceSpec, dtype: str = "bfloat16") -> dict:
    """Totals of a set of node costs: flops, bytes, Op/B, roofline time (split by bound) and the dominant bound."""
    flops = nbytes = 0
    time = {"compute": 0.0, "memory": 0.0}
    for c in costs:
        flops += c.flops
        nbytes += c.bytes
        time[device.bound(c.flops, c.bytes, dtype)] += device.time_s(c.flops, c.bytes, dtype)
    return {"flops": flops, "bytes": nbytes, "op_per_byte": flops / nbytes if nbytes else 0.0,
            "time_s": time["compute"] + time["memory"], "compute_bound_s": time["compute"],
            "memory_bound_s": time["memory"], "bound": max(time, key=time.get)}


def group_costs(costs: Iterable[NodeCost], key: Callable[[NodeCost], object]) -> dict[object, list[NodeCost]]:
    """Costs grouped by key, groups in order of first appearance."""
    groups: dict[object, list[NodeCost]] = {}
    for c in costs:
        groups.setdefault(key(c), []).append(c)
    return groups


def _layer_key(cost: NodeCost) -> int | str:
    if cost.layer is not None:
        return cost.layer
    return "embed" if cost.role == "embed" else "head"


def layer_table(costs: list[NodeCost], device: DeviceSpec, dtype: str = "bfloat16") -> list[dict]:
    """One row per layer ("embed" first, then 0..N-1, then "head": final norm and lm_head) with summarize()'s fields."""
    groups = group_costs(costs, _layer_key)
    order = (["embed"] if "embed" in groups else []) + sorted(k for k in groups if isinstance(k, int))
    order += ["head"] if "head" in groups else []
    return [{"layer": key, **summarize(groups[key], device, dtype)} for key in order]


def role_table(costs: list[NodeCost], device: DeviceSpec, dtype: str = "bfloat16") -> list[dict]:
    """One row per cost role, summed over layers."""
    return [{"role": role, "nodes": len(group), **summarize(group, device, dtype)}
            for role, group in group_costs(costs, lambda c: c.role).items()]


@dataclass(frozen=True)
class Placement:
    """Where an op runs faster under the roofline: target is "xpu" or "pim"."""

    target: str
    device: str
    xpu_s: float
    pim_s: float

    @property
    def speedup(self) -> float:
        """How much faster the chosen device is (>= 1)."""
        slow, fast = max(self.xpu_s, self.pim_s), min(self.xpu_s, self.pim_s)
        return slow / fast if fast else math.inf


def placement_hint(cost: NodeCost | dict, xpu: DeviceSpec, pim: DeviceSpec, dtype: str = "bfloat16") -> Placement:
    """Compare the roofline time of one node (or a summed row with flops/bytes) on the xPU and the PIM side."""
    flops, nbytes = (cost["flops"], cost["bytes"]) if isinstance(cost, dict) else (cost.flops, cost.bytes)
    xpu_s, pim_s = xpu.time_s(flops, nbytes, dtype), pim.time_s(flops, nbytes, dtype)
    return Placement("pim", pim.name, xpu_s, pim_s) if pim_s < xpu_s else Placement("xpu", xpu.name, xpu_s, pim_s)


__all__ = ["BatchDesc", "NodeCost", "SeqGroup", "Placement", "annotate_costs", "layer_table", "role_table",
           "summarize", "group_costs", "placement_hint", "COST_KEY", "PHASES"]
