"""ksort: compile-time channel reordering for block-floating-point K (and optionally V) caches.

"Accurate Block Quantization in LLMs with Outliers" (Trukhanov & Soloveychik, 2024). Outlier
channels of K spoil the shared exponent of their block; permuting head_dim channels so that
channels of like magnitude share blocks shrinks the quantization error. Per KV head j, a
permutation p_j is applied to the output rows of W_k (and b_k, and a QK-norm weight), and the same
p_j to the rows of W_q for every query head of j's group, so q.k is unchanged. The RoPE ops are
rewritten with the permutation (`channel_perm`): pair partners and frequencies follow their
channels, so the model without quantization computes exactly what it did before.
With `v_side`, the rows of W_v and the matching input columns of W_o are permuted the same way.

Metrics:
  weight_norm  the paper's: descending L2 norm of W_k rows (no data).
  calibrated   minimise the expected squared attention-logit error caused by quantizing post-RoPE
               K on calibration text, sum_n e_n^T C e_n with e_n = k_n - Q(k_n) and C = E[q q^T]
               over the queries of the KV head's group, for the configured format and block (V side:
               C = W_o^T W_o over the group's columns). Candidates (identity, weight_norm, data-magnitude
               sorts, then greedy block swaps) are scored with the real quantizer; the identity is
               a candidate, so the result is never worse than natural order on this objective.

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
from fxforge.ir.tokenizer import token_windows
from fxforge.kernels.bfp import parse_kv_format, simulate_quantize
from fxforge.ir.errors import PassConfigError
from fxforge.passes.manager import PassConfig, PassResult, register_pass


class KSortMetric(str, enum.Enum):
    WEIGHT_NORM = "weight_norm"
    CALIBRATED = "calibrated"


@dataclass(frozen=True)
class KSort(PassConfig):
    """metric: weight_norm | calibrated; k_format/v_format/block: the formats `calibrated` optimises for."""

    metric: KSortMetric = KSortMetric.WEIGHT_NORM
    k_format: str = "bfp12"
    v_format: str = "bfp16"
    block: int = 32
    v_side: bool = False
    calib_tokens: int = 8192
    context: int = 512
    search_steps: int = 64

    def __post_init__(self):
        super().__post_init__()
        for name in ("k_format", "v_format"):
            fmt = parse_kv_format(getattr(self, name), None if "_" in getattr(self, name) else self.block)
            if fmt.is_dense and (name == "k_format" or self.v_side):
                raise ValueError(f"{name}={getattr(self, name)!r} is not a block format; ksort needs one "
                                 "of bfp12, bfp14, bfp16, mxfp4")
        if self.calib_tokens < self.context or self.context < 2:
            raise ValueError(f"calib_tokens={self.calib_tokens} must be >= context={self.context} >= 2")

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


@register_pass("ksort", KSort, check=_check, rewrites=_rewrites)
def ksort(gm: fx.GraphModule, config: KSort, ctx) -> PassResult:
    """Permute K (and V) channels per KV head; RoPE follows exactly."""
    spec = spec_of(gm)
    identity = torch.arange(spec.head_dim).repeat(spec.num_kv_heads, 1)
    report: dict = {"metric": config.metric.value}
    if ctx.restoring:  # structure only: the saved weights and permutation buffers overwrite all values
        perms = [(identity, identity if config.v_side else None)] * spec.num_layers
    elif config.fmt("k").block >= spec.head_dim and (not config.v_side or config.fmt("v").block >= spec.head_dim):
        # one block per row: every order quantizes to the same values, so reordering gains nothing
        perms = [(identity, identity if config.v_side else None)] * spec.num_layers
        report["skipped"] = f"block {config.fmt('k').block} spans head_dim {spec.head_dim}: no order can help"
    elif config.metric is KSortMetric.WEIGHT_NORM:
        perms = [(_weight_norm_perm(gm, layer, "k", spec), _weight_norm_perm(gm, layer, "v", spec) if config.v_side else None)
                 for layer in range(spec.num_layers)]
    else:
        perms, report["layers"] = _calibrated_perms(gm, config, ctx, spec)
    moved = 0
    for layer, (k_perm, v_perm) in enumerate(perms):
        _apply_k(gm, layer, k_perm, spec)
        if v_perm is not None:
            _apply_v(gm, layer, v_perm, spec)
        moved += int((k_perm != identity).sum()) + (int((v_perm != identity).sum()) if v_perm is not None else 0)
    annotate(gm, spec)
    report["channels_moved"] = moved
    return PassResult(gm, moved > 0 or ctx.restoring, report)


# -- applying a permutation ------------------------------------------------------------------------

def _rows(perm: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Flat row index: new row h*D + c takes old row h*D + perm[h, c]."""
    return (torch.arange(perm.shape[0])[:, None] * head_dim + perm).flatten()


