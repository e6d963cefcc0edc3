"""`fxforge duplex-study`: the Duplex paper's analysis on fxforge's cost model (a model, not a measurement).

Duplex (Yun et al. 2024) pairs an H100-class xPU with Logic-PIM in the same HBM stacks and reports, from
a cycle-level simulator, up to 2.67x the throughput of an H100 system. Here the same question is
asked of the roofline cost model (ir/cost.py) and the opb-placement pass:

  1. Op/B of the MoE experts against batch size and top-k (Mixtral-8x7B: Op/B ~ tokens per expert =
     batch * k / E), and of GQA decode attention (Op/B ~ group size g, independent of batch) for
     Mixtral-8x7B (g = 4) and a Llama-3-70B-like shape (g = 8).
  2. Throughput under continuous batching: `batch` sequences in flight, each with `lin` prompt and
     `lout` generated tokens; a step decodes `batch` tokens at the mean context lin + lout / 2 and, in
     steady state, prefills batch / lout prompts (their cost amortised into the step). The xPU-alone
     system runs everything on the xPU; the Duplex system is placed by opb-placement (experts by its
     token rule). Two Duplex columns: the pass's sum of op times (no overlap between xPU and PIM, as
     the cost model states) and an ideal-overlap bound (the busier device's time plus transfers: the
     paper's expert / attention co-processing at its best).
Systems of n devices are modelled as one device with n times the compute, bandwidth and memory
(tensor parallelism, communication not modelled); n is the least power of two that holds the weights
and the largest setting's KV cache. Energy is not modelled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fxforge.ir.capture import capture
from fxforge.ir.cost import BatchDesc, annotate_costs
from fxforge.ir.devices import H100, LOGIC_PIM, DeviceSpec, System, link_from_template
from fxforge.ir.errors import FxforgeError
from fxforge.ir.importers.named import NAMED_SHAPES
from fxforge.ir.model import Model
from fxforge.ir.spec import ModelSpec
from fxforge.passes.opb_placement import OpBPlacement, place, weight_bytes

PAPER_SPEEDUP = 2.67  # "up to 2.67x higher throughput" than an H100-based system (abstract)
PAPER_ENERGY = 0.4203  # "42.03% lower energy" (abstract); not modelled here
PAPER_ROLES = ("attention", "expert")  # what the paper runs on Logic-PIM (FC layers and prefill stay on the xPU)

# Llama-3-70B's published shape (80 layers, GQA 64 query / 8 KV heads), random weights: Op/B only
LLAMA3_70B_LIKE = ModelSpec(
    family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
    num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192, name="llama-3-70b-like")
MODELS = {"mixtral-8x7b": NAMED_SHAPES["mixtral-8x7b"], "llama-3-70b-like": LLAMA3_70B_LIKE}


@dataclass(frozen=True)
class StudySettings:
    """The sweep: models, decode batches, (lin, lout) pairs, top-k values and batches of the Op/B table."""

    models: tuple[str, ...] = ("mixtral-8x7b", "llama-3-70b-like")
    batches: tuple[int, ...] = (16, 32, 64, 128, 256)
    lengths: tuple[tuple[int, int], ...] = ((1024, 1024), (2048, 512))
    top_ks: tuple[int, ...] = (1, 2, 4)
    opb_batches: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)
    num_layers: int = 0  # 0: the models' own; smaller: a smoke run (per-layer results scale, totals do not)
    skew: float = 1.0  # MoE models also run with Zipf(skew) routing (0: uniform only)

    def __post_init__(self):
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise FxforgeError(f"--models: unknown {unknown}; the study knows {sorted(MODELS)}")
        for name in ("batches", "top_ks", "opb_batches"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise FxforgeError(f"{name} must be integers >= 1, got {list(values)}")
        if isinstance(self.skew, bool) or not isinstance(self.skew, (int, float)) or not 0 <= self.skew <= 10:
            raise FxforgeError(f"--skew must be a number in 0..10 (0: uniform routing only), got {self.skew!r}")
        if not self.lengths or any(lin < 1 or lout < 1 for lin, lout in self.lengths):
            raise FxforgeError(f"lengths must be (lin, lout) pairs >= 1, got {list(self.lengths)}")


def scaled(device: DeviceSpec, n: int) -> DeviceSpec:
    """n devices as one: n times the peaks, bandwidth and memory."""
    if n == 1:
        return device
    return dataclasses.replace(device, name=f"{device.name}x{n}",
                               peak_flops={k: n * v for k, v in device.peak_flops.items()},
                               mem_bandwidth=n * device.mem_bandwidth, memory_bytes=n * device.memory_bytes,
                               notes=f"{n} x {device.name} (tensor parallel, communication not modelled)")


def systems(n: int) -> tuple[System, System]:
    """(xPU alone, xPU + Logic-PIM) for n devices."""
    xpu, pim = scaled(H100, n), dataclasses.replace(scaled(LOGIC_PIM, n), memory_bytes=n * H100.memory_bytes)
    link = link_from_template("pim-internal", xpu, pim)
    return System({xpu.name: xpu}), System({xpu.name: xpu, pim.name: pim}, (link,))


def devices_needed(spec: ModelSpec, batch: int, context: int) -> int:
    """Least power of two of H100s whose memory holds the bf16 weights and the KV cache of batch x context."""
    dense, expert = weight_bytes(spec, 2)
    need = dense + expert * spec.num_layers * spec.num_experts
    need += batch * context * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 2
    n = 1
    while n * H100.memory_bytes < need:
        n *= 2
    return n


def meta_graph(spec: ModelSpec):
    """The model's captured graph on the meta device (no weights)."""
    return capture(Model.from_state_dict(spec, None, device="meta", dtype=torch.bfloat16).module)


