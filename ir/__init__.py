"""fxforge.ir: specs, canonical modules, fx capture with typed metadata, verification, cost model."""

from fxforge.ir.capture import HeadLayout, NodeMeta, capture, meta, nodes_by_role
from fxforge.ir.spec import ModelSpec
from fxforge.ir.verify import IRVerificationError, verify

__all__ = ["ModelSpec", "capture", "verify", "meta", "nodes_by_role", "NodeMeta", "HeadLayout",
           "IRVerificationError"]
