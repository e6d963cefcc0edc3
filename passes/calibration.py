"""Calibration windows for passes that choose on data (ksort metric=calibrated, kv-mix).

Texts are tokenized with the model's tokenizer and cut into windows of `context` tokens (enough to
score `max_tokens`); token id lists are taken as windows as they are.
"""

from __future__ import annotations

import torch

from fxforge.ir.errors import PassConfigError
from fxforge.ir.tokenizer import token_windows


def calibration_windows(ctx, context: int, max_tokens: int, what: str) -> torch.Tensor:
    """[windows, context] token ids from ctx.calib; `what` names the pass setting that needs them."""
    if not ctx.calib:
        raise PassConfigError(f"{what} needs calibration data: pass calib=[texts or token id lists] "
                              "to fxforge.optimize (the CLI uses the calibration split of --data)")
    if all(isinstance(c, str) for c in ctx.calib):
        if ctx.model is None or ctx.model.tokenizer is None:
            raise PassConfigError("calibration texts need a tokenizer; this model has none: pass token id lists")
        return token_windows(ctx.model.tokenizer, ctx.calib, context, max_tokens)
    lengths = {len(c) for c in ctx.calib}
    if len(lengths) != 1:
        raise PassConfigError(f"calibration token id lists must all have one length, got lengths {sorted(lengths)}")
    return torch.tensor([list(c) for c in ctx.calib])
