"""ksort: compile-time channel reordering and scaling for block-floating-point K (and optionally V) caches.

"Accurate Block Quantization in LLMs with Outliers" (Trukhanov & Soloveychik, 2024). Outlier
channels of K spoil the shared exponent of their block; permuting head_dim channels so that
channels of like magnitude share blocks shrinks the quantization error. Per KV head j, a
permutation p_j is applied to the output rows of W_k (and b_k, and a QK-norm weight), and the same
p_j to the rows of W_q for every query head of j's group, so q.k is unchanged. The RoPE ops are
rewritten with the permutation (`channel_perm`): pair partners and frequencies follow their
channels, so the model without quantization computes exactly what it did before.
With `v_side`, the rows of W_v and the matching input columns of W_o are permuted the same way.

Channel scaling (`scale`, calibrated only) composes with the order: a channel stored divided by s
whose reader multiplies by s computes the same logits, and a shrunk outlier channel no longer
sets its block's exponent. Where the scale lives:
  post-RoPE keys  1/s folded into W_k rows (and b_k), s into the W_q rows of the group; s is constant
                  on each RoPE pair, since only such a scale commutes with the rotation. With
                  QK-norm the scales go into the per-head norm weights instead (the norm would
                  undo a scale of W_k), which is exact as well.
  pre-RoPE keys   (`pre_rope`, for bfp-kv pre_rope=True) 1/s folded into W_k (or the K norm), and a
                  `k * s` node before K's RoPE keeps the graph exact; bfp-kv moves s into the
                  key_rope table, so the attention kernels multiply it back before rotating. Any
                  s per channel is exact there. The order keeps a key-RoPE layout (kernels/rope.py).
  V               1/s folded into W_v rows, s into the matching W_o columns (any s per channel).

Metrics:
  weight_norm  the paper's: descending L2 norm of W_k rows (no data).
  calibrated   minimise the expected squared attention-logit error caused by quantizing K on
               calibration text, sum_n e_n^T C e_n with e_n the error the reader sees (pre-RoPE:
               rotated to the key's position) and C = E[q q^T] over the queries of the KV head's group,
               for the configured format and block (V side: C = W_o^T W_o over the group's columns).
               The search (passes/ksort_search.py) only accepts improvements from the identity, so the
               result is never worse than the current order on this objective.

Requires: role/layer metadata (q_proj, k_proj, v_proj, o_proj, rope). Run before bfp-kv.
Guarantees: logits unchanged without quantization; rope nodes carry channel_perm buffers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxforge.ir.capture import annotate, meta, nodes_by_role, spec_of
from fxforge.ir.model import Model, build_batch
from fxforge.ir.ops import ROPE
from fxforge.kernels.bfp import parse_kv_format
from fxforge.kernels.rope import is_key_rope_layout, key_rope_table
from fxforge.passes.calibration import calibration_windows
from fxforge.passes.ksort_search import Problem, rope_rotation, search
from fxforge.passes.manager import PassConfig, PassResult, register_pass

K_SCALE = "k_channel_scale"  # buffer of the `k * s` node of pre-RoPE scales, [Hkv, D] in storage order


class KSortMetric(str, enum.Enum):
    WEIGHT_NORM = "weight_norm"
    CALIBRATED = "calibrated"


@dataclass(frozen=True)
class KSort(PassConfig):
    """metric: weight_norm | calibrated; k_format/v_format/block: the formats `calibrated` optimises for;
    permute / scale: which transforms to search (scale needs calibrated); pre_rope: optimise for a
    pre-RoPE key cache (bfp-kv pre_rope=True)."""

    metric: KSortMetric = KSortMetric.WEIGHT_NORM
    k_format: str = "bfp12"
    v_format: str = "bfp16"
    block: int = 32
    v_side: bool = False
    calib_tokens: int = 8192
    context: int = 512
    search_steps: int = 64
    permute: bool = True
    scale: bool = False
    pre_rope: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name in ("k_format", "v_format"):
            fmt = parse_kv_format(getattr(self, name), None if "_" in getattr(self, name) else self.block)
            if fmt.is_dense and (name == "k_format" or self.v_side):
                raise ValueError(f"{name}={getattr(self, name)!r} is not a block format; ksort needs one "
                                 "of bfp12, bfp14, bfp16, mxfp4")
        if self.calib_tokens < self.context or self.context < 2:
            raise ValueError(f"calib_tokens={self.calib_tokens} must be >= context={self.context} >= 2")
        if not (self.permute or self.scale):
            raise ValueError("permute=False and scale=False leave nothing to do; enable one of them")
        calibrated = self.metric is KSortMetric.CALIBRATED
        if (self.scale or self.pre_rope or not self.permute) and not calibrated:
            given = "scale=True" if self.scale else ("pre_rope=True" if self.pre_rope else "permute=False")
            raise ValueError(f"{given} needs metric='calibrated' (scales and pre-RoPE orders are chosen on "
                             f"calibration data), got metric={self.metric.value!r}")

    def fmt(self, which: str):
        value = self.k_format if which == "k" else self.v_format
        return parse_kv_format(value, None if "_" in value else self.block)


def _check(config: KSort, spec) -> None:
    config.fmt("k").check_head_dim(spec.head_dim)
    if config.v_side:
        config.fmt("v").check_head_dim(spec.head_dim)


def _rewrites(config: KSort) -> tuple[str, ...]:
    """Rows of W_q / W_k (and their biases and QK-norms); W_v rows and W_o columns with v_side."""
    k_side = ("layers.*.attn.q_proj.*", "layers.*.attn.k_proj.*", "layers.*.attn.q_norm.*", "layers.*.attn.k_norm.*")
    return k_side + (("layers.*.attn.v_proj.*", "layers.*.attn.o_proj.*") if config.v_side else ())


@dataclass
class _Layout:
    """What ksort applies to one layer: orders and scales (None: unchanged), indexed like the
    layer's current layout (see ksort_search)."""

    k_perm: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_perm: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@register_pass("ksort", KSort, check=_check, rewrites=_rewrites)
