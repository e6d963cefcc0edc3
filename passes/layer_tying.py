"""layer-tying: N layers become K shared blocks looped over the N depths, relaxed by per-depth LoRA.

"Relaxed Recursive Transformers" (Bae et al. 2024). Every depth keeps its `layers.{d}` module (its
KV cache stays keyed by depth, its rope buffers its own), but the parameters of tied depths are one
`nn.Parameter` shared with the block's owner depth: one tensor in memory and in weights.safetensors.
Block weights are initialised from the original layers (`stepwise`: round(linspace(0, N-1, K));
`lower`: the first K; `average`: the mean of the layers the block replaces). Vectors (norm weights,
biases) follow `norms`: tied with the block, or kept per depth.

With rank r > 0, every depth that shares its block gets a LoRA on each target projection, a
`fxforge::lora` node after the projection reading row `slot` of the stacked factors
`lora.{proj}.A` [S, r, in] and `lora.{proj}.B` [S, out, r]. `svd` initialises B_d A_d from the
truncated SVD of W_d - W_shared (B = U_r S_r, A = V_r^T), so full rank recovers the original;
`zero` draws A at random and sets B = 0 (the usual LoRA start: the tied model).

Records `gm.meta["tying"]` (ir/recursive.py TyingPlan: block and LoRA slot of every depth) and, on
each LoRA node, notes {depth, block, slot}. Requires role/layer metadata; refuses K-sorted graphs
(their layers have different channel orders) and graphs with fused projections (passes/fuse_projections.py:
tying their parts would leave the fused weights untied). Creates no tensor it must clone: rewrites=().
Run before `lower`, which binds the LoRA nodes to the Triton kernel. Restorable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from fxforge.ir.capture import META_KEY, NodeMeta, annotate, spec_of
from fxforge.ir.modules import FusedLinear
from fxforge.ir.errors import PassConfigError
from fxforge.ir.ops import LORA, REFERENCE, ROPE, ROPE_KV_WRITE, bindings
from fxforge.ir.recursive import TYING_KEY, TyingPlan, block_map, stepwise_layers
from fxforge.passes.manager import PassConfig, PassResult, register_pass

# target name -> module path inside a layer
PROJECTIONS = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class Strategy(str, enum.Enum):
    CYCLE = "cycle"
    SEQUENCE = "sequence"
    MIDDLE_CYCLE = "middle-cycle"


class Init(str, enum.Enum):
    STEPWISE = "stepwise"
    LOWER = "lower"
    AVERAGE = "average"


class Norms(str, enum.Enum):
    TIED = "tied"
    PER_DEPTH = "per-depth"


class LoRAInit(str, enum.Enum):
    SVD = "svd"
    ZERO = "zero"


@dataclass(frozen=True)
class LayerTying(PassConfig):
    """unique_layers K or loops N/K (give one); strategy, init, norms, LoRA rank / init / targets."""

    unique_layers: int = 0
    loops: int = 0
    strategy: Strategy = Strategy.CYCLE
    init: Init = Init.STEPWISE
    norms: Norms = Norms.TIED
    rank: int = 0
    lora_init: LoRAInit = LoRAInit.SVD
    targets: tuple[str, ...] = tuple(PROJECTIONS)
    seed: int = 0  # random A of lora_init=zero

    def __post_init__(self):
        super().__post_init__()
        for name in ("unique_layers", "loops", "rank", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if (self.unique_layers > 0) == (self.loops > 0):
            raise ValueError(f"give exactly one of unique_layers (K) and loops (N/K), got unique_layers="
                             f"{self.unique_layers}, loops={self.loops}")
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        targets = tuple(t.strip().removesuffix("_proj") for t in targets if t.strip())
        unknown = [t for t in targets if t not in PROJECTIONS]
        if unknown or len(set(targets)) != len(targets) or (self.rank and not targets):
            raise ValueError(f"targets={list(self.targets)!r}: unknown or repeated projection names {unknown}; "
                             f"choose some of {list(PROJECTIONS)}")
        object.__setattr__(self, "targets", targets)

    def num_unique(self, num_layers: int) -> int:
        if self.unique_layers:
            return self.unique_layers
        if num_layers % self.loops:
            raise ValueError(f"loops={self.loops} must divide the {num_layers} layers")
        return num_layers // self.loops


def _projection_shape(spec, target: str) -> tuple[int, int]:
    """(out, in) of a target projection."""
    h, q, kv, i = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size
    return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h), "down": (h, i)}[target]


def _check(config: LayerTying, spec) -> None:
    k = config.num_unique(spec.num_layers)
    block_map(config.strategy.value, spec.num_layers, k)
    if config.rank == 0:
        return
    if spec.is_moe and any(PROJECTIONS[t].startswith("mlp.") for t in config.targets):
        raise ValueError(f"targets {list(config.targets)} include MLP projections, but this MoE model's experts take "
                         "no LoRA; use targets q,k,v,o")
    for target in config.targets:
        out_features, in_features = _projection_shape(spec, target)
        if config.rank > min(out_features, in_features):
            raise ValueError(f"rank={config.rank} is larger than the {target}_proj matrix allows "
                             f"({out_features}x{in_features}: at most {min(out_features, in_features)})")


@register_pass("layer-tying", LayerTying, check=_check)
def layer_tying(gm: fx.GraphModule, config: LayerTying, ctx) -> PassResult:
    """Tie N layers into K shared blocks (one tensor each) and relax every tied depth with LoRA."""
    spec = spec_of(gm)
    if TYING_KEY in gm.meta or any((n.target is ROPE and n.args[4] is not None)
                                   or (n.target is ROPE_KV_WRITE and n.args[10] is not None) for n in gm.graph.nodes):
        raise PassConfigError("layer-tying runs once, on untied layers in their own channel order: this graph is "
                              "already tied or K-sorted (ksort and layer-tying do not combine: tied depths share "
                              "W_q and W_k, K-sorted layers each reorder their own)")
    if any(isinstance(m, FusedLinear) for m in gm.modules()):
        raise PassConfigError("layer-tying runs on unfused projections: this graph has fused q/k/v or gate/up "
                              "projections (lower's projection fusion); tie the layers before lowering")
    plan = _plan(config, spec)
    original_parameters = _count(gm)
    report = {"unique_layers": plan.unique_layers, "loops": max(map(plan.block_of_depth.count, range(plan.unique_layers))),
              "block_of_depth": list(plan.block_of_depth), "source_layers": [list(s) for s in plan.source_layers]}
    if plan.unique_layers == spec.num_layers:  # nothing is shared: the model stays as it was
        return PassResult(gm, False, {**report, "unique_parameters": original_parameters})
    originals = {(d, p): gm.get_submodule(f"layers.{d}.{PROJECTIONS[p]}").weight for d in range(spec.num_layers)
                 for p in config.targets}
    _tie(gm, plan, config, ctx.restoring)
    if config.rank:
        report.update(_relax(gm, plan, config, originals, ctx.restoring))
    gm.meta[TYING_KEY] = plan
    annotate(gm, spec)
    report.update(original_parameters=original_parameters, unique_parameters=_count(gm),
                  lora_parameters=sum(p.numel() for p in gm.get_submodule("lora").parameters()) if config.rank else 0)
    return PassResult(gm, True, report)


def _plan(config: LayerTying, spec) -> TyingPlan:
    n, k = spec.num_layers, config.num_unique(spec.num_layers)
    blocks = block_map(config.strategy.value, n, k)
    sources = []
    for block in range(k):
        depths = [d for d, b in enumerate(blocks) if b == block]
        average = len(depths) == 1 or config.init is Init.AVERAGE  # a block used once is its own layer
        sources.append(tuple(depths) if average else (_first_source(config, blocks, block, n),))
    relaxed = [d for d in range(n) if config.rank and blocks.count(blocks[d]) > 1]
    slots = tuple(relaxed.index(d) if d in relaxed else None for d in range(n))
    targets = tuple(PROJECTIONS[t].split(".")[1] for t in config.targets) if config.rank else ()
    return TyingPlan(config.strategy.value, blocks, tuple(sources), slots, config.rank, targets)


def _first_source(config: LayerTying, blocks: tuple[int, ...], block: int, n: int) -> int:
    """The original layer a stepwise / lower block starts from (middle-cycle: among the middle layers)."""
    shared = sorted({blocks[d] for d in range(n) if blocks.count(blocks[d]) > 1})
    first, last = (1, n - 2) if config.strategy is Strategy.MIDDLE_CYCLE else (0, n - 1)
    index = shared.index(block)
    if config.init is Init.LOWER:
        return first + index
    return stepwise_layers(first, last, len(shared))[index]


# -- tying --------------------------------------------------------------------------------------------

def _tie(gm: fx.GraphModule, plan: TyingPlan, config: LayerTying, restoring: bool) -> None:
    """Point every tied parameter of every depth at its block's one shared Parameter."""
    layers = [dict(gm.get_submodule(f"layers.{d}").named_parameters()) for d in range(plan.num_layers)]
    per_depth_vectors = config.norms is Norms.PER_DEPTH
    for block in range(plan.unique_layers):
        depths, sources = plan.depths_of(block), plan.source_layers[block]
        for name, param in layers[depths[0]].items():
            if per_depth_vectors and param.dim() == 1:
                continue
            shared = _shared(name, [layers[s][name] for s in sources], restoring)
            for depth in depths:
                module_path, _, attr = f"layers.{depth}.{name}".rpartition(".")
                setattr(gm.get_submodule(module_path), attr, shared)


