"""opb-placement: every node on the device that minimises the modelled step time (Duplex), experts by a run-time rule.

"Duplex" (2024) places each op by arithmetic intensity: high-Op/B work on the compute side (xPU),
low-Op/B work (decode attention, experts with few tokens) on a memory-side device (Logic-PIM). Here
a workload (phase, batch, context, expert token distribution) is costed with ir/cost.py on a set of
devices joined by links (ir/devices.py), and a dynamic programme over the graph assigns every
compute node a device, minimising the sum of roofline times (no overlap between ops, as the cost
model states) plus the transfers of activations across links.

Units (what gets one device):
  - the GQA unit of a layer: the per-head tensors of every KV group (q/k norms, both ropes), the
    group's KV write and its attention; a group's query heads, its K/V and its cache are never
    split across devices (the projections that produce them are units of their own; their outputs
    cross a link when placed elsewhere, counted);
  - the experts of an MoE layer (one fxforge::moe node), costed under the run-time rule below;
  - every other compute node on its own. Reshapes, casts and indexing follow the node they read.
The DP walks the units in topological order keeping, for each value still to be read, the set of
devices that hold it (a value is moved to a device at most once, from the cheapest holder); it is
exact for chains and for the canonical decoder while the frontier has at most `max_states` states.
Graph inputs (token ids, positions, page tables) are taken as present on every device; the KV cache
lives with its GQA unit; a node's weights live on its device, so static nodes move no weights.
`memory_side_roles` restricts what may leave the compute side (Duplex's mapping: attention and experts).

Experts: each expert's weights live on the compute side (the fastest device) while the memory budget
allows (`memory_budget_gb`, default the device's memory; dense weights and the workload's KV cache
first); the rest live on the memory side (the non-compute device with the most bandwidth). A device
joined to the compute side by a shared-memory link (Logic-PIM) reads every expert where it is. Each
step, an expert with n tokens runs where its modelled time is least: the memory side (its tokens'
activations cross the link) or the compute side (its weights cross the link when they live on the
other side). Both times rise with n and the compute side's more slowly, so this is a threshold:
`threshold_tokens`, the least n at which the compute side wins, recorded per layer (Fiddler's
CPU/GPU rule, Duplex's expert co-processing without overlap). Token counts per expert come from
`experts`: uniform (T*k pairs spread evenly), skewed (Zipf shares with exponent `skew`), or
measured (routing shares per layer on calibration text, stored in the resolved config, so replay
needs no data).

Records: node notes `opb_placement` {device, op_per_byte, break_even_op_per_byte} (experts: their
rule too), gm.meta["opb_placement"] (the plan), and a report with the predicted step time, per
device, per link, single-device baselines and the break-even Op/B per role. `plot_placement` draws
the Op/B of every op against each device's ridge point; `placement_markdown` writes the report.md
section. Requires role/layer metadata; metadata only (no tensor, no structure changes): rewrites=().
"""

from __future__ import annotations

import dataclasses
import enum
import graphlib
import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from fxforge.ir.capture import META_KEY, ROLES, meta, node_roles, sliced_part, spec_of
from fxforge.ir.cost import COST_KEY, INDEX_BYTES, BatchDesc, annotate_costs
from fxforge.ir.devices import DEVICES, DeviceSpec, System, load_system
from fxforge.ir.errors import FxforgeError, PassConfigError
from fxforge.ir.modules import FusedLinear, RMSNorm
from fxforge.ir.ops import ATTENTION, KV_WRITE, LORA, MOE, RMSNORM, ROPE, ROPE_KV_WRITE
from fxforge.ir.spec import ModelSpec
from fxforge.passes.manager import PassConfig, PassResult, register_pass

PLAN_KEY = "opb_placement"
GQA_ROLES = ("rope", "kv_write", "attention")
_GIB = 1e9


