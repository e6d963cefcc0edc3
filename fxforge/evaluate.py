"""Perplexity on real text, for a model and (optionally) its original on the same tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from rich.progress import Progress

from fxforge.errors import FxforgeError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int
    windows: int
    context: int

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "tokens": self.tokens, "windows": self.windows,
                "context": self.context}


def token_windows(tokenizer, texts: list[str], context: int, max_tokens: int | None) -> torch.Tensor:
    """Documents joined by blank lines, tokenized once, cut into non-overlapping windows [N, context].

    Each window scores context-1 tokens; enough windows are taken to score max_tokens tokens.
    """
    if context < 2:
        raise FxforgeError(f"context={context} must be at least 2 tokens")
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text + "\n\n", add_special_tokens=False)
        if max_tokens and len(ids) >= (max_tokens // (context - 1) + 1) * context:
            break
    windows = len(ids) // context
    if max_tokens:
        windows = min(windows, math.ceil(max_tokens / (context - 1)))
    if windows == 0:
        raise FxforgeError(f"the text has {len(ids)} tokens, fewer than one window of context={context}")
    return torch.tensor(ids[: windows * context]).view(windows, context)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, show_progress: bool = True,
               label: str = "perplexity") -> PerplexityResult:
    """exp(mean next-token NLL) over every window, batched."""
    nll, count = 0.0, 0
    with Progress(transient=True, disable=not show_progress) as progress:
        task = progress.add_task(label, total=windows.shape[0])
        for start in range(0, windows.shape[0], batch_size):
            chunk = windows[start:start + batch_size]
            logits = model.logits(chunk)
            targets = chunk[:, 1:].to(logits.device)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
            count += targets.numel()
            progress.advance(task, chunk.shape[0])
    return PerplexityResult(math.exp(nll / count), nll, count, windows.shape[0], windows.shape[1])