def _shared(name: str, sources: list[nn.Parameter], restoring: bool) -> nn.Parameter:
    """The block's weight: the one source Parameter itself (no copy), or the mean of several."""
    if len(sources) == 1 or restoring:  # restoring: the saved weights overwrite the values
        return sources[0]
    mean = torch.stack([s.detach().float() for s in sources]).mean(dim=0)
    return nn.Parameter(mean.to(sources[0].dtype), requires_grad=sources[0].requires_grad)


def _count(gm: fx.GraphModule) -> int:
    """Parameters stored once each (a tied tensor counts once)."""
    return sum(p.numel() for p in gm.parameters())


# -- relaxation -----------------------------------------------------------------------------------------

def _relax(gm: fx.GraphModule, plan: TyingPlan, config: LayerTying, originals: dict, restoring: bool) -> dict:
    """Stacked LoRA factors per target, initialised per relaxed depth, and one lora node per projection."""
    lora = nn.Module()
    impl = bindings(gm).get("attention", REFERENCE)
    impl = impl if impl != "mixed" else REFERENCE
    relaxed = [d for d, s in enumerate(plan.lora_slot_of_depth) if s is not None]
    energy = []
    for target in config.targets:
        module_name = PROJECTIONS[target].split(".")[1]
        shared = [gm.get_submodule(f"layers.{d}.{PROJECTIONS[target]}").weight for d in relaxed]
        stack = nn.Module()
        a, b, kept = _stacked_factors([originals[(d, target)] for d in relaxed], shared, config, restoring, relaxed)
        stack.A, stack.B = nn.Parameter(a), nn.Parameter(b)
        lora.add_module(module_name, stack)
        energy += kept
    gm.add_module("lora", lora)
    _insert_lora_nodes(gm, plan, config, impl)
    return {"lora_rank": config.rank, "lora_init": config.lora_init.value, "lora_targets": list(plan.lora_targets),
            "relaxed_depths": len(relaxed), **({"svd_energy_kept": round(sum(energy) / len(energy), 4)} if energy else {})}


