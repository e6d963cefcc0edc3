"""Paged KV accounting: which fixed-size pages of the cache each sequence owns.

The page pool only counts; the KV tensors live in the model runner, in whatever format the cache
uses (fp16, BFP12, ...), so `bytes_per_token` is given by the caller. The pool's size and page size
are those of the `EngineConfig` it is given. A page holds `page_size` consecutive positions of one
sequence; slot `page_id * page_size + offset` is where the runner writes position
`page_index * page_size + offset`. Reference counts let several sequences share full pages of a
common prefix (`fork`); a page returns to the free list when its last owner lets go.

A page id indexes the same page of every layer's cache tensor, so a page holds its positions' KV
for all layers. A skip-decode model's pool (runtime/skip_pages.py LayeredPagePool) adds pages per
group of skippable layers, held only for the positions those layers run.
"""

from __future__ import annotations

from collections import deque

from .config import EngineConfig
from .sequence import Sequence


class PagePool:
    """The `config.num_pages` KV pages of `config.page_size` positions, and who holds each."""

    def __init__(self, config: EngineConfig, bytes_per_token: int = 0):
        if not isinstance(bytes_per_token, int) or isinstance(bytes_per_token, bool) or bytes_per_token < 0:
            raise ValueError(f"PagePool bytes_per_token must be an int >= 0, got {bytes_per_token!r}")
        self.config = config
        self.bytes_per_token = bytes_per_token
        self._free_pages: deque[int] = deque(range(config.num_pages))
        self._ref_counts = [0] * config.num_pages

    @property
    def num_pages(self) -> int:
        return self.config.num_pages

    @property
    def page_size(self) -> int:
        return self.config.page_size

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free_pages)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def ref_count(self, page_id: int) -> int:
        return self._ref_counts[page_id]

    def kv_bytes_in_use(self) -> int:
        return self.num_used_pages * self.page_size * self.bytes_per_token

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold `num_tokens` positions."""
        return -(-num_tokens // self.page_size)

    def num_pages_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Pages `seq` must gain so that num_computed_tokens + num_new_tokens positions fit."""
        if not isinstance(num_new_tokens, int) or num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be an int >= 0, got {num_new_tokens!r}")
        return max(0, self.pages_for(seq.num_computed_tokens + num_new_tokens) - len(seq.page_ids))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_pages_needed(seq, num_new_tokens) <= len(self._free_pages)

    def can_allocate_all(self, requests: list[tuple[Sequence, int]]) -> bool:
        """Whether every (sequence, new tokens) request fits at once (a decode window's pages)."""
        return sum(self.num_pages_needed(seq, n) for seq, n in requests) <= len(self._free_pages)

    def fits(self, seq: Sequence, max_slots: int) -> bool:
        """Whether `seq` at `max_slots` cached positions fits in the whole pool (the scheduler admits no
        request that could never run)."""
        return self.pages_for(max_slots) <= self.num_pages

    def max_new_tokens(self, seq: Sequence) -> int:
        """The most new tokens `seq` could be given now: its free slots plus every free page."""
        return (len(seq.page_ids) + len(self._free_pages)) * self.page_size - seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq.page_ids` so that num_computed_tokens + num_new_tokens positions fit."""
        needed = self.num_pages_needed(seq, num_new_tokens)
        if needed > len(self._free_pages):
            raise RuntimeError(
                f"cannot allocate {needed} KV pages for sequence {seq.seq_id} ({num_new_tokens} new tokens after "
                f"{seq.num_computed_tokens} computed, page_size {self.page_size}): only {len(self._free_pages)} of "
                f"{self.num_pages} pages are free; check can_allocate() first"
            )
        for _ in range(needed):
            page = self._free_pages.popleft()
            self._ref_counts[page] = 1
            seq.page_ids.append(page)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its pages; pages nobody else holds return to the free list."""
        for page in seq.page_ids:
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                self._free_pages.append(page)
        seq.page_ids.clear()

    def fork(self, seq: Sequence, child: Sequence) -> None:
        """Let `child` share the full pages of `seq`'s computed prefix (prefix sharing).

        Only full pages are shared, so neither sequence ever writes into a page the other reads:
        the child's KV is computed from the first position after the shared pages on. At least the
        child's last token stays uncomputed, so its next step still yields logits. The child must
        hold no pages and its tokens must start with the shared prefix.
        """
        if child.page_ids:
            raise ValueError(f"fork target sequence {child.seq_id} already holds {len(child.page_ids)} pages")
        num_shared_pages = min(seq.num_computed_tokens, child.num_tokens - 1) // self.page_size
        num_shared_tokens = num_shared_pages * self.page_size
        if child.token_slice(0, num_shared_tokens) != seq.token_slice(0, num_shared_tokens):
            raise ValueError(
                f"sequence {child.seq_id} does not start with the {num_shared_tokens}-token prefix of "
                f"sequence {seq.seq_id} held in its {num_shared_pages} full pages"
            )
        shared = seq.page_ids[:num_shared_pages]
        for page in shared:
            self._ref_counts[page] += 1
        child.page_ids.extend(shared)
        child.num_computed_tokens = num_shared_tokens

    def slot(self, seq: Sequence, position: int) -> int:
        """Cache slot of `seq`'s token at `position`."""
        page_index, offset = divmod(position, self.page_size)
        if position < 0 or page_index >= len(seq.page_ids):
            raise IndexError(
                f"position {position} of sequence {seq.seq_id} is outside its "
                f"{len(seq.page_ids)} pages of {self.page_size}"
            )
        return seq.page_ids[page_index] * self.page_size + offset

    def slots(self, seq: Sequence, start: int, stop: int) -> list[int]:
        """Cache slots of positions [start, stop) of `seq`."""
        if stop > start:
            self.slot(seq, start)
            self.slot(seq, stop - 1)
        page_size, pages = self.page_size, seq.page_ids
        return [pages[pos // page_size] * page_size + pos % page_size for pos in range(start, stop)]
