"""Layer-tied (recursive) graphs: which shared block and which LoRA slot every depth uses.

A layer-tying pass turns N layers into K shared blocks looped over the N depths. The graph keeps one
`layers.{d}` module per depth (so each depth keeps its own KV cache, rope buffers and, if asked, its
own norms), whose tied parameters are the same `nn.Parameter` objects as the block owner's; per-depth
LoRA factors are stacked, one row (slot) per relaxed depth, in `lora.{proj}.A` [S, r, in] and
`lora.{proj}.B` [S, out, r]. The pass records the mapping as `gm.meta["tying"]`, a `TyingPlan`.

Strategies (Bae et al. 2024):
  cycle         depth d uses block d mod K (N/K loops of the K-block stack)
  sequence      depth d uses block d // (N/K) (each block repeated N/K times in a row)
  middle-cycle  the first and the last layer stay unique; the N-2 middle depths cycle over K-2 blocks
"""

from __future__ import annotations

import functools
import operator
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx

from fxforge.kernels.kv_cache import allocate_kv_pair

TYING_KEY = "tying"
STRATEGIES = ("cycle", "sequence", "middle-cycle")


@dataclass(frozen=True)
class TyingPlan:
    """The depth -> block and depth -> LoRA slot maps of a tied graph (JSON-able data)."""

    strategy: str
    block_of_depth: tuple[int, ...]  # shared block each depth runs
    source_layers: tuple[tuple[int, ...], ...]  # per block: the original layers its weights came from
    lora_slot_of_depth: tuple[int | None, ...]  # row of the stacked LoRA factors; None: no LoRA
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()  # projection names with LoRA ("q_proj", ..., "down_proj")

    @property
    def num_layers(self) -> int:
        return len(self.block_of_depth)

    @property
    def unique_layers(self) -> int:
        return len(self.source_layers)

    @property
    def num_slots(self) -> int:
        return sum(s is not None for s in self.lora_slot_of_depth)

    def depths_of(self, block: int) -> list[int]:
        return [d for d, b in enumerate(self.block_of_depth) if b == block]

    def owner(self, block: int) -> int:
        """The first depth that runs `block`: its modules' parameter names store the shared weights."""
        return self.block_of_depth.index(block)

    def loop_layout(self) -> tuple[int, int]:
        """(blocks per loop K, loops L) of a cycle plan, where depth j*K + b runs block b and LoRA slot
        j*K + b (or no LoRA at any depth); depth-wise batching needs this shape."""
        k = self.unique_layers
        slots = self.lora_slot_of_depth
        if self.strategy != "cycle" or not (all(s is None for s in slots) or list(slots) == list(range(len(slots)))):
            raise ValueError(f"depth-wise batching needs strategy 'cycle' (one loop of the {k}-block stack "
                             f"per iteration); this graph was tied with {self.strategy!r}")
        return k, self.num_layers // k

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TyingPlan":
        return cls(values["strategy"], tuple(values["block_of_depth"]), tuple(tuple(s) for s in values["source_layers"]),
                   tuple(values["lora_slot_of_depth"]), values["lora_rank"], tuple(values["lora_targets"]))


