"""The KV-cache quality table: SmolLM2-135M on GSM8K text under BFP / MXFP4 KV formats, per channel
method (order, scales, pre-RoPE keys) and for the mixed-format presets.

Every row is scored next to the unquantized baseline on the same token windows of the GSM8K
evaluation split: perplexity, and the mean KL(baseline || row) of the next-token distributions.
Calibration (ksort calibrated, kv-mix) reads only the calibration split, so every row is held-out.
Rows are calibrated first, then all of them are scored in one pass over the evaluation windows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from fxforge.data import load_texts
from fxforge.errors import FxforgeError
from fxforge.ir.tokenizer import token_windows
from fxforge.passes import BFPKVCache, KSort, KVMix, kv_preset
from fxforge.passes.presets import KV_PRESETS

# method -> (ksort options or None, bfp-kv pre_rope). "calibrated" is the order alone (the paper's
# idea with a calibrated objective), "scale" the scales alone; "+" combines.
METHODS = {
    "natural": (None, False),
    "weight_norm": ({"metric": "weight_norm"}, False),
    "calibrated": ({"metric": "calibrated"}, False),
    "scale": ({"metric": "calibrated", "permute": False, "scale": True}, False),
    "calibrated+scale": ({"metric": "calibrated", "scale": True}, False),
    "pre_rope": (None, True),
    "pre_rope+scale": ({"metric": "calibrated", "permute": False, "scale": True, "pre_rope": True}, True),
    "pre_rope+calibrated+scale": ({"metric": "calibrated", "scale": True, "pre_rope": True}, True),
}
ORDERS = ("natural", "weight_norm", "calibrated")  # the first table's methods (issue 3)
# (row label, k format, v format); "native" keeps the model dtype
SETTINGS = (("BFP16 K+V", "bfp16", "bfp16"), ("BFP12 K", "bfp12", "native"), ("BFP12 K+V", "bfp12", "bfp12"),
            ("MXFP4 K", "mxfp4", "native"))
PRESET_METHOD = "preset"


@dataclass(frozen=True)
class Row:
    setting: str
    k_format: str
    v_format: str
    block: int | None  # None: a preset's per-layer formats
    method: str

    def passes(self, calib_tokens: int, context: int, search_steps: int = 64) -> list:
        if self.method == PRESET_METHOD:
            return [_with_calibration(p, calib_tokens, context, search_steps) for p in kv_preset(self.setting)]
        ksort_options, pre_rope = METHODS[self.method]
        quantize_v = self.v_format != "native"
        bfp = BFPKVCache(k_format=self.k_format, v_format=self.v_format, block=self.block, pre_rope=pre_rope)
        if ksort_options is None:
            return [bfp]
        sort = KSort(**ksort_options, k_format=self.k_format, v_format=self.v_format if quantize_v else "bfp16",
                     block=self.block, v_side=quantize_v, calib_tokens=calib_tokens, context=context,
                     search_steps=search_steps)
        return [sort, bfp]


def _with_calibration(config, calib_tokens: int, context: int, search_steps: int):
    """A preset's pass with the table's calibration budget (ksort: tokens, context, steps; kv-mix:
    context, and at most the table's tokens)."""
    if isinstance(config, KSort):
        return dataclasses.replace(config, calib_tokens=calib_tokens, context=context, search_steps=search_steps)
    if isinstance(config, KVMix):
        return dataclasses.replace(config, context=context, calib_tokens=max(context, min(calib_tokens,
                                                                                           config.calib_tokens)))
    return config


def table_rows(blocks=(16, 32, 64), methods=ORDERS, settings: tuple[str, ...] | None = None,
               presets: tuple[str, ...] = ()) -> list[Row]:
    """Rows for every setting x block x method (MXFP4 only at block 32), then one row per preset."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise FxforgeError(f"unknown quality-table method(s) {unknown}; valid: {', '.join(METHODS)}")
    labels = [s[0] for s in SETTINGS]
    if settings is not None and any(s not in labels for s in settings):
        raise FxforgeError(f"unknown setting(s) {[s for s in settings if s not in labels]}; valid: {labels}")
    bad_presets = [p for p in presets if p not in KV_PRESETS]
    if bad_presets:
        raise FxforgeError(f"unknown preset(s) {bad_presets}; valid: {', '.join(KV_PRESETS)}")
    rows = []
    for block in blocks:
        for setting, k_fmt, v_fmt in SETTINGS:
            if (settings is not None and setting not in settings) or (k_fmt == "mxfp4" and block != 32):
                continue  # MXFP4 fixes its block at 32
            rows += [Row(setting, k_fmt, v_fmt, block, method) for method in methods]
    return rows + [Row(name, "mixed", "mixed", None, PRESET_METHOD) for name in presets]


def run_quality_table(model, max_tokens: int, context: int, calib_tokens: int, blocks=(16, 32, 64),
                      methods=ORDERS, out_json: Path | None = None, console: Console | None = None,
                      search_steps: int = 64, settings: tuple[str, ...] | None = None,
                      presets: tuple[str, ...] = (), batch_size: int = 16) -> dict:
    import fxforge

    console = console or Console(stderr=True)
    rows = table_rows(blocks, methods, settings, presets)
    windows = token_windows(model.tokenizer, load_texts("gsm8k", "eval"), context, max_tokens)
    calib = load_texts("gsm8k", "calib")
    start = time.perf_counter()
    results = {"model": model.spec.name, "dtype": str(model.dtype), "device": str(model.device),
               "context": context, "calib_tokens": calib_tokens, "search_steps": search_steps,
               "baseline": {"kv_bytes_per_token": model.kv_bytes_per_token()}, "rows": []}
    optimized = []
    for row in rows:
        t0 = time.perf_counter()
        opt = fxforge.optimize(model, passes=row.passes(calib_tokens, context, search_steps), calib=calib)
        optimized.append(opt)
        results["rows"].append({**row.__dict__, **_formats(opt), "calib_seconds": round(time.perf_counter() - t0, 1),
                                "passes": [{"name": r["name"], "config": r["config"]} for r in opt.passes]})
        console.print(f"calibrated {_label(row)} in {results['rows'][-1]['calib_seconds']}s")
    scores = _score(model, optimized, windows, batch_size, console)
    base_ppl = math.exp(scores["baseline"]["nll"] / scores["tokens"])
    results.update(tokens=scores["tokens"], windows=int(windows.shape[0]))
    results["baseline"]["perplexity"] = base_ppl
    for entry, score in zip(results["rows"], scores["rows"]):
        ppl = math.exp(score["nll"] / scores["tokens"])
        entry.update(perplexity=ppl, delta_pct=100 * (ppl / base_ppl - 1), kl=score["kl"] / scores["tokens"])
        console.print(f"{_label(entry)}: ppl {ppl:.4f} ({entry['delta_pct']:+.2f}%) KL {entry['kl']:.4f}")
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["targets"] = targets(results)
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=2))
    return results


def _label(row) -> str:
    get = row.get if isinstance(row, dict) else row.__dict__.get
    block = f"block {get('block')}" if get("block") else "mixed"
    return f"{get('setting')} {block} {get('method')}"


def _formats(opt) -> dict:
    """Average bits per value of K and V over layers, and KV bytes per token."""
    from fxforge.kernels.bfp import parse_kv_format

    formats = opt.kv_formats()
    k_bits = sum(parse_kv_format(k).bits_per_value() for k, _ in formats) / len(formats)
    v_bits = sum(parse_kv_format(v).bits_per_value() for _, v in formats) / len(formats)
    return {"k_bits": round(k_bits, 4), "v_bits": round(v_bits, 4), "kv_bytes_per_token": opt.kv_bytes_per_token(),
            "pre_rope": any(r["name"] == "bfp-kv" and r["config"].get("pre_rope") for r in opt.passes)}


@torch.no_grad()
def _score(model, optimized: list, windows: torch.Tensor, batch_size: int, console: Console) -> dict:
    """Summed next-token NLL of the baseline and of every row, and each row's summed KL(baseline || row),
    over the same windows (the baseline runs once per batch)."""
    out = {"tokens": 0, "baseline": {"nll": 0.0}, "rows": [{"nll": 0.0, "kl": 0.0} for _ in optimized]}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("scoring", total=windows.shape[0])
        for begin in range(0, windows.shape[0], batch_size):
            chunk = windows[begin:begin + batch_size]
            targets = chunk[:, 1:].to(model.device).unsqueeze(-1)
            base = torch.log_softmax(model.logits(chunk)[:, :-1].float(), dim=-1)
            out["baseline"]["nll"] -= base.gather(-1, targets).sum().item()
            probs = base.exp()
            for entry, opt in zip(out["rows"], optimized):
                logp = torch.log_softmax(opt.logits(chunk)[:, :-1].float(), dim=-1)
                entry["nll"] -= logp.gather(-1, targets).sum().item()
                entry["kl"] += (probs * (base - logp)).sum().item()
            out["tokens"] += targets.numel()
            progress.advance(task, chunk.shape[0])
    return out


def _find(results: dict, setting: str, block: int | None, method: str) -> dict | None:
    return next((r for r in results["rows"] if r["setting"] == setting and r["block"] == block
                 and r["method"] == method), None)


def targets(results: dict) -> dict:
    """The issues' targets, evaluated on the measured table (those whose rows are present)."""
    out = {}
    bfp16 = _find(results, "BFP16 K+V", 32, "natural")
    if bfp16:
        out["bfp16_kv_b32_within_0.5pct"] = {"delta_pct": bfp16["delta_pct"], "met": bfp16["delta_pct"] <= 0.5}
    base = results["baseline"]["perplexity"]
    natural, calibrated = _find(results, "BFP12 K", 32, "natural"), _find(results, "BFP12 K", 32, "calibrated")
    if natural and calibrated:
        gap = natural["perplexity"] - base
        removed = (natural["perplexity"] - calibrated["perplexity"]) / gap if gap > 0 else 0.0
        out["bfp12_k_b32_calibrated_gap_removed"] = {"fraction": removed, "met": removed >= 0.4}
    # issue 15: K at <= 4.25 bits (V unquantized) within +8%; K+V at <= 4.5 bits within +12%
    k_only = [r for r in results["rows"] if r["v_bits"] >= 16 and r["k_bits"] <= 4.25 + 1e-9]
    if k_only:
        best = min(k_only, key=lambda r: r["perplexity"])
        out["k_4.25_bits_within_8pct"] = {"row": _label(best), "delta_pct": best["delta_pct"],
                                          "met": best["delta_pct"] <= 8.0}
    kv = [r for r in results["rows"] if r["v_bits"] < 16 and (r["k_bits"] + r["v_bits"]) / 2 <= 4.5 + 1e-9]
    if kv:
        best = min(kv, key=lambda r: r["perplexity"])
        out["kv_4.5_bits_within_12pct"] = {"row": _label(best), "delta_pct": best["delta_pct"],
                                           "met": best["delta_pct"] <= 12.0}
    out["none_worse_than_plain_ksort"] = _against_plain_ksort(results)
    return out


def _against_plain_ksort(results: dict) -> dict:
    """Every method other than natural / weight_norm against the plain calibrated KSort row of its
    setting and block; presets against plain KSort at their budget (k4: BFP12 K block 32, kv4:
    BFP12 K+V block 16)."""
    references = {"k4": ("BFP12 K", 32), "kv4": ("BFP12 K+V", 16)}
    worse = []
    for r in results["rows"]:
        if r["method"] in ("natural", "weight_norm", "calibrated"):
            continue
        setting, block = references.get(r["setting"], (r["setting"], r["block"])) if r["method"] == PRESET_METHOD \
            else (r["setting"], r["block"])
        plain = _find(results, setting, block, "calibrated")
        if plain and r["perplexity"] > plain["perplexity"]:
            worse.append(f"{_label(r)}: {r['perplexity']:.4f} > {plain['perplexity']:.4f} ({_label(plain)})")
    return {"violations": worse, "met": not worse}


def markdown(results: dict) -> str:
    base = results["baseline"]
    lines = ["| KV setting | block | method | perplexity | Δ vs fp32 | KL (nats/token) | bits/value K / V | "
             "KV bytes/token |", "|---|---|---|---|---|---|---|---|",
             f"| fp32 baseline | – | – | {base['perplexity']:.4f} | – | – | 32 / 32 | {base['kv_bytes_per_token']} |"]
    for r in results["rows"]:
        block = r["block"] if r["block"] else "mixed"
        lines.append(f"| {r['setting']} | {block} | {r['method']} | {r['perplexity']:.4f} | {r['delta_pct']:+.2f}% | "
                     f"{r['kl']:.4f} | {r['k_bits']:g} / {r['v_bits']:g} | {r['kv_bytes_per_token']} |")
    return "\n".join(lines) + "\n"