class Phase(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


class Distribution(str, enum.Enum):
    UNIFORM = "uniform"
    SKEWED = "skewed"
    MEASURED = "measured"


@dataclass(frozen=True)
class OpBPlacement(PassConfig):
    """devices: built-in names or device / system JSON files; links: extra 'A:B=TEMPLATE|GBPS[/US]'.
    Workload: phase, batch, context, prefill_tokens (mixed), dtype; experts: uniform, skewed (skew =
    Zipf exponent) or measured (calib_tokens of calibration text, windows of calib_context; fills
    expert_shares, one routing share per expert per MoE layer). memory_budget_gb: weights + KV the
    compute side may hold (0: its memory). memory_side_roles: the roles a unit needs to run off the
    compute side (empty: any; Duplex's mapping: attention), experts excepted (their rule decides).
    max_states: DP frontier cap."""

    devices: tuple[str, ...] = ("h100", "logic-pim")
    links: tuple[str, ...] = ()
    phase: Phase = Phase.DECODE
    batch: int = 64
    context: int = 4096
    prefill_tokens: int = 0
    dtype: str = "bfloat16"
    experts: Distribution = Distribution.UNIFORM
    skew: float = 1.0
    calib_tokens: int = 2048
    calib_context: int = 256
    expert_shares: tuple[tuple[float, ...], ...] = ()
    memory_budget_gb: float = 0.0
    memory_side_roles: tuple[str, ...] = ()
    max_states: int = 4096

    def __post_init__(self):
        super().__post_init__()
        for name in ("devices", "links", "memory_side_roles"):
            value = getattr(self, name)
            value = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
            object.__setattr__(self, name, value)
        if not self.devices:
            raise ValueError("devices is empty; name at least one device (built-ins: h100, h200, logic-pim, host-cpu)")
        self.workload()  # batch, context, dtype
        for device in self.system().devices.values():
            device.peak(self.workload().dtype)
        unknown = sorted(set(self.memory_side_roles) - set(ROLES))
        if unknown:
            raise ValueError(f"memory_side_roles: unknown roles {unknown}; roles are {list(ROLES)}")
        for name in ("calib_tokens", "calib_context", "max_states"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("skew", "memory_budget_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a number >= 0")
        shares = tuple(tuple(float(s) for s in layer) for layer in self.expert_shares)
        if any(not layer or min(layer) < 0 or not math.isclose(sum(layer), 1.0, abs_tol=1e-6) for layer in shares):
            raise ValueError("expert_shares must hold, per MoE layer, non-negative shares that sum to 1")
        object.__setattr__(self, "expert_shares", shares)

    def workload(self) -> BatchDesc:
        return BatchDesc(self.phase.value, self.batch, self.context, self.dtype, self.prefill_tokens)

    def system(self) -> System:
        return load_system(self.devices, self.links)


# -- memory: what the compute side holds ---------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of the dense weights + KV cache and of the experts; the experts each layer keeps on the compute side."""

    dense_bytes: float
    kv_bytes: float
    expert_bytes: float  # one expert of one layer
    budget_bytes: float
    resident_experts: int  # per MoE layer, on the compute side

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def weight_bytes(spec: ModelSpec, act: int) -> tuple[float, float]:
    """(dense weight bytes, bytes of one expert of one layer) of a spec in a dtype of `act` bytes."""
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 2 * h
    per_layer += (q + 2 * kv) if spec.attention_bias else 0
    per_layer += 2 * spec.head_dim if spec.qk_norm else 0
    per_layer += spec.num_experts * h if spec.is_moe else 3 * h * spec.intermediate_size
    dense = spec.num_layers * per_layer + spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2) + h
    return float(dense * act), float(3 * h * spec.moe_intermediate_size * act if spec.is_moe else 0)


def memory_plan(config: OpBPlacement, spec: ModelSpec, system: System | None = None) -> MemoryPlan:
    """The compute side's share of the model (on `system`, default the config's devices); PassConfigError when
    the dense part or the whole model does not fit."""
    batch, system = config.workload(), system or config.system()
    compute = compute_side(system, batch.dtype)
    act = batch.dtype_bytes
    dense, expert = weight_bytes(spec, act)
    tokens = sum(g.count * g.length for g in batch.sequences())
    kv = float(tokens * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * act)
    budget = config.memory_budget_gb * _GIB if config.memory_budget_gb else compute.memory_bytes
    if config.memory_budget_gb and budget > compute.memory_bytes:
        raise PassConfigError(f"memory_budget_gb={config.memory_budget_gb} is more than {compute.name}'s "
                              f"{compute.memory_bytes / _GIB:.0f} GB")
    if dense + kv > budget:
        raise PassConfigError(f"the memory budget of {compute.name} ({budget / _GIB:.1f} GB) is too small even for the "
                              f"dense part: {dense / _GIB:.1f} GB of non-expert weights + {kv / _GIB:.1f} GB of KV "
                              f"cache ({tokens} tokens of {batch.phase} batch {batch.batch}, context {batch.context}); "
                              "raise the budget or shrink batch / context")
    experts_total = expert * spec.num_layers * spec.num_experts
    capacity = budget + sum(d.memory_bytes for d in _memory_sides(system, compute))
    if dense + kv + experts_total > capacity:
        raise PassConfigError(f"the workload cannot be held: {(dense + kv + experts_total) / _GIB:.1f} GB of weights "
                              f"and KV cache against {capacity / _GIB:.1f} GB on {list(system.devices)} "
                              "(shared memories counted once); shrink batch / context or add a device")
    resident = spec.num_experts
    if expert:
        resident = min(spec.num_experts, int((budget - dense - kv) // (expert * spec.num_layers)))
    return MemoryPlan(dense, kv, expert, budget, resident)


def compute_side(system: System, dtype: str) -> DeviceSpec:
    """The device with the highest compute peak for dtype."""
    return max(system.devices.values(), key=lambda d: d.peak(dtype))


def memory_side(system: System, dtype: str) -> DeviceSpec | None:
    """The other device with the most bandwidth (None for one device)."""
    compute = compute_side(system, dtype)
    others = [d for d in system.devices.values() if d.name != compute.name]
    return max(others, key=lambda d: d.mem_bandwidth) if others else None


def _memory_sides(system: System, compute: DeviceSpec) -> list[DeviceSpec]:
    """Devices with their own memory besides the compute side (a shared-memory link: the same memory)."""
    own = []
    for d in system.devices.values():
        if d.name == compute.name:
            continue
        shared = any(link.shared_memory and link.joins(d.name, compute.name) for link in system.links)
        if not shared:
            own.append(d)
    return own


def _check(config: OpBPlacement, spec: ModelSpec) -> None:
    memory_plan(config, spec)
    if config.expert_shares and (not spec.is_moe or len(config.expert_shares) != spec.num_layers
                                 or any(len(s) != spec.num_experts for s in config.expert_shares)):
        raise ValueError(f"expert_shares must have {spec.num_layers} rows of {spec.num_experts} shares "
                         f"(MoE layers x experts), got {len(config.expert_shares)} rows")


# -- expert token counts --------------------------------------------------------------------------

def expert_token_counts(shares: list[float], pairs: int, tokens: int) -> list[int]:
    """Integer (token, slot) pairs per expert: `pairs` split by shares (largest remainder), each at most
    `tokens` (a token reaches an expert once); the excess goes to the experts with room, largest share first."""
    raw = [s * pairs for s in shares]
    counts = [min(tokens, int(r)) for r in raw]
    order = sorted(range(len(shares)), key=lambda e: (-(raw[e] - int(raw[e])), -shares[e], e))
    left = pairs - sum(counts)
    while left > 0:
        room = [e for e in order if counts[e] < tokens]
        if not room:
            break
        for e in room[:left]:
            counts[e] += 1
        left = pairs - sum(counts)
    return counts


def distribution_shares(config: OpBPlacement, spec: ModelSpec) -> list[list[float]]:
    """Routing shares per MoE layer: uniform, Zipf(skew) or the measured ones in the config."""
    e = spec.num_experts
    if config.expert_shares:
        return [list(s) for s in config.expert_shares]
    if config.experts is Distribution.SKEWED:
        weights = [1.0 / (rank + 1) ** config.skew for rank in range(e)]
        return [[w / sum(weights) for w in weights]] * spec.num_layers
    return [[1.0 / e] * e] * spec.num_layers


def measure_shares(gm: fx.GraphModule, ctx, config: OpBPlacement) -> tuple[tuple[float, ...], ...]:
    """Routing shares of every expert of every MoE layer over the calibration windows (the graph's own forward)."""
    from fxforge.ir.model import Model
    from fxforge.ir.modules import EXPERT_COUNTS
    from fxforge.passes.calibration import calibration_windows

    windows = calibration_windows(ctx, config.calib_context, config.calib_tokens, "opb-placement experts=measured")
    spec = spec_of(gm)
    model = Model(gm, spec, getattr(ctx.model, "tokenizer", None))
    buffers = [b for name, b in gm.named_buffers() if name.rsplit(".", 1)[-1] == EXPERT_COUNTS]
    totals = torch.zeros(len(buffers), spec.num_experts, dtype=torch.float64)
    for start in range(0, len(windows), 8):
        model.logits(windows[start:start + 8])
        totals += torch.stack([b.detach().double().cpu() for b in buffers])
    return tuple(tuple((row / row.sum()).tolist()) for row in totals)


# -- units: what gets one device -------------------------------------------------------------------

@dataclass
class Unit:
    """Nodes placed together, their modelled time on every device, and what they read from other units."""

    key: str
    nodes: list[fx.Node]
    times: dict[str, float] = field(default_factory=dict)
    inputs: dict[int, float] = field(default_factory=dict)  # producing unit -> bytes read
    order: int = 0


@dataclass(frozen=True)
class Transfer:
    unit: int  # the unit whose output moves
    src: str
    dst: str
    nbytes: float
    link: str
    seconds: float


@dataclass
class Solution:
    devices: list[str]
    total_s: float
    transfers: list[Transfer]


def solve(units: list[Unit], system: System, max_states: int = 4096) -> Solution:
    """The device of each unit (in topological order) minimising the sum of unit times and transfers.

    State: for every value still to be read, the set of devices (bitmask) that hold it; a unit on d
    moves each input it lacks on d once, from its cheapest holder, across their link."""
    names = list(system.devices)
    bit = {d: 1 << i for i, d in enumerate(names)}
    last_use: dict[int, int] = {}
    for i, unit in enumerate(units):
        for v in unit.inputs:
            last_use[v] = i
    states: dict[tuple, tuple[float, tuple | None, str | None]] = {(): (0.0, None, None)}
    history = []
    for i, unit in enumerate(units):
        new: dict[tuple, tuple[float, tuple, str]] = {}
        for state, (cost, _, _) in states.items():
            held = dict(state)
            for d in names:
                time = unit.times.get(d, math.inf)
                if math.isinf(time):
                    continue
                masks, extra = dict(held), 0.0
                for v, nbytes in unit.inputs.items():
                    if not masks[v] & bit[d]:
                        extra += _cheapest(system, names, masks[v], d, nbytes)[1]
                        masks[v] |= bit[d]
                if last_use.get(i, -1) > i:
                    masks[i] = bit[d]
                key = tuple(sorted((v, m) for v, m in masks.items() if last_use.get(v, -1) > i))
                total = cost + time + extra
                if key not in new or total < new[key][0]:
                    new[key] = (total, state, d)
        if not new:
            raise PassConfigError(f"no device can run {unit.key}; devices {names}")
        if len(new) > max_states:
            new = dict(sorted(new.items(), key=lambda kv: kv[1][0])[:max_states])
        history.append(new)
        states = new
    key = min(states, key=lambda k: states[k][0])
    total = states[key][0]
    devices = []
    for step in reversed(history):
        _, previous, device = step[key]
        devices.append(device)
        key = previous
    devices.reverse()
    return Solution(devices, total, transfers_of(units, devices, system))


def _cheapest(system: System, names: list[str], mask: int, dst: str, nbytes: float) -> tuple[str, float, str]:
    """(source, seconds, link name) of the cheapest move of nbytes to dst from a device in mask."""
    best = (None, math.inf, "")
    for i, src in enumerate(names):
        if mask >> i & 1:
            try:
                link = system.link(src, dst)
            except FxforgeError:  # no link between them: not a source
                continue
            seconds = link.time_s(nbytes)
            if seconds < best[1]:
                best = (src, seconds, link.name)
    return best


def transfers_of(units: list[Unit], devices: list[str], system: System) -> list[Transfer]:
    """The moves an assignment makes (each value to each device once, from its cheapest holder)."""
    names = list(system.devices)
    bit = {d: 1 << i for i, d in enumerate(names)}
    held: dict[int, int] = {}
    moves = []
    for i, (unit, d) in enumerate(zip(units, devices)):
        for v, nbytes in unit.inputs.items():
            if not held[v] & bit[d]:
                src, seconds, link = _cheapest(system, names, held[v], d, nbytes)
                moves.append(Transfer(v, src, d, nbytes, link, seconds))
                held[v] |= bit[d]
        held[i] = bit[d]
    return moves


def build_units(gm: fx.GraphModule) -> tuple[list[Unit], dict[fx.Node, int]]:
    """Units of a cost-annotated graph, topologically ordered, and the unit of every node that has one."""
    owner: dict[fx.Node, str] = {}
    members: dict[str, list[fx.Node]] = {}
    first: dict[str, int] = {}
    for index, node in enumerate(gm.graph.nodes):
        key = _unit_key(node, owner)
        if key is None:
            continue
        owner[node] = key
        members.setdefault(key, []).append(node)
        first.setdefault(key, index)
    deps: dict[str, set[str]] = {key: set() for key in members}
    for node, key in owner.items():
        for source in node.all_input_nodes:
            if source in owner and owner[source] != key:
                deps[key].add(owner[source])
    sorter = graphlib.TopologicalSorter(deps)
    sorter.prepare()
    ordered = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=first.get)
        ordered += ready
        sorter.done(*ready)
    index = {key: i for i, key in enumerate(ordered)}
    units = [Unit(key, members[key], order=i) for i, key in enumerate(ordered)]
    return units, {node: index[key] for node, key in owner.items()}


def _unit_key(node: fx.Node, owner: dict[fx.Node, str]) -> str | None:
    """A compute node's unit; a reshape / cast / getitem joins the unit of what it reads; inputs and weights: none."""
    if META_KEY not in node.meta or node.op in ("placeholder", "get_attr", "output"):
        return None
    info = meta(node)
    if _is_head_norm(node):
        return f"gqa.{info.layer}"
    if COST_KEY in node.meta or node.target in (KV_WRITE, ROPE_KV_WRITE):
        if info.role in GQA_ROLES:
            return f"gqa.{info.layer}"
        return node.name
    sources = [owner[s] for s in node.all_input_nodes if s in owner]
    return sources[0] if sources else None


def _is_head_norm(node: fx.Node) -> bool:
    """A q/k norm over head_dim: the module, or the fxforge::rmsnorm that lowering made of it."""
    if node.op == "call_module":
        return str(node.target).endswith(("attn.q_norm", "attn.k_norm"))
    weight = node.args[1] if node.target is RMSNORM and len(node.args) > 1 else None
    return isinstance(weight, fx.Node) and str(weight.target).endswith(("attn.q_norm.weight", "attn.k_norm.weight"))


# -- times ----------------------------------------------------------------------------------------

def output_bytes(gm: fx.GraphModule, node: fx.Node, batch: BatchDesc, spec: ModelSpec, memo: dict) -> float:
    """Bytes of a node's output for the workload, from its role and the widths it reads (no shapes run)."""
    if node in memo:
        return memo[node]
    act, tokens = batch.dtype_bytes, batch.num_tokens
    args = [a for a in node.args if isinstance(a, fx.Node)]
    size = 0.0
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.Linear, FusedLinear)):
            rows = batch.num_sequences if meta(node).role == "lm_head" else tokens
            size = rows * module.out_features * act
        elif isinstance(module, nn.Embedding):
            size = tokens * module.embedding_dim * act
        elif isinstance(module, RMSNorm) and args:
            size = output_bytes(gm, args[0], batch, spec, memo)
    elif node.target in (KV_WRITE, ROPE_KV_WRITE) or node.op in ("placeholder", "get_attr", "output"):
        size = 0.0
    elif node.target is LORA:
        size = output_bytes(gm, node.args[1], batch, spec, memo)
    elif sliced_part(node) is not None:  # one part's columns of a fused projection
        part, whole = sliced_part(node), node.args[0]
        size = output_bytes(gm, whole, batch, spec, memo) * (part.stop - part.start) / meta(whole).parts[-1].stop
    elif node.target in (ROPE, ATTENTION, MOE):
        size = output_bytes(gm, node.args[0], batch, spec, memo)
    elif node.op == "call_method" and node.target == "topk":
        size = tokens * spec.num_experts_per_tok * (4 + INDEX_BYTES)
    elif node.op == "call_method" and node.target in ("float", "softmax"):
        size = output_bytes(gm, args[0], batch, spec, memo) * 4 / act if args else 0.0
    elif node.op == "call_method" and node.target == "index_select" and args:
        size = output_bytes(gm, args[0], batch, spec, memo) * batch.num_sequences / tokens
    elif node.target is operator.getitem and args and args[0].op == "call_method" and args[0].target == "topk":
        size = output_bytes(gm, args[0], batch, spec, memo) / 2
    elif args:
        size = max(output_bytes(gm, a, batch, spec, memo) for a in args)
    memo[node] = size
    return size