def ksort(gm: fx.GraphModule, config: KSort, ctx) -> PassResult:
    """Permute (and scale) K (and V) channels per KV head; RoPE follows exactly."""
    spec = spec_of(gm)
    identity = torch.arange(spec.head_dim).repeat(spec.num_kv_heads, 1)
    report: dict = {"metric": config.metric.value}
    ones = torch.ones(spec.num_kv_heads, spec.head_dim)
    unchanged = _Layout(identity, ones if config.scale else None, identity if config.v_side else None,
                        ones if config.scale and config.v_side else None)
    if ctx.restoring:  # structure only: the saved weights and buffers overwrite all values
        layouts = [unchanged] * spec.num_layers
    elif config.metric is KSortMetric.WEIGHT_NORM:
        if _spans_head_dim(config, spec):  # one block per row: every order quantizes alike
            layouts = [unchanged] * spec.num_layers
            report["skipped"] = f"block {config.fmt('k').block} spans head_dim {spec.head_dim}: no order can help"
        else:
            layouts = [_Layout(_weight_norm_perm(gm, layer, "k", spec), None,
                               _weight_norm_perm(gm, layer, "v", spec) if config.v_side else None)
                       for layer in range(spec.num_layers)]
    else:
        layouts, report["layers"] = _calibrated_layouts(gm, config, ctx, spec)
    moved = scaled = 0
    for layer, layout in enumerate(layouts):
        _apply_k(gm, layer, layout.k_perm, spec)
        if config.pre_rope and layout.k_scale is not None:
            _set_pre_rope_scale(gm, layer, _in_new_order(layout.k_scale, layout.k_perm), spec)
        elif layout.k_scale is not None:
            _scale_qk(gm, layer, _in_new_order(layout.k_scale, layout.k_perm), spec)
        if layout.v_perm is not None:
            _apply_v(gm, layer, layout.v_perm, spec)
        if layout.v_scale is not None:
            _scale_v(gm, layer, _in_new_order(layout.v_scale, layout.v_perm), spec)
        moved += int((layout.k_perm != identity).sum())
        moved += int((layout.v_perm != identity).sum()) if layout.v_perm is not None else 0
        scaled += sum(int((s != 1).sum()) for s in (layout.k_scale, layout.v_scale) if s is not None)
    annotate(gm, spec)
    report["channels_moved"] = moved
    if config.scale:
        report["channels_scaled"] = scaled
    return PassResult(gm, moved > 0 or scaled > 0 or ctx.restoring, report)