def _permute_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight.data = linear.weight.data[rows].contiguous()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[rows].contiguous()


def _permute_head_norm(norm, perm: torch.Tensor) -> None:
    """QK-norm weight [D] (or [H, D]) -> per-head permuted [H, D]."""
    weight = norm.weight.data
    weight = weight.expand(perm.shape[0], -1) if weight.dim() == 1 else weight
    norm.weight = torch.nn.Parameter(weight.gather(1, perm.to(weight.device)).contiguous())


def _apply_k(gm: fx.GraphModule, layer: int, k_perm: torch.Tensor, spec) -> None:
    attn = gm.get_submodule(f"layers.{layer}.attn")
    q_perm = k_perm.repeat_interleave(spec.group_size, dim=0)
    _permute_rows(attn.k_proj, _rows(k_perm, spec.head_dim))
    _permute_rows(attn.q_proj, _rows(q_perm, spec.head_dim))
    if spec.qk_norm:
        _permute_head_norm(attn.k_norm, k_perm)
        _permute_head_norm(attn.q_norm, q_perm)
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


def _apply_v(gm: fx.GraphModule, layer: int, v_perm: torch.Tensor, spec) -> None:
    attn = gm.get_submodule(f"layers.{layer}.attn")
    _permute_rows(attn.v_proj, _rows(v_perm, spec.head_dim))
    cols = _rows(v_perm.repeat_interleave(spec.group_size, dim=0), spec.head_dim).to(attn.o_proj.weight.device)
    attn.o_proj.weight.data = attn.o_proj.weight.data[:, cols].contiguous()


# -- metrics ----------------------------------------------------------------------------------------

def _weight_norm_perm(gm: fx.GraphModule, layer: int, which: str, spec) -> torch.Tensor:
    weight = gm.get_submodule(f"layers.{layer}.attn.{which}_proj").weight.detach().float().cpu()
    norms = weight.view(spec.num_kv_heads, spec.head_dim, -1).norm(dim=-1)
    return norms.argsort(dim=-1, descending=True, stable=True)


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps, per layer, post-RoPE q and k and the v projection (CPU, float32)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seen: dict[tuple[str, int], list] = {}

    def run_node(self, node):
        result = super().run_node(node)
        m = meta(node)
        key = m.tensor if node.target is ROPE else ("v" if m.role == "v_proj" else None)
        if key is not None:
            self.seen.setdefault((key, m.layer), []).append(result.detach().float())
        return result


