"""fxforge.passes: the pass manager and the built-in passes (imported here so they register)."""

from fxforge.passes.manager import (PassConfig, PassContext, PassResult, build_pipeline, register_pass,
                                    registered_passes, resolve, run_pipeline)
from fxforge.passes.ksort import KSort, KSortMetric  # noqa: E402  (registers "ksort")
from fxforge.passes.bfp_kv import BFPKVCache  # noqa: E402  (registers "bfp-kv")
from fxforge.passes.lower import Lower  # noqa: E402  (registers "lower")
from fxforge.passes.kv_mix import KVMix  # noqa: E402  (registers "kv-mix")
from fxforge.passes.presets import KV_PRESETS, kv_preset  # noqa: E402
from fxforge.passes.layer_tying import LayerTying  # noqa: E402  (registers "layer-tying")
from fxforge.passes.opb_placement import OpBPlacement  # noqa: E402  (registers "opb-placement")
from fxforge.passes.skip_decode import SkipDecode  # noqa: E402  (registers "skip-decode")

__all__ = ["PassConfig", "PassContext", "PassResult", "register_pass", "registered_passes", "resolve",
           "build_pipeline", "run_pipeline", "KSort", "KSortMetric", "BFPKVCache", "Lower", "LayerTying", "SkipDecode",
           "KVMix", "KV_PRESETS", "kv_preset", "OpBPlacement"]