def _spans_head_dim(config: KSort, spec) -> bool:
    return config.fmt("k").block >= spec.head_dim and (not config.v_side or config.fmt("v").block >= spec.head_dim)


def _in_new_order(scale: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Scales indexed by current channel -> by channel after the permutation."""
    return scale.gather(1, perm.to(scale.device))


# -- applying orders and scales --------------------------------------------------------------------

def _rows(perm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Flat row index: new row h*D + c takes old row h*D + perm[h, c]."""
    return (torch.arange(perm.shape[0])[:, None] * head_dim + perm).flatten()


def _permute_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight.data = linear.weight.data[rows].contiguous()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[rows].contiguous()


def _scale_rows(linear: torch.nn.Linear, factor: torch.Tensor) -> None:
    """Output row i times factor[i] (weight and bias)."""
    factor = factor.flatten().to(linear.weight.device, linear.weight.dtype)
    linear.weight.data = linear.weight.data * factor[:, None]
    if linear.bias is not None:
        linear.bias.data = linear.bias.data * factor


def _per_head(norm, heads: int) -> torch.Tensor:
    """A QK-norm weight as [H, D] (it is [D] until a pass makes it per head)."""
    weight = norm.weight.data
    return weight.expand(heads, -1) if weight.dim() == 1 else weight


def _permute_head_norm(norm, perm: torch.Tensor) -> None:
    """QK-norm weight [D] (or [H, D]) -> per-head permuted [H, D]."""
    weight = _per_head(norm, perm.shape[0])
    norm.weight = torch.nn.Parameter(weight.gather(1, perm.to(weight.device)).contiguous())


def _apply_k(gm: fx.GraphModule, layer: int, k_perm: torch.Tensor, spec) -> None:
    attn = gm.get_submodule(f"layers.{layer}.attn")
    q_perm = k_perm.repeat_interleave(spec.group_size, dim=0)
    _permute_rows(attn.k_proj, _rows(k_perm, spec.head_dim))
    _permute_rows(attn.q_proj, _rows(q_perm, spec.head_dim))
    if spec.qk_norm:
        _permute_head_norm(attn.k_norm, k_perm)
        _permute_head_norm(attn.q_norm, q_perm)
    if hasattr(attn, K_SCALE):  # pre-RoPE scales travel with their channels
        attn.register_buffer(K_SCALE, _in_new_order(getattr(attn, K_SCALE), k_perm))
    for node in nodes_by_role(gm, "rope", layer):
        perm = k_perm if meta(node).tensor == "k" else q_perm
        _compose_rope_perm(gm, node, attn, f"{meta(node).tensor}_channel_perm", perm)


def _compose_rope_perm(gm: fx.GraphModule, node: fx.Node, attn, buffer: str, perm: torch.Tensor) -> None:
    """The channel now at c held channel perm[c] before; its original channel is old[perm[c]]."""
    old = node.args[4]
    perm = perm.to(attn.inv_freq.device)
    if isinstance(old, fx.Node):
        perm = gm.get_buffer(old.target).gather(1, perm)
    attn.register_buffer(buffer, perm.clone().contiguous())  # never alias another layer's buffer
    if not isinstance(old, fx.Node):
        with gm.graph.inserting_before(node):
            getter = gm.graph.get_attr(f"layers.{meta(node).layer}.attn.{buffer}")
        node.update_arg(4, getter)


def _scale_qk(gm: fx.GraphModule, layer: int, scale: torch.Tensor, spec) -> None:
    """Post-RoPE keys divided by `scale` [Hkv, D] (new order, constant on RoPE pairs), queries times it."""
    attn = gm.get_submodule(f"layers.{layer}.attn")
    q_scale = scale.repeat_interleave(spec.group_size, dim=0)
    if spec.qk_norm:  # the norm would undo a scale of W_k: scale its weight instead
        for norm, factor in ((attn.k_norm, 1 / scale), (attn.q_norm, q_scale)):
            weight = _per_head(norm, factor.shape[0])
            norm.weight = torch.nn.Parameter((weight * factor.to(weight.device, weight.dtype)).contiguous())
    else:
        _scale_rows(attn.k_proj, 1 / scale)
        _scale_rows(attn.q_proj, q_scale)


def _k_stored_by(attn, spec):
    """The module whose output rows are the stored keys: the K norm with QK-norm, else W_k."""
    return attn.k_norm if spec.qk_norm else attn.k_proj


def _set_pre_rope_scale(gm: fx.GraphModule, layer: int, scale: torch.Tensor, spec) -> None:
    """Pre-RoPE keys stored divided by `scale` [Hkv, D] (the total scale, in the layer's order after
    _apply_k), and a `k * scale` node before K's RoPE: the stored values change, the rotated keys do
    not. An earlier scale (the buffer, already in that order) is divided out of W_k first."""
    attn = gm.get_submodule(f"layers.{layer}.attn")
    (rope,) = [n for n in nodes_by_role(gm, "rope", layer) if meta(n).tensor == "k"]
    old = getattr(attn, K_SCALE) if hasattr(attn, K_SCALE) else torch.ones_like(scale)
    ratio = (old / scale.to(old.device)).to(attn.k_proj.weight.dtype)
    if spec.qk_norm:
        weight = _per_head(attn.k_norm, spec.num_kv_heads)
        attn.k_norm.weight = torch.nn.Parameter((weight * ratio.to(weight.device)).contiguous())
    else:
        _scale_rows(attn.k_proj, ratio)
    attn.register_buffer(K_SCALE, scale.to(attn.inv_freq.device, torch.float32).contiguous())
    k_in = rope.args[0]
    if not _is_scale_node(k_in):
        with gm.graph.inserting_before(rope):
            getter = gm.graph.get_attr(f"layers.{layer}.attn.{K_SCALE}")
            scaled = gm.graph.call_function(torch.mul, (k_in, getter))
        rope.update_arg(0, scaled)


def _is_scale_node(node) -> bool:
    """True for the `k * k_channel_scale` node that pre-RoPE scales put before K's RoPE."""
    return (isinstance(node, fx.Node) and node.target is torch.mul and isinstance(node.args[1], fx.Node)
            and node.args[1].op == "get_attr" and node.args[1].target.endswith(f".{K_SCALE}"))


def _apply_v(gm: fx.GraphModule, layer: int, v_perm: torch.Tensor, spec) -> None:
    attn = gm.get_submodule(f"layers.{layer}.attn")
    _permute_rows(attn.v_proj, _rows(v_perm, spec.head_dim))
    cols = _rows(v_perm.repeat_interleave(spec.group_size, dim=0), spec.head_dim).to(attn.o_proj.weight.device)
    attn.o_proj.weight.data = attn.o_proj.weight.data[:, cols].contiguous()


def _scale_v(gm: fx.GraphModule, layer: int, scale: torch.Tensor, spec) -> None:
    """V divided by `scale` [Hkv, D] (new order): W_v rows / s, the W_o columns that read them * s."""
    attn = gm.get_submodule(f"layers.{layer}.attn")
    _scale_rows(attn.v_proj, 1 / scale)
    cols = scale.repeat_interleave(spec.group_size, dim=0).flatten()
    attn.o_proj.weight.data = attn.o_proj.weight.data * cols.to(attn.o_proj.weight.device, attn.o_proj.weight.dtype)


# -- metrics ----------------------------------------------------------------------------------------

def _weight_norm_perm(gm: fx.GraphModule, layer: int, which: str, spec) -> torch.Tensor:
    weight = gm.get_submodule(f"layers.{layer}.attn.{which}_proj").weight.detach().float().cpu()
    norms = weight.view(spec.num_kv_heads, spec.head_dim, -1).norm(dim=-1)
    return norms.argsort(dim=-1, descending=True, stable=True)


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps, per layer, post-RoPE q and k, K's RoPE input (pre-RoPE keys in the
    stored channel order, unscaled) and the v projection (float32, on the model's device)."""

    def __init__(self, gm, keep: set[str]):
        super().__init__(gm)
        self.keep = keep
        self.seen: dict[tuple[str, int], list] = {}

    def run_node(self, node):
        result = super().run_node(node)
        m = meta(node)
        found = []
        if node.target is ROPE:
            found.append((m.tensor, result))
            if m.tensor == "k":
                found.append(("k_in", self.env[node.args[0]]))
        elif m.role == "v_proj":
            found.append(("v", result))
        for key, value in found:
            if key in self.keep:
                self.seen.setdefault((key, m.layer), []).append(value.detach().float())
        return result


@torch.no_grad()
def _record(gm: fx.GraphModule, windows: torch.Tensor, spec, keep=("q", "k", "v")) -> dict:
    """{(name, layer): [N, heads, D]} over every calibration window, name in `keep` (q, k, k_in, v)."""
    recorder = _Recorder(gm, set(keep))
    runner = Model(gm, spec)
    page_size = 16
    for window in windows:
        ids = window.tolist()
        pages = list(range((len(ids) + page_size - 1) // page_size))
        batch = build_batch([ids], [0], [pages], page_size, runner.device)
        recorder.run(*batch.args(), runner.new_kv_cache(len(pages), page_size))
    out = {key: torch.cat(parts) for key, parts in recorder.seen.items()}
    return {key: (v.view(v.shape[0], spec.num_kv_heads, spec.head_dim) if key[0] == "v" else v) for key, v in out.items()}


def _calibrated_layouts(gm: fx.GraphModule, config: KSort, ctx, spec):
    windows = calibration_windows(ctx, config.context, config.calib_tokens, "ksort metric=calibrated")
    keep = ("q", "k_in" if config.pre_rope else "k") + (("v",) if config.v_side else ())
    seen = _record(gm, windows, spec, keep)
    positions = torch.arange(windows.shape[1]).repeat(windows.shape[0])
    layouts, reports = [], []
    for layer in range(spec.num_layers):
        q = seen[("q", layer)].view(-1, spec.num_kv_heads, spec.group_size, spec.head_dim)
        cov = torch.einsum("nhgd,nhge->hde", q, q) / (q.shape[0] * q.shape[2])  # [Hkv, D, D] = E[q q^T]
        if config.pre_rope:
            k_perm, k_scale, k_rep = _pre_rope_keys(gm, layer, seen[("k_in", layer)], cov, positions, config, spec)
        else:
            problems = [Problem(seen[("k", layer)][:, h], cov[h], config.fmt("k"), "pairs" if config.scale else "free",
                                _rope_partners(gm, layer, spec)[h].to(cov.device)) for h in range(spec.num_kv_heads)]
            k_perm, k_scale, k_rep = _search_heads(problems, config, {"weight_norm": _weight_norm_perm(gm, layer, "k", spec)})
        layout = _Layout(k_perm, k_scale if config.scale else None)
        report = {"layer": layer, "k": k_rep}
        if config.v_side:
            cov_v = _o_proj_weight(gm, layer, spec).to(cov.device)
            problems = [Problem(seen[("v", layer)][:, h], cov_v[h], config.fmt("v"), "free")
                        for h in range(spec.num_kv_heads)]
            v_perm, v_scale, report["v"] = _search_heads(problems, config,
                                                         {"weight_norm": _weight_norm_perm(gm, layer, "v", spec)})
            layout.v_perm, layout.v_scale = v_perm, v_scale if config.scale else None
        layouts.append(layout)
        reports.append(report)
    return layouts, reports


def _search_heads(problems: list[Problem], config: KSort, start_orders: dict[str, torch.Tensor],
                  base: torch.Tensor | None = None):
    """Search every KV head; -> (perm [Hkv, D], scale [Hkv, D], report), indexed like the current
    layout. `base` [Hkv, D]: the problems are posed in the order base gives (pre-RoPE: a key-RoPE layout)."""
    perms, scales, picked, totals = [], [], {}, {"identity": 0.0, "chosen": 0.0}
    for head, problem in enumerate(problems):
        starts = {name: order[head] for name, order in start_orders.items()}
        perm, scale, rep = search(problem, config.permute, config.scale, config.search_steps, starts)
        if base is not None:
            head_base = base[head].to(perm.device)
            perm = head_base[perm]
            scale = torch.empty_like(scale).scatter_(0, head_base, scale)
        perms.append(perm.cpu())
        scales.append(scale.cpu())
        picked[rep.get("start", "identity")] = picked.get(rep.get("start", "identity"), 0) + 1
        totals["identity"] += rep["identity"]
        totals["chosen"] += rep["chosen"]
    report = {"objective_vs_identity": round(totals["chosen"] / max(totals["identity"], 1e-30), 4), "picked": picked}
    return torch.stack(perms), torch.stack(scales), report


def _pre_rope_keys(gm, layer: int, k_in: torch.Tensor, cov: torch.Tensor, positions: torch.Tensor, config: KSort,
                   spec):
    """Search pre-RoPE key layouts: from a key-RoPE layout (the current one, or the canonical one when
    the current is not), rotating each row's error to its position before weighting it with C."""
    (rope,) = [n for n in nodes_by_role(gm, "rope", layer) if meta(n).tensor == "k"]
    current = gm.get_buffer(rope.args[4].target).cpu() if isinstance(rope.args[4], fx.Node) else None
    base = canonical_key_order(current, spec)
    order = base if current is None else current.gather(1, base)
    inv_freq = gm.get_submodule(f"layers.{layer}.attn").inv_freq
    freq = key_rope_table(inv_freq, spec.rope_interleaved, order, spec.num_kv_heads, spec.head_dim)[:, 0]
    problems = []
    for h in range(spec.num_kv_heads):
        index = base[h].to(cov.device)
        cos, sin = rope_rotation(freq[h], positions.to(cov.device))
        problems.append(Problem(k_in[:, h][:, index], cov[h][index][:, index], config.fmt("k"), "slots",
                                cos=cos, sin=sin))
    return _search_heads(problems, config, {}, base)


def canonical_key_order(channel_perm: torch.Tensor | None, spec) -> torch.Tensor:
    """[Hkv, D] order to apply to a key layout (channel_perm, None: the model's own) so that it is a
    key-RoPE layout: the identity if it is one already, else the layout slot j = (pair j's first
    channel, its second) in original channels."""
    heads, dim = spec.num_kv_heads, spec.head_dim
    identity = torch.arange(dim).repeat(heads, 1)
    if is_key_rope_layout(channel_perm, spec.rope_interleaved, dim):
        return identity
    half = dim // 2
    slots = torch.arange(half)
    first, second = (2 * slots, 2 * slots + 1) if spec.rope_interleaved else (slots, slots + half)
    target = torch.cat((first, second)).repeat(heads, 1)  # original channel wanted at each position
    holder = identity if channel_perm is None else torch.empty_like(identity).scatter_(1, channel_perm.long().cpu(),
                                                                                        identity)
    return holder.gather(1, target)


def _rope_partners(gm, layer: int, spec) -> torch.Tensor:
    """[Hkv, D]: the channel that holds each channel's RoPE partner, in K's current layout."""
    (rope,) = [n for n in nodes_by_role(gm, "rope", layer) if meta(n).tensor == "k"]
    identity = torch.arange(spec.head_dim).repeat(spec.num_kv_heads, 1)
    perm = gm.get_buffer(rope.args[4].target).long().cpu() if isinstance(rope.args[4], fx.Node) else identity
    partner = perm ^ 1 if spec.rope_interleaved else (perm + spec.head_dim // 2) % spec.head_dim
    holder = torch.empty_like(perm).scatter_(1, perm, identity)
    return holder.gather(1, partner)


def _o_proj_weight(gm, layer: int, spec) -> torch.Tensor:
    """C for V [Hkv, D, D]: W_o's columns that read the KV head's channels, W_o^T W_o summed over the group."""
    w = gm.get_submodule(f"layers.{layer}.attn.o_proj").weight.detach().float().cpu()
    cols = w.view(w.shape[0], spec.num_kv_heads, spec.group_size, spec.head_dim)
    return torch.einsum("ohgd,ohge->hde", cols, cols)
