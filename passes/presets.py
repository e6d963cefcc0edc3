"""Named KV-cache presets: one pass list per bit budget, the best combination measured for it
(BENCHMARKS.md, "4-bit keys"). The CLI's `--kv-preset NAME` and `kv_preset(NAME)` are the same lists.

  k4   keys at 4.25 bits per value on average, V unquantized;
  kv4  keys and values at 4.5 bits per value on average.

Both need calibration text (`calib=` / the CLI's calibration split).
"""

from __future__ import annotations

from fxforge.ir.errors import PassConfigError
from fxforge.passes.bfp_kv import NATIVE, BFPKVCache
from fxforge.passes.ksort import KSort
from fxforge.passes.kv_mix import KVMix
from fxforge.passes.manager import PassConfig

KV_PRESETS = {
    "k4": "K at 4.25 bits/value on average (per-layer BFP12/MXFP4 blocks, pre-RoPE keys, calibrated scales and "
          "order), V unquantized",
    "kv4": "K and V at 4.5 bits/value on average (per-layer formats, pre-RoPE keys, calibrated scales and order)",
}


def kv_preset(name: str) -> list[PassConfig]:
    """The pass list of preset `name` (one of KV_PRESETS)."""
    if name not in KV_PRESETS:
        raise PassConfigError(f"unknown KV preset {name!r}; valid presets: {', '.join(sorted(KV_PRESETS))}")
    if name == "k4":
        return [KSort(metric="calibrated", k_format="bfp12_32", scale=True, pre_rope=True),
                BFPKVCache(k_format="bfp12_32", v_format=NATIVE, pre_rope=True),
                KVMix(bits=4.25, k_formats=("bfp12_16", "bfp12_32", "mxfp4_32", "bfp12_64"), v_formats=(NATIVE,))]
    return [KSort(metric="calibrated", k_format="bfp12_32", v_format="bfp12_32", v_side=True, scale=True,
                  pre_rope=True),
            BFPKVCache(k_format="bfp12_32", v_format="bfp12_32", pre_rope=True),
            KVMix(bits=4.5, k_formats=("bfp12_16", "bfp12_32", "mxfp4_32", "bfp14_32"),
                  v_formats=("bfp12_16", "bfp12_32", "mxfp4_32", "bfp14_32"))]