def expert_option_times(n: int, hidden: int, inter: int, act: int, run_on: DeviceSpec, anchor: str,
                        weights_on: set[str], system: System, dtype: str) -> float:
    """Seconds for one expert with n (token, slot) pairs run on `run_on`, its activations at `anchor`,
    its weights on the devices `weights_on` (copied across a link when run_on is not one of them)."""
    flops = 6.0 * n * hidden * inter
    weight = 3.0 * hidden * inter * act
    activations = 2.0 * n * hidden * act + n * (INDEX_BYTES + act)
    seconds = run_on.time_s(flops, weight + activations, dtype)
    if run_on.name not in weights_on:
        seconds += min(system.link(w, run_on.name).time_s(weight) for w in weights_on)
    if run_on.name != anchor:
        seconds += system.link(anchor, run_on.name).time_s(activations)
    return seconds


@dataclass(frozen=True)
class ExpertRule:
    """Run-time rule of one MoE layer: experts with fewer than threshold_tokens pairs run on memory_side."""

    compute_side: str
    memory_side: str | None
    threshold_tokens: int  # pairs at which the compute side becomes at least as fast (tokens + 1: never)
    resident_experts: int  # experts whose weights live on the compute side (the first ones of the layer)
    shared_memory: bool

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class ExpertCoster:
    """Times of an MoE layer's experts under the rule, for every anchor device."""

    def __init__(self, spec: ModelSpec, batch: BatchDesc, system: System, memory: MemoryPlan):
        self.spec, self.batch, self.system, self.memory = spec, batch, system, memory
        dtype = batch.dtype
        self.compute = compute_side(system, dtype).name
        side = memory_side(system, dtype)
        self.memory_name = side.name if side is not None else None
        self.shared = side is not None and any(
            link.shared_memory and link.joins(self.compute, side.name) for link in system.links)

    def weights_on(self, expert: int) -> set[str]:
        if self.memory_name is None or expert < self.memory.resident_experts:
            return {self.compute} | ({self.memory_name} if self.shared else set())
        return {self.memory_name} | ({self.compute} if self.shared else set())

    def option(self, n: int, expert: int, run_on: str, anchor: str) -> float:
        spec = self.spec
        try:
            return expert_option_times(n, spec.hidden_size, spec.moe_intermediate_size, self.batch.dtype_bytes,
                                       self.system.devices[run_on], anchor, self.weights_on(expert), self.system,
                                       self.batch.dtype)
        except FxforgeError:  # no link: that option is impossible
            return math.inf

    def choices(self, counts: list[int], anchor: str) -> list[tuple[str | None, float]]:
        """(device, seconds) of every expert under the rule (None, 0 for an expert with no tokens)."""
        out = []
        for expert, n in enumerate(counts):
            if n == 0:
                out.append((None, 0.0))
                continue
            options = {d: self.option(n, expert, d, anchor) for d in {self.compute, self.memory_name} if d}
            device = min(options, key=lambda d: (options[d], d != self.compute))
            out.append((device, options[device]))
        return out

    def rule(self, anchor: str) -> ExpertRule:
        """The threshold for an expert whose weights live on the memory side (or shared)."""
        tokens = self.batch.num_tokens
        probe = self.spec.num_experts - 1 if self.memory.resident_experts < self.spec.num_experts else 0
        threshold = tokens + 1
        if self.memory_name is None:
            threshold = 1
        else:
            for n in range(1, tokens + 1):
                if self.option(n, probe, self.compute, anchor) <= self.option(n, probe, self.memory_name, anchor):
                    threshold = n
                    break
        return ExpertRule(self.compute, self.memory_name, threshold, self.memory.resident_experts, self.shared)


