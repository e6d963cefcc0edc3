"""fxforge.ir: specs, canonical modules, fx capture with typed metadata, verification, cost model.

Names are loaded on first use, so importing a leaf such as fxforge.ir.errors loads nothing else.
"""

from __future__ import annotations

import importlib

_LAZY = {"ModelSpec": "fxforge.ir.spec", "capture": "fxforge.ir.capture", "meta": "fxforge.ir.capture",
         "nodes_by_role": "fxforge.ir.capture", "NodeMeta": "fxforge.ir.capture", "HeadLayout": "fxforge.ir.capture",
         "verify": "fxforge.ir.verify", "IRVerificationError": "fxforge.ir.verify"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fxforge.ir' has no attribute {name!r}")


__all__ = list(_LAZY)
