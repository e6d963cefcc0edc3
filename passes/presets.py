"""Named KV-cache presets: one pass list per bit budget, the best combination measured for it
(BENCHMARKS.md, "4-bit keys (issue 15)": SmolLM2-135M, GSM8K evaluation split, CPU). The CLI's
`--kv-preset NAME` and `kv_preset(NAME)` are the same lists.

  k4   keys at 4.25 bits per value, V unquantized (measured +5.9% perplexity);
  kv4  keys and values at 4.5 bits per value (measured +7.9% perplexity).

Both need calibration text (`calib=` / the CLI's calibration split).
"""

from __future__ import annotations

from fxforge.ir.errors import PassConfigError
from fxforge.passes.bfp_kv import NATIVE, BFPKVCache
from fxforge.passes.ksort import KSort
from fxforge.passes.manager import PassConfig

KV_PRESETS = {
    "k4": "K at 4.25 bits/value (BFP12 block 32, pre-RoPE keys, calibrated scales and order), V unquantized",
    "kv4": "K and V at 4.5 bits/value (BFP12 block 16, pre-RoPE keys, calibrated scales and order)",
}


def kv_preset(name: str) -> list[PassConfig]:
    """The pass list of preset `name` (one of KV_PRESETS)."""
    if name not in KV_PRESETS:
        raise PassConfigError(f"unknown KV preset {name!r}; valid presets: {', '.join(sorted(KV_PRESETS))}")
    if name == "k4":
        return [KSort(metric="calibrated", k_format="bfp12", block=32, scale=True, pre_rope=True),
                BFPKVCache(k_format="bfp12", v_format=NATIVE, block=32, pre_rope=True)]
    # Both presets are the measured best at their budget: BFP12 with pre-RoPE keys and calibrated scales and
    # order (K at block 32; K and V at block 16). Per-layer formats (the kv-mix pass) were not measured as a
    # row, so no preset includes them.
    return [KSort(metric="calibrated", k_format="bfp12", v_format="bfp12", block=16, v_side=True, scale=True,
                  pre_rope=True),
            BFPKVCache(k_format="bfp12", v_format="bfp12", block=16, pre_rope=True)]