def unit_times(units: list[Unit], node_unit: dict[fx.Node, int], gm: fx.GraphModule, batch: BatchDesc,
               system: System, experts: ExpertCoster, counts: dict[int, list[int]],
               roles: tuple[str, ...] = ()) -> None:
    """Fill every unit's times (per device; inf off the compute side for a unit with none of `roles`,
    when given) and inputs (bytes read from other units)."""
    spec, memo = spec_of(gm), {}
    for unit in units:
        movable = not roles or any(META_KEY in n.meta and set(node_roles(n)) & set(roles) for n in unit.nodes)
        for node in unit.nodes:
            for source in node.all_input_nodes:
                v = node_unit.get(source)
                if v is not None and v != unit.order:
                    unit.inputs[v] = max(unit.inputs.get(v, 0.0), output_bytes(gm, source, batch, spec, memo))
        moe = [n for n in unit.nodes if n.target is MOE]
        for name, device in system.devices.items():
            if moe:
                layer_counts = counts[meta(moe[0]).layer]
                unit.times[name] = sum(s for _, s in experts.choices(layer_counts, name))
                unit.times[name] += sum(device.time_s(n.meta[COST_KEY].flops, n.meta[COST_KEY].bytes, batch.dtype)
                                        for n in unit.nodes if n.target is not MOE and COST_KEY in n.meta)
            elif name != experts.compute and not movable:
                unit.times[name] = math.inf
            else:
                unit.times[name] = sum(device.time_s(n.meta[COST_KEY].flops, n.meta[COST_KEY].bytes, batch.dtype)
                                       for n in unit.nodes if COST_KEY in n.meta)