def _stacked_factors(originals: list, shared: list, config: LayerTying, restoring: bool, depths: list[int]):
    """(A [S, r, in], B [S, out, r], per depth the fraction of ||W_d - W_shared||_F^2 the rank keeps;
    [] without an SVD) for the relaxed depths, their SVDs computed as one batch."""
    (out_features, in_features), r = originals[0].shape, config.rank
    like = dict(dtype=originals[0].dtype, device=originals[0].device)
    zeros_b = torch.zeros(len(originals), out_features, r, **like)
    if restoring:  # the saved weights overwrite the values
        return torch.zeros(len(originals), r, in_features, **like), zeros_b, []
    if config.lora_init is LoRAInit.ZERO:  # random A, zero B: the product starts at zero
        gens = [torch.Generator().manual_seed(config.seed * 100_003 + d) for d in depths]
        a = torch.stack([torch.randn(r, in_features, generator=g) for g in gens]) / in_features ** 0.5
        return a.to(**like), zeros_b, []
    delta = torch.stack([o.detach().float() - s.detach().float() for o, s in zip(originals, shared)])
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    power = sigma * sigma
    total = power.sum(dim=1)
    kept = torch.where(total > 0, power[:, :r].sum(dim=1) / total.clamp_min(1e-30), torch.ones_like(total))
    return (vh[:, :r].to(like["dtype"]).contiguous(), (u[:, :, :r] * sigma[:, None, :r]).to(like["dtype"]).contiguous(),
            kept.tolist())


def _insert_lora_nodes(gm: fx.GraphModule, plan: TyingPlan, config: LayerTying, impl: str) -> None:
    """After each target projection of each relaxed depth: lora(x, proj(x), A, B, None, slot, 0)."""
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    getters = {}
    with gm.graph.inserting_before(first):
        for module_name in plan.lora_targets:
            getters[module_name] = (gm.graph.get_attr(f"lora.{module_name}.A"), gm.graph.get_attr(f"lora.{module_name}.B"))
    projections = {f"layers.{d}.{PROJECTIONS[t]}": (d, PROJECTIONS[t].split(".")[1])
                   for d, slot in enumerate(plan.lora_slot_of_depth) if slot is not None for t in config.targets}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in projections:
            continue
        depth, module_name = projections[node.target]
        slot = plan.lora_slot_of_depth[depth]
        a, b = getters[module_name]
        with gm.graph.inserting_after(node):
            lora = gm.graph.call_function(LORA, (node.args[0], node, a, b, None, slot, 0, impl))
        node.replace_all_uses_with(lora, delete_user_cb=lambda user: user is not lora)
        lora.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
        lora.meta[META_KEY] = NodeMeta(role="lora", notes={
            "layer_tying": {"depth": depth, "block": plan.block_of_depth[depth], "slot": slot}})
    gm.graph.lint()
