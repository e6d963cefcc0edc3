"""Requests as the runtime sees them: sampling parameters and a growing token sequence.

The bottom layer of the runtime: it imports nothing from the runtime and no torch. A `Sequence`
holds its tokens, how many of them already have KV in the cache (`num_computed_tokens`) and the
ids of the KV pages it owns; the page pool fills `page_ids`, the scheduler moves it between
WAITING, RUNNING and FINISHED.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

_seq_ids = itertools.count()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token and when to stop.

    temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off. A `seed` makes
    the sequence's tokens reproducible whatever else shares its batch. Generation stops at the
    model's EOS token (unless `ignore_eos`), at any of `stop_token_ids`, after `max_new_tokens`
    tokens, or at `EngineConfig.max_model_len`.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"SamplingParams.top_p must be a number in (0, 1] (1 = off), got {p!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"SamplingParams.seed must be None or an int in [0, 2**64), got {self.seed!r}")
        stop = self.stop_token_ids
        if isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable):
            raise ValueError(f"SamplingParams.stop_token_ids must be a tuple of ints >= 0, got {stop!r}")
        stop = tuple(stop)
        if not all(_is_int(tok) and tok >= 0 for tok in stop):
            raise ValueError(f"SamplingParams.stop_token_ids must be a tuple of ints >= 0, got {stop!r}")
        object.__setattr__(self, "stop_token_ids", stop)  # accept a list, store a tuple
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request: prompt tokens followed by the tokens generated so far.

    Tokens live in one list (prompt first) so a chunk of positions is a slice. `num_computed_tokens`
    counts the leading tokens whose KV is in the cache; `page_ids` are the KV pages holding them,
    in position order, owned through the page pool. `arrival` is the order in which the
    scheduler accepted the sequence (set by `Scheduler.add`); FCFS and preemption use it.
    """

    __slots__ = (
        "seq_id", "sampling_params", "status", "num_computed_tokens", "page_ids",
        "finish_reason", "arrival", "_token_ids", "_num_prompt_tokens",
    )

    def __init__(self, prompt_token_ids: Iterable[int], sampling_params: SamplingParams | None = None):
        tokens = list(prompt_token_ids)
        bad = next((tok for tok in tokens if not _is_int(tok) or tok < 0), None)
        if bad is not None:
            raise ValueError(f"prompt token ids must be ints >= 0, got {bad!r}")
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        self.seq_id: int = next(_seq_ids)
        self.sampling_params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.page_ids: list[int] = []
        self.finish_reason: str | None = None
        self.arrival: int = -1
        self._token_ids = tokens
        self._num_prompt_tokens = len(tokens)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.name}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, pages={len(self.page_ids)})")

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self._token_ids) - self._num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens that still need their KV computed (the last sampled token, after a prefill: 1)."""
        return len(self._token_ids) - self.num_computed_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._token_ids[: self._num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self._token_ids[self._num_prompt_tokens :]

    @property
    def all_token_ids(self) -> list[int]:
        return list(self._token_ids)

    @property
    def last_token_id(self) -> int:
        return self._token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token lacks KV: the next step is a one-token decode."""
        return self.num_uncomputed == 1 and self.num_output_tokens > 0

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop)."""
        return self._token_ids[start:stop]

    def append_token(self, token_id: int) -> None:
        if self.status is SequenceStatus.FINISHED:
            raise RuntimeError(f"cannot append to finished sequence {self.seq_id} ({self.finish_reason})")
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"token id must be an int >= 0, got {token_id!r}")
        self._token_ids.append(token_id)

    def extend_tokens(self, token_ids: list[int]) -> None:
        """Append several sampled tokens (already checked to be ints >= 0)."""
        if self.status is SequenceStatus.FINISHED:
            raise RuntimeError(f"cannot append to finished sequence {self.seq_id} ({self.finish_reason})")
        self._token_ids.extend(token_ids)

    def stop_reason(self, eos_token_id: int | None, max_model_len: int) -> str | None:
        """Why generation must stop after the last appended token: "stop", "length" or None."""
        if self.num_output_tokens == 0:
            return None
        params = self.sampling_params
        last = self._token_ids[-1]
        if (last == eos_token_id and not params.ignore_eos) or last in params.stop_token_ids:
            return "stop"
        if self.num_output_tokens >= params.max_new_tokens or self.num_tokens >= max_model_len:
            return "length"
        return None

    def finish(self, reason: str) -> None:
        if self.page_ids:
            raise RuntimeError(f"sequence {self.seq_id} still holds {len(self.page_ids)} KV pages: free them first")
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: keep every token, forget the KV; the sequence waits again."""
        if self.page_ids:
            raise RuntimeError(f"sequence {self.seq_id} still holds {len(self.page_ids)} KV pages: free them first")
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
