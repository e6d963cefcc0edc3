"""`fxforge analyze`: per-layer FLOPs / bytes / Op/B / roofline time of one batch step, and a roofline plot.

    analyze(model, batch, device, plot_path=None, console=None) -> dict

model      a Model, a DecoderLM, a captured GraphModule (gm.meta["spec"]), or a bare ModelSpec (built on
           the meta device: no weights needed, KV cache in batch.dtype)
batch      fxforge.ir.cost.BatchDesc, e.g. BatchDesc("decode", batch=64, context=4096, dtype="bfloat16")
device     a DeviceSpec or a name/JSON path for fxforge.ir.devices.load_device_spec ("h100", "logic-pim")
plot_path  where to write the roofline PNG (None: no plot)
console    a rich Console to print the tables on (None: print nothing, e.g. for --json)

The CLI maps `fxforge analyze MODEL --phase decode --batch 64 --context 4096 [--dtype bfloat16]
[--device h100|PATH.json] [--plot out.png] [--json]` onto this call; the returned dict is JSON-able.
Every role is also compared with Logic-PIM (`compare`), the Duplex placement question.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx
from rich.console import Console
from rich.table import Table

from fxforge.ir.capture import capture
from fxforge.ir.cost import BatchDesc, annotate_costs, layer_table, placement_hint, role_table, summarize
from fxforge.ir.devices import LOGIC_PIM, DeviceSpec, load_device_spec
from fxforge.ir.model import Model
from fxforge.ir.modules import DecoderLM
from fxforge.ir.spec import ModelSpec

SUMMARY_VERSION = 1


def analyze(model, batch: BatchDesc, device: DeviceSpec | str = "h100", plot_path: Path | str | None = None,
            console: Console | None = None, compare: DeviceSpec | None = LOGIC_PIM) -> dict:
    """Annotate the model's graph with costs for `batch`, print per-layer and per-role tables, plot the roofline."""
    device = device if isinstance(device, DeviceSpec) else load_device_spec(device)
    gm, spec = _graph_of(model, batch)
    costs = annotate_costs(gm, spec, batch)
    dtype = batch.dtype
    layers = layer_table(costs, device, dtype)
    roles = role_table(costs, device, dtype)
    if compare is not None and compare.name != device.name and dtype in compare.peak_flops:
        for row in roles:
            hint = placement_hint(row, device, compare, dtype)
            row["faster_on"], row["speedup"] = hint.device, hint.speedup
    else:
        compare = None
    summary = {
        "version": SUMMARY_VERSION,
        "model": spec.name or spec.family,
        "spec": {k: getattr(spec, k) for k in ("family", "num_layers", "hidden_size", "num_heads",
                                               "num_kv_heads", "head_dim", "num_experts")},
        "batch": {"phase": batch.phase, "batch": batch.batch, "context": batch.context, "dtype": dtype,
                  "prefill_tokens": batch.prefill_tokens, "tokens": batch.num_tokens},
        "device": device.to_dict(),
        "compare": compare.name if compare else None,
        "totals": summarize(costs, device, dtype),
        "layers": layers,
        "roles": roles,
        "plot": None,
    }
    if plot_path is not None:
        summary["plot"] = str(plot_roofline(roles, device, batch, Path(plot_path), summary["model"], compare))
    if console is not None:
        console.print(_layer_rich_table(summary))
        console.print(_role_rich_table(summary))
        if summary["plot"]:
            console.print(f"roofline plot: {summary['plot']}")
    return summary


def _graph_of(model, batch: BatchDesc) -> tuple[fx.GraphModule, ModelSpec]:
    if isinstance(model, ModelSpec):
        with torch.device("meta"):
            module = DecoderLM(model)
        module.set_kv_format(batch.dtype)
        return capture(module), model
    module = model.module if isinstance(model, Model) else model
    if isinstance(module, fx.GraphModule):
        return module, module.meta["spec"]
    if isinstance(module, DecoderLM):
        return capture(module), module.spec
    raise TypeError(f"analyze expects a Model, DecoderLM, captured GraphModule or ModelSpec, got {type(model).__name__}")