# -- break-even Op/B -------------------------------------------------------------------------------

def break_even_op_per_byte(nbytes: float, moved: float, fast: DeviceSpec, other: DeviceSpec, link, dtype: str
                           ) -> float | None:
    """Op/B at which an op of `nbytes` (its Op/B varied through its FLOPs) takes as long on `other` (its
    `moved` activation bytes crossing `link`) as on `fast`; None when one device wins at every Op/B."""
    if nbytes <= 0:
        return None
    extra = link.time_s(moved) if link is not None else 0.0

    def gap(x: float) -> float:
        return other.time_s(x * nbytes, nbytes, dtype) + extra - fast.time_s(x * nbytes, nbytes, dtype)

    lo, hi = 1e-3, 1e7
    if (gap(lo) < 0) == (gap(hi) < 0):
        return None
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if (gap(mid) < 0) == (gap(lo) < 0):
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return math.sqrt(lo * hi)


# -- the pass ---------------------------------------------------------------------------------------

@register_pass("opb-placement", OpBPlacement, check=_check)
def opb_placement(gm: fx.GraphModule, config: OpBPlacement, ctx) -> PassResult:
    """Place every node on a device by modelled step time (Op/B); experts by a run-time token rule."""
    resolved = config
    if any(entry not in DEVICES for entry in config.devices):  # files: record their contents, so replay needs none
        resolved = dataclasses.replace(config, devices=(json.dumps(config.system().to_dict()),), links=())
    if config.experts is Distribution.MEASURED and not config.expert_shares:
        if not spec_of(gm).is_moe:
            raise PassConfigError("experts=measured needs an MoE model; this one is dense")
        if ctx.restoring:
            raise PassConfigError("a measured expert distribution must be recorded (expert_shares) to replay")
        resolved = dataclasses.replace(resolved, expert_shares=measure_shares(gm, ctx, config))
    plan = place(gm, resolved)
    return PassResult(gm, True, plan, config=resolved if resolved is not config else None)


