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

from dataclasses import asdict, dataclass

import torch

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
