"""fxforge.passes: the pass manager and the built-in passes (imported here so they register)."""

from fxforge.passes.manager import (PassConfig, PassContext, PassResult, build_pipeline, register_pass,
                                    registered_passes, resolve, run_pipeline)

__all__ = ["PassConfig", "PassContext", "PassResult", "register_pass", "registered_passes", "resolve",
           "build_pipeline", "run_pipeline"]