def op_per_byte_rows(spec: ModelSpec, gm, batches, top_ks, context: int) -> list[dict]:
    """Op/B of the experts (per top-k) and of decode attention, per decode batch, from the cost model."""
    rows = []
    for batch in batches:
        row = {"model": spec.name, "batch": batch}
        for k in top_ks if spec.is_moe else ():
            if k > spec.num_experts:
                continue
            gm.meta["spec"] = dataclasses.replace(spec, num_experts_per_tok=k)
            costs = annotate_costs(gm, gm.meta["spec"], BatchDesc("decode", batch, context))
            row[f"expert_opb_top{k}"] = _mean_opb(costs, "expert")
        gm.meta["spec"] = spec
        costs = annotate_costs(gm, spec, BatchDesc("decode", batch, context))
        row["attention_opb"] = _mean_opb(costs, "attention")
        row["group_size"] = spec.group_size
        rows.append(row)
    return rows


def _mean_opb(costs, role: str) -> float:
    chosen = [c for c in costs if c.role == role]
    return sum(c.flops for c in chosen) / sum(c.bytes for c in chosen)


def step_times(gm, system: System, batch: int, lin: int, lout: int, roles: tuple[str, ...] = (),
               skew: float = 0.0) -> dict:
    """Modelled seconds of one continuous-batching step on a system: the decode step at the mean context
    plus batch / lout prefills of lin tokens; the sum (no overlap) and the ideal-overlap bound. roles:
    what may leave the xPU (opb-placement memory_side_roles; empty: any op); skew > 0: Zipf routing."""
    experts = dict(experts="skewed", skew=skew) if skew else {}
    decode = place(gm, OpBPlacement(batch=batch, context=lin + lout // 2, memory_side_roles=roles, **experts), system)
    prefill = place(gm, OpBPlacement(phase="prefill", batch=1, context=lin, memory_side_roles=roles, **experts),
                    system)
    share = batch / lout
    summed = decode["predicted_step_s"] + share * prefill["predicted_step_s"]
    busiest = max(decode["per_device_s"][d] + share * prefill["per_device_s"][d] for d in system.devices)
    overlap = busiest + decode["transfer_s"] + share * prefill["transfer_s"]
    placement = {role: row["devices"] for role, row in decode["placement"].items() if role in ("attention", "expert")}
    rule = next(iter(decode["expert_rules"].values()), None)
    split = {}
    for device in (rule or {}).get("expert_devices", []):
        if device is not None:
            split[device] = split.get(device, 0) + 1
    return {"summed_s": summed, "overlap_s": overlap, "decode_placement": placement,
            "expert_threshold": rule["threshold_tokens"] if rule else None,
            "tokens_per_expert": rule["tokens_per_expert"] if rule else None, "expert_split": split}


def run_study(settings: StudySettings = StudySettings(), progress: Callable[[str], None] | None = None) -> dict:
    """Op/B tables and the throughput table (tokens/s, speed-ups) for every model and setting."""
    results = {"kind": "duplex-study", "model_only": True, "settings": dataclasses.asdict(settings),
               "paper": {"speedup_up_to": PAPER_SPEEDUP, "energy_reduction": PAPER_ENERGY},
               "opb": [], "throughput": []}
    for name in settings.models:
        spec = MODELS[name]
        if settings.num_layers:
            spec = dataclasses.replace(spec, num_layers=settings.num_layers)
        gm = meta_graph(spec)
        results["opb"] += op_per_byte_rows(spec, gm, settings.opb_batches, settings.top_ks, 2048)
        n = devices_needed(spec, max(settings.batches), max(lin + lout for lin, lout in settings.lengths))
        xpu_only, duplex = systems(n)
        for lin, lout in settings.lengths:
            for batch in settings.batches:
                if progress is not None:
                    progress(f"{name} batch {batch} lin {lin} lout {lout}")
                base = step_times(gm, xpu_only, batch, lin, lout)
                dup = step_times(gm, duplex, batch, lin, lout, PAPER_ROLES)
                free = step_times(gm, duplex, batch, lin, lout)
                results["throughput"].append({
                    "model": name, "devices": n, "batch": batch, "lin": lin, "lout": lout,
                    "xpu_tokens_per_s": batch / base["summed_s"],
                    "duplex_tokens_per_s": batch / dup["summed_s"],
                    "duplex_overlap_tokens_per_s": batch / dup["overlap_s"],
                    "any_op_tokens_per_s": batch / free["summed_s"],
                    "speedup": base["summed_s"] / dup["summed_s"],
                    "speedup_overlap": base["summed_s"] / dup["overlap_s"],
                    "speedup_any_op": base["summed_s"] / free["summed_s"],
                    "decode_placement": dup["decode_placement"], "expert_threshold": dup["expert_threshold"]})
                if spec.is_moe and settings.skew:
                    base_skew = step_times(gm, xpu_only, batch, lin, lout, skew=settings.skew)
                    dup_skew = step_times(gm, duplex, batch, lin, lout, PAPER_ROLES, settings.skew)
                    results["throughput"][-1]["skewed"] = {
                        "xpu_tokens_per_s": batch / base_skew["summed_s"],
                        "duplex_tokens_per_s": batch / dup_skew["summed_s"],
                        "speedup": base_skew["summed_s"] / dup_skew["summed_s"],
                        "speedup_overlap": base_skew["summed_s"] / dup_skew["overlap_s"],
                        "tokens_per_expert": dup_skew["tokens_per_expert"], "expert_split": dup_skew["expert_split"]}
    rows = results["throughput"]
    for key in ("speedup", "speedup_overlap", "speedup_any_op"):
        results[f"max_{key}"] = max(r[key] for r in rows)
    return results


def markdown(results: dict) -> str:
    """Both tables and the comparison with the paper, labelled as a model result."""
    lines = ["Model result (fxforge roofline cost model + opb-placement; no hardware ran, no simulator).", "",
             "Op/B per op (decode, context 2048, bf16):", ""]
    opb = results["opb"]
    keys = sorted({k for r in opb for k in r if k.startswith("expert_opb")})
    lines += ["| model | batch | " + " | ".join(k.replace("expert_opb_", "experts ") for k in keys)
              + " | attention (g) |", "|---|---:|" + "---:|" * (len(keys) + 1)]
    for r in opb:
        cells = [f"{r[k]:.1f}" if k in r else "-" for k in keys]
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + f" | {r['attention_opb']:.2f} "
                     f"({r['group_size']}) |")
    lines += ["", "Throughput under continuous batching, xPU (H100-class) vs xPU + Logic-PIM (tokens/s). Duplex: the "
              "paper's mapping (only attention and experts may leave the xPU), placed by opb-placement; any op: "
              "every op may move:", "",
              "| model | devices | batch | lin/lout | xPU | Duplex (no overlap) | speed-up | Duplex (ideal overlap) "
              "| speed-up | any op (no overlap) | speed-up | attention on | experts on | expert threshold |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in results["throughput"]:
        where = r["decode_placement"]
        lines.append(f"| {r['model']} | {r['devices']} | {r['batch']} | {r['lin']}/{r['lout']} | "
                     f"{r['xpu_tokens_per_s']:,.0f} | {r['duplex_tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
                     f"{r['duplex_overlap_tokens_per_s']:,.0f} | {r['speedup_overlap']:.2f}x | "
                     f"{r['any_op_tokens_per_s']:,.0f} | {r['speedup_any_op']:.2f}x | "
                     f"{_devices(where.get('attention'))} | {_devices(where.get('expert'))} | "
                     f"{r['expert_threshold'] if r['expert_threshold'] is not None else '-'} |")
    skewed = [r for r in results["throughput"] if "skewed" in r]
    if skewed:
        lines += ["", f"Skewed routing (experts' shares Zipf with exponent {results['settings']['skew']}), paper "
                  "mapping: the rule splits one layer's experts between the devices by their tokens:", "",
                  "| model | batch | lin/lout | tokens per expert | experts per device | xPU | Duplex (no overlap) | "
                  "speed-up | ideal overlap |", "|---|---:|---|---|---|---:|---:|---:|---:|"]
        for r in skewed:
            k = r["skewed"]
            split = ", ".join(f"{d}: {n}" for d, n in k["expert_split"].items())
            lines.append(f"| {r['model']} | {r['batch']} | {r['lin']}/{r['lout']} | {k['tokens_per_expert']} | "
                         f"{split} | {k['xpu_tokens_per_s']:,.0f} | {k['duplex_tokens_per_s']:,.0f} | {k['speedup']:.2f}x | "
                         f"{k['speedup_overlap']:.2f}x |")
    lines += ["", f"Best modelled speed-up (paper mapping): {results['max_speedup']:.2f}x without overlap, "
              f"{results['max_speedup_overlap']:.2f}x with ideal overlap ({results['max_speedup_any_op']:.2f}x "
              "when any op may move); the paper reports up to "
              f"{results['paper']['speedup_up_to']}x (cycle-level simulation) and "
              f"{100 * results['paper']['energy_reduction']:.0f}% less energy (not modelled here)."]
    return "\n".join(lines) + "\n"


def _devices(counts: dict | None) -> str:
    return ", ".join(f"{d} ({n})" for d, n in counts.items()) if counts else "-"


def plot_opb(results: dict, path: Path | str) -> Path:
    """Op/B of the experts (per top-k) and of attention against decode batch, with both ridge points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5))
    for model in dict.fromkeys(r["model"] for r in results["opb"]):
        rows = [r for r in results["opb"] if r["model"] == model]
        batches = [r["batch"] for r in rows]
        for key in sorted(k for k in rows[0] if k.startswith("expert_opb")):
            ax.plot(batches, [r[key] for r in rows], marker="o", label=f"{model} experts {key.split('_')[-1]}")
        ax.plot(batches, [r["attention_opb"] for r in rows], marker="s", linestyle=":", label=f"{model} attention")
    for device, style in ((H100, "--"), (LOGIC_PIM, "-.")):
        ax.axhline(device.ridge("bfloat16"), color="gray", linestyle=style, label=f"{device.name} ridge")
    ax.set(xscale="log", yscale="log", xlabel="decode batch (sequences)", ylabel="Op/B (FLOP / byte)",
           title="Op/B of MoE experts and GQA attention (fxforge cost model)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["StudySettings", "run_study", "markdown", "plot_opb", "systems", "scaled", "devices_needed",
           "op_per_byte_rows", "step_times", "MODELS", "LLAMA3_70B_LIKE", "PAPER_SPEEDUP"]
