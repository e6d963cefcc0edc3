"""KV pages per layer group for SkipDecode: layers a sequence will never run again get no pages.

Under a SkipDecode schedule a skippable layer l (between the warm-up layers and the top min layers)
holds KV only for a sequence's prompt and its first T_l generated tokens, T_l being how many
generated positions run l (a(t) only falls, so they are the first ones). `LayeredPagePool` is the
scheduler's page pool (same interface as PagePool, whose pages hold the always-run layers) plus one
pool per group of skippable layers with the same T: a sequence holds group pages only for positions
< prompt length + T, so a group's pool can be smaller than the main one (`EngineConfig.
skip_kv_fraction` of it). Every check the scheduler makes (admission, room for new tokens, decode
windows, the longest request) covers every group, so a full group pool preempts like a full main
pool. Counting only: the model runner owns the tensors (runtime/skip_runner.py sizes each layer's
cache to its group's pool). Prefix sharing (`fork`) is not supported here.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .config import EngineConfig
from .page_pool import PagePool
from .sequence import Sequence


@dataclass
class LayerGroup:
    """Skippable layers that hold KV for the same positions: each sequence's first prompt + `horizon`."""

    layers: tuple[int, ...]
    horizon: int  # generated positions whose tokens run these layers
    num_pages: int
    free_pages: deque = field(default_factory=deque)
    ref_counts: list = field(default_factory=list)

    def __post_init__(self):
        self.free_pages = deque(range(self.num_pages))
        self.ref_counts = [0] * self.num_pages


def layer_groups(num_layers: int, warmup: int, top_layers: tuple[int, ...], num_pages: int,
                 fraction: float) -> list[LayerGroup]:
    """Groups of the skippable layers by horizon, each with max(1, ceil(fraction * num_pages)) pages."""
    horizons: dict[int, list[int]] = {}
    for layer in range(warmup, num_layers - min(top_layers)):
        horizons.setdefault(sum(a >= num_layers - layer for a in top_layers), []).append(layer)
    pages = max(1, math.ceil(fraction * num_pages))
    return [LayerGroup(tuple(layers), horizon, pages) for horizon, layers in sorted(horizons.items())]


class LayeredPagePool(PagePool):
    """PagePool of the always-run layers plus one page pool per group of skippable layers."""

    def __init__(self, config: EngineConfig, bytes_per_token: int, groups: list[LayerGroup]):
        super().__init__(config, bytes_per_token)
        self.groups = groups
        self._group_pages: dict[int, list[list[int]]] = {}  # seq_id -> its pages in each group

    def group_pages(self, seq: Sequence, group: int) -> list[int]:
        return self._group_pages.get(seq.seq_id, [[]] * len(self.groups))[group]

    def group_used_pages(self) -> list[int]:
        return [g.num_pages - len(g.free_pages) for g in self.groups]

    def _limit(self, seq: Sequence, group: LayerGroup) -> int:
        """Positions of seq whose KV the group's layers hold."""
        return seq.num_prompt_tokens + group.horizon

    def _group_needed(self, seq: Sequence, num_new_tokens: int, index: int) -> int:
        group = self.groups[index]
        tokens = min(seq.num_computed_tokens + num_new_tokens, self._limit(seq, group))
        return max(0, self.pages_for(tokens) - len(self.group_pages(seq, index)))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return super().can_allocate(seq, num_new_tokens) and all(
            self._group_needed(seq, num_new_tokens, i) <= len(g.free_pages) for i, g in enumerate(self.groups))

    def can_allocate_all(self, requests: list[tuple[Sequence, int]]) -> bool:
        if not super().can_allocate_all(requests):
            return False
        return all(sum(self._group_needed(s, n, i) for s, n in requests) <= len(g.free_pages)
                   for i, g in enumerate(self.groups))

    def fits(self, seq: Sequence, max_slots: int) -> bool:
        return super().fits(seq, max_slots) and all(
            self.pages_for(min(max_slots, self._limit(seq, g))) <= g.num_pages for g in self.groups)

    def max_new_tokens(self, seq: Sequence) -> int:
        most = super().max_new_tokens(seq)
        for i, group in enumerate(self.groups):
            room = (len(self.group_pages(seq, i)) + len(group.free_pages)) * self.page_size
            if room < self._limit(seq, group):  # the group's pages run out before its horizon
                most = min(most, room - seq.num_computed_tokens)
        return max(0, most)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        if not self.can_allocate(seq, num_new_tokens):
            raise RuntimeError(f"cannot allocate KV pages for sequence {seq.seq_id} ({num_new_tokens} new tokens after "
                               f"{seq.num_computed_tokens} computed): a layer group's pool is full (free: main "
                               f"{self.num_free_pages}, groups {[len(g.free_pages) for g in self.groups]}); "
                               "check can_allocate() first")
        needed = [self._group_needed(seq, num_new_tokens, i) for i in range(len(self.groups))]
        super().allocate(seq, num_new_tokens)
        held = self._group_pages.setdefault(seq.seq_id, [[] for _ in self.groups])
        for group, pages, count in zip(self.groups, held, needed):
            for _ in range(count):
                page = group.free_pages.popleft()
                group.ref_counts[page] = 1
                pages.append(page)

    def free(self, seq: Sequence) -> None:
        super().free(seq)
        for group, pages in zip(self.groups, self._group_pages.pop(seq.seq_id, [])):
            for page in pages:
                group.ref_counts[page] -= 1
                if group.ref_counts[page] == 0:
                    group.free_pages.append(page)

    def fork(self, seq: Sequence, child: Sequence) -> None:
        raise ValueError("prefix sharing (fork) is not supported by the per-layer-group pages of a skip-decode model")