def _fmt_row(row: dict) -> list[str]:
    return [f"{row['flops'] / 1e9:,.3f}", f"{row['bytes'] / 1e6:,.2f}", f"{row['op_per_byte']:,.1f}",
            f"{row['time_s'] * 1e6:,.2f}", row["bound"]]


def _title(summary: dict) -> str:
    b = summary["batch"]
    mixed = f" + {b['prefill_tokens']} prefill tokens" if b["phase"] == "mixed" else ""
    return (f"{summary['model']}: {b['phase']}, batch {b['batch']}, context {b['context']}{mixed}, "
            f"{b['dtype']} on {summary['device']['name']}")


def _layer_rich_table(summary: dict) -> Table:
    table = Table(title=_title(summary), caption="est. µs: Σ per node of max(FLOPs/peak, bytes/BW)")
    for name in ("layer", "GFLOPs", "MB moved", "Op/B", "est. µs", "bound"):
        table.add_column(name, justify="left" if name in ("layer", "bound") else "right")
    for row in summary["layers"]:
        table.add_row(str(row["layer"]), *_fmt_row(row))
    table.add_section()
    table.add_row("total", *_fmt_row(summary["totals"]), style="bold")
    return table


def _role_rich_table(summary: dict) -> Table:
    compare = summary["compare"]
    table = Table(title="per node type, summed over layers")
    columns = ["role", "nodes", "GFLOPs", "MB moved", "Op/B", "est. µs", "bound"]
    columns += [f"faster on (vs {compare})"] if compare else []
    for name in columns:
        table.add_column(name, justify="left" if name in ("role", "bound") or name.startswith("faster") else "right")
    for row in summary["roles"]:
        extra = [f"{row['faster_on']} ×{row['speedup']:.1f}"] if compare else []
        table.add_row(row["role"], str(row["nodes"]), *_fmt_row(row), *extra)
    return table


def plot_roofline(roles: list[dict], device: DeviceSpec, batch: BatchDesc, path: Path, title: str = "",
                  compare: DeviceSpec | None = None) -> Path:
    """Log-log attainable FLOP/s vs Op/B: the device roof, `compare`'s roof dashed, one point per node type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _plot_points(roles)
    dtype = batch.dtype
    opbs = [p[1] for p in points] + [device.ridge(dtype)] + ([compare.ridge(dtype)] if compare else [])
    lo, hi = min(opbs) / 4, max(opbs) * 4
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    for dev, style in ((device, "-"), (compare, "--")):
        if dev is not None:
            ax.plot(xs, [min(dev.peak(dtype), dev.mem_bandwidth * x) for x in xs], style, color="black" if
                    style == "-" else "tab:gray", label=f"{dev.name} roof (ridge {dev.ridge(dtype):.0f} Op/B)")
    colors, markers = plt.get_cmap("tab20").colors, "osD^v<>phX*"
    for i, (name, opb, achieved) in enumerate(points):  # named in the legend only: labels on points overprint
        ax.scatter([opb], [achieved], s=42, zorder=3, label=f"{name} ({opb:,.1f} Op/B)", color=colors[i % len(colors)],
                   marker=markers[i % len(markers)])
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)",
           ylabel="attainable FLOP/s", title=f"{title} {batch.phase} batch {batch.batch} ctx {batch.context}"
           f" ({dtype}, {device.name})".strip())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_points(roles: list[dict]) -> list[tuple[str, float, float]]:
    """(role, Op/B, achieved FLOP/s) per row of the role table that has FLOPs: the same names as the table."""
    return [(row["role"], row["flops"] / row["bytes"], row["flops"] / row["time_s"]) for row in roles
            if row["flops"] and row["bytes"] and row["time_s"]]


__all__ = ["analyze", "plot_roofline", "SUMMARY_VERSION"]
