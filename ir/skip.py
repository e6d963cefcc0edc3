"""SkipDecode graphs: the schedule of active layers per generated position, and a forward that runs it.

SkipDecode (Del Corro et al. 2023): at generated position t every sequence runs the same number of
layers, non-increasing in t. Prompts are prefilled at full depth. A token at generated position t
(the t-th token fed back after the prompt, at absolute position prompt_len + t) runs the `warmup`
lowest layers, which always run, plus the top a(t) layers; the lower/middle layers between them are
the ones it skips. Layer l therefore runs at depth d = warmup + a(t) iff l < warmup or
l >= N - a(t). Because a(t) only falls, the layers a token runs are a subset of those every earlier
token ran: no token ever reads KV that an earlier one skipped (`missing_kv` checks this by
simulation), and inside a chunk of consecutive positions the tokens that run a layer are a prefix.

The pass (passes/skip_decode.py) records the schedule as `gm.meta["skip_decode"]`, a `SkipSchedule`.
`SkipModel` splits any graph (after passes and lowering) into `embed`, one module per layer and
`head`, and runs them with per-token depths: `forward` (any depths, rows that skip a layer keep
their hidden state and write no KV) and `forward_depth` (one depth for every row, capturable as a
CUDA graph).
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.fx as fx

from fxforge.ir.recursive import _ancestors, _descendants, _extract, _single

SKIP_KEY = "skip_decode"
DECAYS = ("linear", "step", "custom")


@dataclass(frozen=True)
class SkipSchedule:
    """a(t) of a model of `num_layers` layers: `top_layers[t]` for t < len(top_layers), its last value
    after that (JSON-able data; `check()` enforces every invariant)."""

    num_layers: int
    warmup: int
    min_layers: int
    max_layers: int
    decay: str
    span: int
    top_layers: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "top_layers", tuple(int(a) for a in self.top_layers))

    def top(self, t: int) -> int:
        """a(t): top layers a token at generated position t runs."""
        return self.top_layers[min(t, len(self.top_layers) - 1)]

    def depth(self, t: int) -> int:
        """Layers a token at generated position t runs (warm-up included)."""
        return self.warmup + self.top(t)

    def layers_at_depth(self, depth: int) -> list[int]:
        """The layers a token of `depth` active layers runs (depth N: all of them)."""
        skipped = self.num_layers - depth
        return [layer for layer in range(self.num_layers) if layer < self.warmup or layer >= self.warmup + skipped]

    def token_depths(self, positions: np.ndarray, prompt_len: int) -> np.ndarray:
        """Depth of each token at absolute `positions` of a sequence whose prompt has prompt_len tokens."""
        table = np.asarray(self.top_layers, dtype=np.int64) + self.warmup
        generated = np.asarray(positions, dtype=np.int64) - prompt_len
        depths = table[np.clip(generated, 0, len(table) - 1)]
        return np.where(generated < 0, self.num_layers, depths)

    def depths(self) -> list[int]:
        """The distinct depths generated tokens run, deepest first."""
        return sorted({self.warmup + a for a in self.top_layers}, reverse=True)

    def mean_depth(self) -> float:
        """Average active layers of a generated token over the span."""
        return self.warmup + sum(self.top(t) for t in range(self.span)) / self.span

    def speedup(self) -> float:
        """Layer ratio N / mean depth over the span (the decode speed-up if time were per layer)."""
        return self.num_layers / self.mean_depth()

    def check(self) -> None:
        """Raise ValueError naming the first broken invariant: bounds, monotonicity, valid KV."""
        n, w = self.num_layers, self.warmup
        if not 0 <= w < n:
            raise ValueError(f"warm-up layers {w} must be in 0..{n - 1} (the model has {n} layers)")
        if not 1 <= self.min_layers <= self.max_layers <= n - w:
            raise ValueError(f"active top layers must satisfy 1 <= min ({self.min_layers}) <= max ({self.max_layers}) "
                             f"<= layers - warm-up ({n} - {w} = {n - w})")
        if not self.top_layers or self.span < 1:
            raise ValueError("the schedule spans no generated position; span must be >= 1")
        outside = [a for a in self.top_layers if not self.min_layers <= a <= self.max_layers]
        if outside:
            raise ValueError(f"schedule values {outside[:5]} lie outside [min, max] = "
                             f"[{self.min_layers}, {self.max_layers}]")
        missing = missing_kv(self, prompt_len=1, generated=len(self.top_layers) + 1)
        if missing:
            layer, position, earlier = missing
            raise ValueError(f"the schedule is not non-increasing: the token at position {position} runs layer "
                             f"{layer}, whose KV the earlier token at position {earlier} skipped (a(t) = "
                             f"{list(self.top_layers[:12])}{'...' if len(self.top_layers) > 12 else ''})")

    def to_dict(self) -> dict:
        return {**asdict(self), "top_layers": list(self.top_layers)}

    @classmethod
    def from_dict(cls, values: dict) -> "SkipSchedule":
        return cls(**{**values, "top_layers": tuple(values["top_layers"])})


def build_schedule(num_layers: int, warmup: int, min_layers: int, max_layers: int, decay: str, span: int,
                   top_layers: tuple[int, ...] = (), levels: int = 2) -> SkipSchedule:
    """The schedule of `decay` from max_layers at t = 0 down to min_layers (checked).

    linear: round(max + (min - max) * t / (span - 1)) for t < span (the paper's decay);
    step:   `levels` equal stairs over the span, from max down to min (2: max for the first half, min
            after), so generated tokens run only `levels` depths; custom: `top_layers` as given.
    After the span every token runs min_layers (custom: the last value).
    """
    table = tuple(top_layers) if decay == "custom" else decay_table(decay, min_layers, max_layers, span, levels)
    schedule = SkipSchedule(num_layers, warmup, min_layers, max_layers, decay, span, table)
    schedule.check()
    return schedule


def decay_table(decay: str, min_layers: int, max_layers: int, span: int, levels: int = 2) -> tuple[int, ...]:
    """a(t) for t = 0..span (the last entry: min_layers, what every later token runs)."""
    if decay == "step":
        if levels < 2:
            raise ValueError(f"a step decay needs levels >= 2, got {levels}")
        stairs = (int(round(max_layers + (min_layers - max_layers) * (t * levels // span) / (levels - 1)))
                  for t in range(span))
        return tuple(stairs) + (min_layers,)
    if decay != "linear":
        raise ValueError(f"decay {decay!r} is not one of {DECAYS}")
    steps = max(1, span - 1)
    return tuple(int(round(max_layers + (min_layers - max_layers) * t / steps)) for t in range(span)) + (min_layers,)


def missing_kv(schedule: SkipSchedule, prompt_len: int, generated: int) -> tuple[int, int, int] | None:
    """Simulate one sequence (prompt_len prompt tokens at full depth, then `generated` tokens fed back)
    and return the first (layer, position, earlier position) where a token runs a layer whose KV an
    earlier position never wrote; None when every read finds its KV."""
    written = [0] * schedule.num_layers  # per layer: how many leading positions hold KV
    depths = schedule.token_depths(np.arange(prompt_len + generated), prompt_len)
    for position, depth in enumerate(depths.tolist()):
        for layer in schedule.layers_at_depth(depth):
            if written[layer] < position:  # positions are visited in order: a gap is a skipped token
                return layer, position, written[layer]
            written[layer] = position + 1
    return None


def skip_schedule(module) -> SkipSchedule | None:
    """The SkipSchedule of a graph (or of a Model over one); None when it has none."""
    module = getattr(module, "module", module)
    return getattr(module, "meta", {}).get(SKIP_KEY)


# -- a forward that runs per-token depths ------------------------------------------------------------

class SkipModel:
    """A graph split into `embed`, `layers[l]` and `head` over its own modules and tensors.

    layers[l](hidden, positions, slot_mapping, page_table, query_start, seq_lens, k_data, k_scale, v_data,
    v_scale) -> hidden is what depth l of the graph computes; `schedule` is the model's (or None).
    """

    def __init__(self, model):
        self.model = model
        self.spec = model.spec
        self.schedule = skip_schedule(model)
        module = model.module
        if not isinstance(module, fx.GraphModule):
            from fxforge.ir.capture import capture

            module = capture(module)
        self.embed, self.layers, self.head = split_layers(module, self.spec.num_layers)

    def _layer(self, layer: int, hidden, batch, kv_cache):
        base = 4 * layer
        return self.layers[layer](hidden, batch.positions, batch.slot_mapping, batch.page_table, batch.query_start,
                                  batch.seq_lens, *kv_cache[base:base + 4])

    def forward_depth(self, batch, kv_cache: list[torch.Tensor], depth: int, layer_batches=None) -> torch.Tensor:
        """Every token of `batch` runs `depth` layers (schedule.layers_at_depth) -> logits of logits_indices.
        `layer_batches[l]`, if given, is the batch layer l reads (its own slots and page table)."""
        layers = self.schedule.layers_at_depth(depth) if self.schedule else range(self.spec.num_layers)
        hidden = self.embed(batch.input_ids)
        for layer in layers:
            hidden = self._layer(layer, hidden, layer_batches[layer] if layer_batches else batch, kv_cache)
        return self.head(hidden, batch.logits_indices)

    def forward(self, batch, kv_cache: list[torch.Tensor], token_depths: np.ndarray, chunk_starts: np.ndarray,
                chunk_lens: np.ndarray, layer_batches=None) -> torch.Tensor:
        """Per-token depths (host array [T]) over chunks of chunk_lens tokens after chunk_starts cached ones
        (host arrays [S]). A layer runs on the tokens whose depth includes it, with the batch metadata of
        just those rows; the others keep their hidden state and write no KV there. `layer_batches` as in
        forward_depth."""
        hidden = self.embed(batch.input_ids)
        everyone = np.arange(len(token_depths))
        for layer in range(self.spec.num_layers):
            runs = self._runs(layer, token_depths)
            own = layer_batches[layer] if layer_batches else batch
            if runs.all():
                hidden = self._layer(layer, hidden, own, kv_cache)
            elif runs.any():
                rows, sub = self._sub_batch(layer, own, runs, everyone, chunk_starts, chunk_lens)
                hidden = hidden.index_copy(0, rows, self._layer(layer, hidden.index_select(0, rows), sub, kv_cache))
        return self.head(hidden, batch.logits_indices)

    def _runs(self, layer: int, token_depths: np.ndarray) -> np.ndarray:
        """Bool [T]: which tokens run `layer`."""
        if self.schedule is None or layer < self.schedule.warmup:
            return np.ones(len(token_depths), dtype=bool)
        return layer >= self.schedule.warmup + self.spec.num_layers - token_depths

    def _sub_batch(self, layer, batch, runs, everyone, chunk_starts, chunk_lens):
        """(row indices, BatchInputs of the rows that run `layer`); each chunk's running rows must be its
        first ones, else a token would read KV an earlier token of its chunk skipped."""
        from fxforge.ir.model import BatchInputs

        bounds = np.concatenate([[0], np.cumsum(chunk_lens)])
        counts = np.add.reduceat(runs.astype(np.int64), bounds[:-1]) if len(chunk_lens) else np.zeros(0, np.int64)
        prefix = everyone < np.repeat(bounds[:-1] + counts, chunk_lens)
        if not np.array_equal(prefix, runs):
            row = int(np.flatnonzero(prefix != runs)[0])
            raise ValueError(f"token row {row} runs layer {layer} but an earlier token of its chunk skips it: "
                             "depths must not rise along a sequence (its KV would be missing)")
        seqs = np.flatnonzero(counts > 0)
        device = batch.input_ids.device
        rows = torch.from_numpy(np.flatnonzero(runs)).to(device)
        seq_index = torch.from_numpy(seqs).to(device)
        query_start = np.concatenate([[0], np.cumsum(counts[seqs])])
        sub = BatchInputs(batch.input_ids.index_select(0, rows), batch.positions.index_select(0, rows),
                          batch.slot_mapping.index_select(0, rows), batch.page_table.index_select(0, seq_index),
                          torch.from_numpy(query_start).to(device, torch.int32),
                          torch.from_numpy(chunk_starts[seqs] + counts[seqs]).to(device, torch.int32),
                          batch.logits_indices)
        return rows, sub


def split_layers(gm: fx.GraphModule, num_layers: int) -> tuple[fx.GraphModule, list[fx.GraphModule], fx.GraphModule]:
    """(embed: input_ids -> hidden, one module per layer, head: (hidden, logits_indices) -> logits)."""
    from fxforge.ir.capture import META_KEY

    layer_of = {n: n.meta[META_KEY].layer if META_KEY in n.meta else None for n in gm.graph.nodes}
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    kv = {n.args[1]: n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem
          and n.args[0] is placeholders["kv_cache"]}
    side_inputs = set(placeholders.values()) | set(kv.values())
    layers, entering = [], None
    for layer in range(num_layers):
        body = [n for n in gm.graph.nodes if layer_of[n] == layer]
        body_set = set(body)
        hidden_in = _single({i for n in body for i in n.all_input_nodes
                             if i not in body_set and i not in side_inputs and i.op != "get_attr"},
                            f"hidden state entering depth {layer}")
        hidden_out = _single({n for n in body for u in n.users if u not in body_set},
                             f"hidden state leaving depth {layer}")
        entering = hidden_in if entering is None else entering
        inputs = ([(hidden_in, "hidden")] + [(placeholders[name], name) for name in
                                             ("positions", "slot_mapping", "page_table", "query_start", "seq_lens")]
                  + [(kv[4 * layer + i], f"kv_{i}") for i in range(4)])
        layers.append(_extract(gm, body, inputs, hidden_out))
        final = hidden_out
    embed = _extract(gm, _ancestors(entering), [(placeholders["input_ids"], "input_ids")], entering)
    tail = [n for n in _descendants(final) if n.op != "output"]
    head = _extract(gm, tail, [(final, "hidden"), (placeholders["logits_indices"], "logits_indices")],
                    next(n for n in gm.graph.nodes if n.op == "output").args[0])
    return embed, layers, head


@torch.no_grad()
def skip_greedy(model, prompts: list[list[int]], max_new_tokens: int, page_size: int = 16) -> list[list[int]]:
    """The reference SkipDecode decoder: each prompt on its own, prefilled at full depth, then one token
    per step at the schedule's depth for its generated position (greedy; stops at the spec's EOS ids).
    A model without a schedule runs every token at full depth."""
    from fxforge.ir.model import build_batch

    skip, n = SkipModel(model), model.spec.num_layers
    eos = set(model.spec.eos_token_ids)
    outputs = []
    for prompt in prompts:
        pages = list(range(-(-(len(prompt) + max_new_tokens) // page_size)))
        cache = model.new_kv_cache(len(pages), page_size)
        chunk, past, out = list(prompt), 0, []
        for t in range(max_new_tokens):
            depth = n if t == 0 else (skip.schedule.depth(t - 1) if skip.schedule else n)
            batch = build_batch([chunk], [past], [pages], page_size, model.device)
            token = int(skip.forward_depth(batch, cache, depth).argmax(dim=-1)[0])
            out.append(token)
            past, chunk = past + len(chunk), [token]
            if token in eos:
                break
        outputs.append(out)
    return outputs


def training_prompt_len(length: int) -> int:
    """Where a training window's "prompt" ends: its first quarter runs at full depth, every later position
    p at the depth of generated position p - length // 4."""
    return max(1, length // 4)


def skip_causal_logits(module, spec, schedule: SkipSchedule, input_ids: torch.Tensor,
                       prompt_len: int | None = None) -> torch.Tensor:
    """Differentiable forward under the schedule: input_ids [B, T] whose first prompt_len positions are the
    prompt (full depth) -> logits [B, T, V]. Layer l runs on the positions whose depth includes it, a
    prefix of the window since depths fall, so causal attention over that prefix reads exactly the KV
    the inference forward keeps; later positions carry their hidden state past it."""
    from fxforge.ir.training import decoder_layer, head

    length = input_ids.shape[1]
    prompt_len = training_prompt_len(length) if prompt_len is None else prompt_len
    positions = torch.arange(length, device=input_ids.device)
    depths = schedule.token_depths(np.arange(length), prompt_len)
    x = module.get_submodule("embed")(input_ids)
    for layer in range(spec.num_layers):
        runs = np.logical_or(layer < schedule.warmup, layer >= schedule.warmup + spec.num_layers - depths)
        end = int(np.flatnonzero(runs)[-1]) + 1 if runs.any() else 0
        if end == length:
            x = decoder_layer(module, spec, layer, x, positions)
        elif end:
            x = torch.cat([decoder_layer(module, spec, layer, x[:, :end], positions[:end]), x[:, end:]], dim=1)
    return head(module, spec, x)
