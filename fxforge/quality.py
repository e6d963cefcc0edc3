"""The KV-cache quality table: perplexity of SmolLM2-135M on GSM8K text under BFP / MXFP4 KV formats,
with natural channel order, weight-norm KSort and calibrated KSort.

Calibration uses the GSM8K calibration split; perplexity is measured on the evaluation split
(held-out text). Every row is scored on the same token windows as the fp32 baseline.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from fxforge.data import load_texts
from fxforge.evaluate import perplexity
from fxforge.ir.tokenizer import token_windows
from fxforge.passes import BFPKVCache, KSort

ORDERS = ("natural", "weight_norm", "calibrated")
# (row label, k format, v format); "native" keeps the model dtype
SETTINGS = (("BFP16 K+V", "bfp16", "bfp16"), ("BFP12 K", "bfp12", "native"), ("BFP12 K+V", "bfp12", "bfp12"),
            ("MXFP4 K", "mxfp4", "native"))


@dataclass(frozen=True)
class Row:
    setting: str
    k_format: str
    v_format: str
    block: int
    order: str

    def passes(self, calib_tokens: int, context: int, search_steps: int = 64) -> list:
        quantize_v = self.v_format != "native"
        bfp = BFPKVCache(k_format=self.k_format, v_format=self.v_format, block=self.block)
        if self.order == "natural":
            return [bfp]
        sort = KSort(metric=self.order, k_format=self.k_format,
                     v_format=self.v_format if quantize_v else "bfp16", block=self.block,
                     v_side=quantize_v, calib_tokens=calib_tokens, context=context, search_steps=search_steps)
        return [sort, bfp]


def table_rows(blocks=(16, 32, 64), orders=ORDERS) -> list[Row]:
    rows = []
    for block in blocks:
        for setting, k_fmt, v_fmt in SETTINGS:
            if k_fmt == "mxfp4" and block != 32:  # MXFP4 fixes its block at 32
                continue
            rows += [Row(setting, k_fmt, v_fmt, block, order) for order in orders]
    return rows


def run_quality_table(model, max_tokens: int, context: int, calib_tokens: int, blocks=(16, 32, 64),
                      orders=ORDERS, out_json: Path | None = None, console: Console | None = None,
                      search_steps: int = 64, settings: tuple[str, ...] | None = None) -> dict:
    import fxforge

    console = console or Console(stderr=True)
    windows = token_windows(model.tokenizer, load_texts("gsm8k", "eval"), context, max_tokens)
    calib = load_texts("gsm8k", "calib")
    start = time.perf_counter()
    base = perplexity(model, windows, batch_size=16, show_progress=False)
    results = {"model": model.spec.name, "dtype": str(model.dtype), "device": str(model.device),
               "context": context, "tokens": base.tokens, "calib_tokens": calib_tokens,
               "baseline": {"perplexity": base.perplexity, "kv_bytes_per_token": model.kv_bytes_per_token()},
               "rows": []}
    console.print(f"baseline perplexity {base.perplexity:.4f} over {base.tokens} tokens")
    rows = [r for r in table_rows(blocks, orders) if settings is None or r.setting in settings]
    for row in rows:
        t0 = time.perf_counter()
        opt = fxforge.optimize(model, passes=row.passes(calib_tokens, context, search_steps), calib=calib)
        ppl = perplexity(opt, windows, batch_size=16, show_progress=False).perplexity
        bfp_report = opt.passes[-1]["report"]
        entry = {**row.__dict__, "perplexity": ppl, "delta_pct": 100 * (ppl / base.perplexity - 1),
                 "k_bits": bfp_report["k_bits_per_value"], "v_bits": bfp_report["v_bits_per_value"],
                 "kv_bytes_per_token": bfp_report["kv_bytes_per_token"], "seconds": round(time.perf_counter() - t0, 1)}
        results["rows"].append(entry)
        console.print(f"{row.setting:10s} block {row.block:2d} {row.order:11s} ppl {ppl:.4f} "
                      f"({entry['delta_pct']:+.2f}%) {entry['seconds']}s")
        del opt
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if out_json:  # partial results survive an interrupted run
            Path(out_json).write_text(json.dumps(results, indent=2))
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["targets"] = targets(results)
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=2))
    return results


def _find(results: dict, setting: str, block: int, order: str) -> dict | None:
    return next((r for r in results["rows"] if r["setting"] == setting and r["block"] == block
                 and r["order"] == order), None)


def targets(results: dict) -> dict:
    """The issue's targets, evaluated on the measured table."""
    base = results["baseline"]["perplexity"]
    out = {}
    bfp16 = _find(results, "BFP16 K+V", 32, "natural")
    if bfp16:
        out["bfp16_kv_b32_within_0.5pct"] = {"delta_pct": bfp16["delta_pct"], "met": bfp16["delta_pct"] <= 0.5}
    natural, calibrated = _find(results, "BFP12 K", 32, "natural"), _find(results, "BFP12 K", 32, "calibrated")
    weight_norm = _find(results, "BFP12 K", 32, "weight_norm")
    if natural and calibrated:
        gap = natural["perplexity"] - base
        removed = (natural["perplexity"] - calibrated["perplexity"]) / gap if gap > 0 else 0.0
        out["bfp12_k_b32_calibrated_gap_removed"] = {"fraction": removed, "met": removed >= 0.4}
    if natural and weight_norm:
        gap = natural["perplexity"] - base
        out["bfp12_k_b32_weight_norm_gap_removed"] = {
            "fraction": (natural["perplexity"] - weight_norm["perplexity"]) / gap if gap > 0 else 0.0}
    worse = []
    for r in results["rows"]:
        if r["order"] != "natural":
            nat = _find(results, r["setting"], r["block"], "natural")
            if nat and r["perplexity"] > nat["perplexity"]:
                worse.append(f"{r['setting']} b{r['block']} {r['order']}: {r['perplexity']:.4f} > {nat['perplexity']:.4f}")
    out["no_ksort_worse_than_natural"] = {"violations": worse, "met": not worse}
    return out


def markdown(results: dict) -> str:
    base = results["baseline"]
    lines = ["| KV setting | block | order | perplexity | Δ vs fp32 | bits/value K / V | KV bytes/token |",
             "|---|---|---|---|---|---|---|",
             f"| fp32 baseline | – | – | {base['perplexity']:.4f} | – | 32 / 32 | {base['kv_bytes_per_token']} |"]
    for r in results["rows"]:
        lines.append(f"| {r['setting']} | {r['block']} | {r['order']} | {r['perplexity']:.4f} | "
                     f"{r['delta_pct']:+.2f}% | {r['k_bits']:g} / {r['v_bits']:g} | {r['kv_bytes_per_token']} |")
    return "\n".join(lines) + "\n"