def place(gm: fx.GraphModule, config: OpBPlacement, system: System | None = None) -> dict:
    """Annotate costs, place every unit, write node notes and gm.meta[PLAN_KEY]; returns the plan (JSON-able).
    `system` replaces the config's devices and links (devices built in code, e.g. scaled ones)."""
    spec, batch = spec_of(gm), config.workload()
    system = system or config.system()
    memory = memory_plan(config, spec, system)
    annotate_costs(gm, spec, batch)
    units, node_unit = build_units(gm)
    experts = ExpertCoster(spec, batch, system, memory)
    pairs = batch.num_tokens * spec.num_experts_per_tok
    shares = distribution_shares(config, spec) if spec.is_moe else []
    counts = {layer: expert_token_counts(s, pairs, batch.num_tokens) for layer, s in enumerate(shares)}
    unit_times(units, node_unit, gm, batch, system, experts, counts, config.memory_side_roles)
    solution = solve(units, system, config.max_states)
    plan = _plan(gm, units, solution, system, batch, experts, counts, memory, config)
    gm.meta[PLAN_KEY] = plan
    return plan


def _plan(gm, units, solution, system, batch, experts, counts, memory, config) -> dict:
    dtype = batch.dtype
    per_device = dict.fromkeys(system.devices, 0.0)
    rules, ops = {}, []
    compute = system.devices[experts.compute]
    other = system.devices.get(experts.memory_name) if experts.memory_name else None
    link = system.link(compute.name, other.name) if other is not None else None
    for unit, device in zip(units, solution.devices):
        for node in unit.nodes:
            note = {"device": device}
            cost = node.meta.get(COST_KEY)
            if node.target is MOE:
                layer = meta(node).layer
                rule = experts.rule(device)
                choices = experts.choices(counts[layer], device)
                for where, seconds in choices:
                    if where is not None:
                        per_device[where] += seconds
                rules[layer] = {**rule.to_dict(), "tokens_per_expert": counts[layer],
                                "expert_devices": [w for w, _ in choices]}
                note["rule"] = rule.to_dict()
            elif cost is not None:
                per_device[device] += system.devices[device].time_s(cost.flops, cost.bytes, dtype)
            if cost is not None:
                moved = 2 * output_bytes(gm, node, batch, spec_of(gm), {})
                note["op_per_byte"] = cost.op_per_byte
                note["break_even_op_per_byte"] = (break_even_op_per_byte(cost.bytes, moved, compute, other, link, dtype)
                                                  if other is not None else None)
                ops.append({"node": node.name, "role": cost.role, "layer": cost.layer, "device": device,
                            "op_per_byte": cost.op_per_byte, "break_even_op_per_byte": note["break_even_op_per_byte"]})
            meta(node).notes[PLAN_KEY] = note
    links: dict[str, dict] = {}
    for t in solution.transfers:
        entry = links.setdefault(t.link, {"bytes": 0.0, "seconds": 0.0, "transfers": 0})
        entry["bytes"] += t.nbytes
        entry["seconds"] += t.seconds
        entry["transfers"] += 1
    transfer_s = sum(t.seconds for t in solution.transfers)
    baselines = _single_device_times(units, system)
    best_single = min(baselines.values())
    return {
        "devices": {name: d.to_dict() for name, d in system.devices.items()},
        "links": [link.to_dict() for link in system.links],
        "workload": {"phase": batch.phase, "batch": batch.batch, "context": batch.context,
                     "prefill_tokens": batch.prefill_tokens, "dtype": dtype, "tokens": batch.num_tokens,
                     "experts": config.experts.value, "skew": config.skew},
        "memory": memory.to_dict(),
        "predicted_step_s": solution.total_s,
        "per_device_s": per_device,
        "transfer_s": transfer_s,
        "per_link": links,
        "single_device_s": baselines,
        "speedup_vs_best_single_device": best_single / solution.total_s if solution.total_s else 1.0,
        "ridge_op_per_byte": {name: d.ridge(dtype) for name, d in system.devices.items()},
        "placement": _role_summary(ops),
        "expert_rules": {str(k): v for k, v in rules.items()},
        "ops": ops,
    }