def block_map(strategy: str, num_layers: int, unique_layers: int) -> tuple[int, ...]:
    """Block of every depth; raises ValueError when K does not fit the depth for the strategy."""
    n, k = num_layers, unique_layers
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    if not 1 <= k <= n:
        raise ValueError(f"unique layers K={k} must be in 1..{n} (the model's depth)")
    if strategy == "middle-cycle":
        if k == n:
            return tuple(range(n))
        if k < 3 or (n - 2) % (k - 2):
            raise ValueError(f"middle-cycle keeps the first and last of the {n} layers unique, so K-2 must divide "
                             f"N-2 = {n - 2}; K={k} gives K-2 = {k - 2}")
        return (0,) + tuple(1 + (d - 1) % (k - 2) for d in range(1, n - 1)) + (k - 1,)
    if n % k:
        raise ValueError(f"K={k} unique layers must divide the {n} layers for strategy {strategy!r}")
    loops = n // k
    return tuple(d % k if strategy == "cycle" else d // loops for d in range(n))


def stepwise_layers(first: int, last: int, count: int) -> list[int]:
    """round(linspace(first, last, count)): the source layers of Stepwise initialisation."""
    return [int(v) for v in torch.linspace(first, last, count, dtype=torch.float64).round().tolist()]


def tying_plan(module) -> TyingPlan | None:
    """The TyingPlan of a tied GraphModule (or of a Model over one); None for an untied model."""
    module = getattr(module, "module", module)
    return getattr(module, "meta", {}).get(TYING_KEY)


# -- the depth-wise form of a tied cycle graph ------------------------------------------------------------

_META_INPUTS = ("positions", "slot_mapping", "page_table", "query_start", "seq_lens")


class DepthwiseModel:
    """A tied cycle graph split for depth-wise batching: `embed`, one `loop` of the K-block stack in
    which every row carries its own loop iteration, and `head`.

    `loop` is the graph's own nodes of depths 0..K-1 (whatever passes and lowering made of them), with
    the KV cache of block b shared by all loops (`new_kv_cache`: L * pages_per_loop pages; loop j owns
    pages [j * pages_per_loop, (j + 1) * pages_per_loop), so the caller offsets slots and page tables
    by loop) and every LoRA node reading slot b + K * j for the rows of loop j (`loop_starts` [L+1]
    bounds them; rows are sorted by loop). Depth j*K + b of the unrolled graph computes what block b
    computes for a row of loop j, so both forms give the same logits.
    """

    def __init__(self, model):
        self.model = model
        plan = tying_plan(model)
        if plan is None:
            raise ValueError("depth-wise batching needs a layer-tied model (pass layer-tying with strategy cycle)")
        self.blocks, self.loops = plan.loop_layout()
        self.embed, self.loop_body, self.head = split_loop(model.module, self.blocks)

    def new_kv_cache(self, pages_per_loop: int, page_size: int, device=None,
                     v_layout: str = "rows") -> list[torch.Tensor]:
        """4 tensors per block (kv_cache order of depths 0..K-1), each of loops * pages_per_loop pages
        (v_layout: as Model.new_kv_cache)."""
        v_layout = self.model.cache_v_layout(v_layout, device)
        formats = self.model.kv_formats()
        for depth, fmt in enumerate(formats):
            if fmt != formats[depth % self.blocks]:
                raise ValueError(f"depth {depth} caches K/V as {fmt} but depth {depth % self.blocks}, which runs the same "
                                 f"block, as {formats[depth % self.blocks]}; depth-wise batching needs one format per block")
        spec, cache = self.model.spec, []
        for k_format, v_format in formats[: self.blocks]:
            cache += allocate_kv_pair(self.loops * pages_per_loop, page_size, spec.num_kv_heads, spec.head_dim,
                                      k_format, v_format, device or self.model.device, v_layout)
        return cache

    def loop(self, hidden, batch, loop_starts: torch.Tensor, kv_cache: list[torch.Tensor]) -> torch.Tensor:
        """hidden [T, H] of rows sorted by loop, batch metadata already offset by loop -> hidden [T, H]."""
        return self.loop_body(hidden, batch.positions, batch.slot_mapping, batch.page_table, batch.query_start,
                              batch.seq_lens, loop_starts, *kv_cache)


def split_loop(gm: fx.GraphModule, blocks: int) -> tuple[fx.GraphModule, fx.GraphModule, fx.GraphModule]:
    """(embed: input_ids -> hidden, loop: one pass of depths 0..blocks-1 with per-row loops, head:
    (hidden, logits_indices) -> logits), all over gm's own modules and tensors."""
    from fxforge.ir.capture import META_KEY

    layer = {n: n.meta[META_KEY].layer if META_KEY in n.meta else None for n in gm.graph.nodes}
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    body = [n for n in gm.graph.nodes if layer[n] is not None and layer[n] < blocks]
    body_set = set(body)
    hidden_in = _single({i for n in body for i in n.all_input_nodes if i not in body_set and i.op == "call_module"},
                        "hidden state entering depth 0")
    hidden_out = _single({n for n in body for u in n.users if u not in body_set}, f"hidden state leaving depth {blocks - 1}")
    last_layer = max(v for v in layer.values() if v is not None)
    final = _single({n for n in gm.graph.nodes if layer[n] == last_layer for u in n.users if layer[u] is None},
                    "hidden state leaving the last depth")
    embed = _extract(gm, _ancestors(hidden_in), [(placeholders["input_ids"], "input_ids")], hidden_in)
    tail = [n for n in _descendants(final) if n.op != "output"]
    head = _extract(gm, tail, [(final, "hidden"), (placeholders["logits_indices"], "logits_indices")],
                    next(n for n in gm.graph.nodes if n.op == "output").args[0])
    kv = {n.args[1]: n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem
          and n.args[0] is placeholders["kv_cache"]}
    inputs = ([(hidden_in, "hidden")] + [(placeholders[name], name) for name in _META_INPUTS] + [(None, "loop_starts")]
              + [(kv[i], f"kv_{i}") for i in range(4 * blocks)])
    loop = _extract(gm, body, inputs, hidden_out, patch=functools.partial(_loop_lora, blocks))
    return embed, loop, head


def _loop_lora(blocks: int, node: fx.Node, env: dict) -> None:
    """A copied LoRA node reads loop_starts and steps K slots per loop."""
    from fxforge.ir.ops import LORA

    if node.target is LORA:
        node.update_arg(4, env["loop_starts"])
        node.update_arg(6, blocks)


def _extract(gm: fx.GraphModule, nodes, inputs: list[tuple], output: fx.Node, patch=None) -> fx.GraphModule:
    """A GraphModule over gm's modules with placeholders `inputs` [(gm node or None, name)] in order,
    `nodes` copied in graph order (get_attr inputs re-read), returning the copy of `output`;
    patch(copy, placeholders by name) may rewrite each copied node."""
    graph, env, named = fx.Graph(), {}, {}
    for source, name in inputs:
        named[name] = graph.placeholder(name)
        if source is not None:
            env[source] = named[name]
    for node in sorted(nodes, key=_position(gm)):
        for source in node.all_input_nodes:
            if source not in env:
                if source.op != "get_attr":
                    raise ValueError(f"node {node.name} reads {source.name}, which is not an input of this part")
                env[source] = graph.get_attr(source.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
        if patch is not None:
            patch(env[node], named)
    graph.output(env[output])
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def _position(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen and n.op != "placeholder":
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return list(seen)


def _descendants(node: fx.Node) -> list[fx.Node]:
    seen, stack = set(), list(node.users)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return list(seen)


def _single(nodes: set, what: str) -> fx.Node:
    if len(nodes) != 1:
        raise ValueError(f"cannot split the graph into loops: the {what} should be one node, found "
                         f"{sorted(n.name for n in nodes)}")
    return next(iter(nodes))
