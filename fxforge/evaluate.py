"""Perplexity on real text, for a model and (optionally) its original on the same tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from rich.progress import Progress



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