def _single_device_times(units: list[Unit], system: System) -> dict[str, float]:
    """Step time with every unit on one device (experts still under the rule, anchored there); a device
    that cannot run some unit is left out."""
    times = {name: sum(u.times[name] for u in units) for name in system.devices}
    return {name: t for name, t in times.items() if not math.isinf(t)}


def _role_summary(ops: list[dict]) -> dict[str, dict]:
    """Per role: nodes per device, mean Op/B and mean break-even Op/B."""
    summary: dict[str, dict] = {}
    for op in ops:
        row = summary.setdefault(op["role"], {"devices": {}, "op_per_byte": [], "break_even": []})
        row["devices"][op["device"]] = row["devices"].get(op["device"], 0) + 1
        row["op_per_byte"].append(op["op_per_byte"])
        if op["break_even_op_per_byte"] is not None:
            row["break_even"].append(op["break_even_op_per_byte"])
    return {role: {"devices": row["devices"], "op_per_byte": sum(row["op_per_byte"]) / len(row["op_per_byte"]),
                   "break_even_op_per_byte": (sum(row["break_even"]) / len(row["break_even"]) if row["break_even"]
                                              else None)}
            for role, row in summary.items()}


# -- report -----------------------------------------------------------------------------------------

def placement_markdown(plan: dict, plot_name: str | None = None) -> str:
    """The report.md section of a placement plan."""
    w = plan["workload"]
    lines = ["", "## Op/B placement (modelled)", "",
             f"Workload: {w['phase']} batch {w['batch']}, context {w['context']}"
             f"{', + ' + str(w['prefill_tokens']) + ' prefill tokens' if w['prefill_tokens'] else ''}, {w['dtype']}, "
             f"experts {w['experts']}. Devices: {', '.join(plan['devices'])}.", "",
             f"- predicted step time: {plan['predicted_step_s'] * 1e6:,.1f} us "
             f"({plan['speedup_vs_best_single_device']:.2f}x the best single device)",
             f"- transfers: {plan['transfer_s'] * 1e6:,.1f} us",
             *[f"- on {d}: {s * 1e6:,.1f} us" for d, s in plan["per_device_s"].items()],
             *[f"- all on {d}: {s * 1e6:,.1f} us" for d, s in plan["single_device_s"].items()],
             *[f"- link {name}: {v['bytes'] / 1e6:,.2f} MB in {v['transfers']} transfers, {v['seconds'] * 1e6:,.1f} us"
               for name, v in plan["per_link"].items()],
             "", "| role | nodes per device | mean Op/B | break-even Op/B |", "|---|---|---:|---:|"]
    for role, row in plan["placement"].items():
        devices = ", ".join(f"{d}: {n}" for d, n in row["devices"].items())
        be = row["break_even_op_per_byte"]
        lines.append(f"| {role} | {devices} | {row['op_per_byte']:,.1f} | {'-' if be is None else f'{be:,.1f}'} |")
    if plan["expert_rules"]:
        lines += ["", "Expert rule per MoE layer (pairs below the threshold run on the memory side):", ""]
        for layer, rule in plan["expert_rules"].items():
            lines.append(f"- layer {layer}: threshold {rule['threshold_tokens']} tokens, memory side "
                         f"{rule['memory_side']}, {rule['resident_experts']} experts resident on "
                         f"{rule['compute_side']}, "
                         f"tokens per expert {rule['tokens_per_expert']}")
    if plot_name:
        lines += ["", f"![Op/B per op against each device's ridge point]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot_placement(plan: dict, path: Path | str) -> Path:
    """Op/B of every op (x: op index in graph order, log y), coloured by device, with each device's ridge point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = dict(zip(plan["devices"], plt.get_cmap("tab10").colors))
    for device in plan["devices"]:
        points = [(i, op["op_per_byte"]) for i, op in enumerate(plan["ops"]) if op["device"] == device
                  and op["op_per_byte"] > 0]
        if points:
            ax.scatter(*zip(*points), s=10, color=colors[device], label=f"ops on {device}")
        ax.axhline(plan["ridge_op_per_byte"][device], color=colors[device], linestyle="--",
                   label=f"{device} ridge ({plan['ridge_op_per_byte'][device]:,.1f} Op/B)")
    w = plan["workload"]
    ax.set(yscale="log", xlabel="op (graph order)", ylabel="arithmetic intensity (FLOP / byte)",
           title=f"Op/B placement: {w['phase']} batch {w['batch']} context {w['context']} ({w['dtype']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["OpBPlacement", "Phase", "Distribution", "place", "solve", "Unit", "Solution", "Transfer", "build_units",
           "memory_plan", "MemoryPlan", "expert_token_counts", "ExpertRule", "ExpertCoster", "break_even_op_per_byte",
           "placement_markdown", "plot_placement", "compute_side", "memory_side", "weight_bytes", "PLAN_KEY"]
