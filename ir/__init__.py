"""fxforge.ir: specs, canonical modules, fx capture with typed metadata, verification, cost model.

(Eager on purpose: `capture` and `verify` are both functions here and submodules, and a lazy
attribute would be shadowed by the submodule once it is imported. Importing fxforge.ir.errors, the
leaf every layer may import, therefore loads the IR; the kernels never do.)
"""

from fxforge.ir.capture import HeadLayout, NodeMeta, capture, meta, nodes_by_role
from fxforge.ir.spec import ModelSpec
from fxforge.ir.verify import IRVerificationError, verify

__all__ = ["ModelSpec", "capture", "verify", "meta", "nodes_by_role", "NodeMeta", "HeadLayout",
           "IRVerificationError"]