@torch.no_grad()
def _record(gm: fx.GraphModule, windows: torch.Tensor, spec) -> dict[tuple[str, int], torch.Tensor]:
    """{("q"|"k"|"v", layer): [N, heads, D]} over every calibration window."""
    recorder = _Recorder(gm)
    runner = Model(gm, spec)
    page_size = 16
    for window in windows:
        ids = window.tolist()
        pages = list(range((len(ids) + page_size - 1) // page_size))
        batch = build_batch([ids], [0], [pages], page_size, runner.device)
        recorder.run(*batch.args(), runner.new_kv_cache(len(pages), page_size))
    out = {key: torch.cat(parts) for key, parts in recorder.seen.items()}
    return {key: (v.view(v.shape[0], spec.num_kv_heads, spec.head_dim) if key[0] == "v" else v) for key, v in out.items()}


def _objective(x: torch.Tensor, cov: torch.Tensor, fmt) -> float:
    """sum_n e_n^T C e_n: the expected squared attention-logit error of quantizing x [N, D], where
    C [D, D] = E[q q^T] over the queries that read x (x and C already in the candidate order)."""
    err = x - simulate_quantize(x, fmt)
    return float(((err @ cov) * err).sum())


def _calibrated_perms(gm: fx.GraphModule, config: KSort, ctx, spec):
    if not ctx.calib:
        raise PassConfigError("ksort metric=calibrated needs calibration data: pass calib=[texts or token id lists] "
                              "to fxforge.optimize (the CLI uses the calibration split of --data)")
    if all(isinstance(c, str) for c in ctx.calib):
        if ctx.model is None or ctx.model.tokenizer is None:
            raise PassConfigError("calibration texts need a tokenizer; this model has none: pass token id lists")
        windows = token_windows(ctx.model.tokenizer, ctx.calib, config.context, config.calib_tokens)
    else:
        windows = torch.tensor([list(c) for c in ctx.calib])
    seen = _record(gm, windows, spec)
    perms, layer_reports = [], []
    for layer in range(spec.num_layers):
        q = seen[("q", layer)].view(-1, spec.num_kv_heads, spec.group_size, spec.head_dim)
        k_weight = torch.einsum("nhgd,nhge->hde", q, q) / (q.shape[0] * q.shape[2])  # [Hkv, D, D] = E[q q^T]
        k_perm, k_rep = _search(seen[("k", layer)], k_weight, _weight_norm_perm(gm, layer, "k", spec), config.fmt("k"),
                                config.search_steps)
        v_perm, v_rep = None, None
        if config.v_side:
            v_perm, v_rep = _search(seen[("v", layer)], _o_proj_weight(gm, layer, spec).to(q.device),
                                    _weight_norm_perm(gm, layer, "v", spec), config.fmt("v"), config.search_steps)
        perms.append((k_perm, v_perm))
        layer_reports.append({"layer": layer, "k": k_rep, **({"v": v_rep} if v_rep else {})})
    return perms, layer_reports


def _o_proj_weight(gm, layer: int, spec) -> torch.Tensor:
    """C for V [Hkv, D, D]: W_o's columns that read the KV head's channels, W_o^T W_o summed over the group."""
    w = gm.get_submodule(f"layers.{layer}.attn.o_proj").weight.detach().float().cpu()
    cols = w.view(w.shape[0], spec.num_kv_heads, spec.group_size, spec.head_dim)
    return torch.einsum("ohgd,ohge->hde", cols, cols)


def _search(x: torch.Tensor, weight: torch.Tensor, weight_norm_perm: torch.Tensor, fmt, steps: int):
    """Per KV head: best of the candidate orders, refined by greedy block swaps. x [N, Hkv, D]."""
    perms, scores = [], {"identity": 0.0, "chosen": 0.0}
    picked: dict[str, int] = {}
    for head in range(x.shape[1]):
        xh, ch = x[:, head], weight[head]
        candidates = _candidates(xh, ch.diagonal(), weight_norm_perm[head])
        scored = {name: _objective(xh[:, p], ch[p][:, p], fmt) for name, p in candidates.items()}
        start = min(scored, key=scored.get)
        refined = _greedy_swaps(xh, ch, candidates[start], fmt, steps)
        refined_score = _objective(xh[:, refined], ch[refined][:, refined], fmt)
        if refined_score < scored[start]:
            best, best_score, name = refined, refined_score, f"{start}+swaps"
        else:
            best, best_score, name = candidates[start], scored[start], start
        perms.append(best)
        picked[name] = picked.get(name, 0) + 1
        scores["identity"] += scored["identity"]
        scores["chosen"] += best_score
    report = {"objective_vs_identity": round(scores["chosen"] / max(scores["identity"], 1e-30), 4), "picked": picked}
    return torch.stack(perms).cpu(), report


def _candidates(x: torch.Tensor, weight: torch.Tensor, weight_norm_perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Channel orders worth scoring: identity, the paper's, and sorts by data magnitude statistics."""
    absx = x.abs()
    stats = {"rms": x.pow(2).mean(dim=0), "max": absx.amax(dim=0), "mean_abs": absx.mean(dim=0),
             "p99": absx.quantile(0.99, dim=0) if x.shape[0] <= 16_000_000 // x.shape[1] else absx.amax(dim=0)}
    out = {"identity": torch.arange(x.shape[1], device=x.device), "weight_norm": weight_norm_perm.to(x.device)}
    for name, stat in stats.items():
        out[name] = stat.argsort(descending=True, stable=True)
        out[f"weighted_{name}"] = (stat * weight).argsort(descending=True, stable=True)
    return out


def _greedy_swaps(x: torch.Tensor, cov: torch.Tensor, perm: torch.Tensor, fmt, steps: int,
                  patience: int = 12) -> torch.Tensor:
    """Swap channels between blocks while the real objective (on a row sample) falls.

    On CUDA every cross-block swap is scored at each step (a 2-opt local optimum); on CPU a random
    subset of 32 swaps per step keeps the search affordable.
    """
    dim, block = x.shape[1], fmt.block
    if block >= dim or steps <= 0:
        return perm
    on_gpu = x.is_cuda
    sample_rows = 2048 if on_gpu else 1024
    sample = x[torch.linspace(0, x.shape[0] - 1, min(x.shape[0], sample_rows), device=x.device).long()]
    a_all, b_all = torch.triu_indices(dim, dim, offset=1, device=x.device)
    cross = (a_all // block) != (b_all // block)
    a_all, b_all = a_all[cross], b_all[cross]
    perm = perm.clone().to(x.device)
    current = _objective(sample[:, perm], cov[perm][:, perm], fmt)
    gen = torch.Generator().manual_seed(0)
    stale = 0
    for _ in range(steps):
        if on_gpu:
            a, b = a_all, b_all
        else:
            pick = torch.randint(0, len(a_all), (32,), generator=gen)
            a, b = a_all[pick], b_all[pick]
        errors = _swap_errors(sample, cov, perm, a, b, fmt)
        best = int(errors.argmin())
        if float(errors[best]) >= current:
            stale += 1
            if on_gpu or stale >= patience:  # on GPU the whole neighbourhood was scored: local optimum
                break
            continue
        perm = perm.clone()
        perm[a[best]], perm[b[best]] = perm[b[best]].clone(), perm[a[best]].clone()
        current, stale = float(errors[best]), 0
    return perm


def _swap_errors(sample, cov, perm, a, b, fmt, chunk: int = 128) -> torch.Tensor:
    """Objective after swapping positions a[i] and b[i] of perm, for every i (chunked)."""
    out = []
    for start in range(0, len(a), chunk):
        ai, bi = a[start:start + chunk], b[start:start + chunk]
        trial = perm.repeat(len(ai), 1)
        index = torch.arange(len(ai), device=perm.device)
        trial[index, ai], trial[index, bi] = perm[bi], perm[ai]
        xs = sample[:, trial].permute(1, 0, 2)  # [swaps, N, D]
        err = xs - simulate_quantize(xs, fmt)
        cov_trial = cov[trial[:, :, None], trial[:, None, :]]
        out.append((torch.bmm(err, cov_trial) * err).sum(dim=(1, 2)))
    return torch.cat(out)
