"""passes/fuse_elementwise.py: residual add + rmsnorm and K's rope + kv_write fused in lowered graphs.

Structure: the pairs are gone, the fused ops carry the pairs' binding, roles and layers, ir.verify
holds. Numbers: logits and greedy decoding are bit for bit those of the unfused lowered model (the
fused ops compute exactly what their pairs compute under the same binding).
"""

import operator
import random
from collections import Counter

import pytest
import torch

import fxforge
from fxforge.ir import ops
from fxforge.ir.capture import kv_formats, meta, set_kv_format_args
from fxforge.ir.cost import BatchDesc, annotate_costs
from fxforge.ir.skip import split_layers
from fxforge.ir.verify import verify
from fxforge.kernels.kv_cache import allocate_kv_pair
from fxforge.passes import BFPKVCache, KSort, Lower
from fxforge.passes.lower import STEP_FUSIONS
from fxforge.passes.fuse_elementwise import (FUSED_FROM, fuse_add_rmsnorm, fuse_rope_kv_write,
                                             unfuse_elementwise)
from fxforge.runtime.engine import Engine
from fxforge.runtime.sequence import SamplingParams
from tests.conftest import TINY_SPECS, tiny_model

UNFUSED = dict.fromkeys(STEP_FUSIONS, False)  # lower's step fusions are on by default
PIPELINE = [KSort(block=16), BFPKVCache(k_format="bfp12", v_format="bfp16", block=16), Lower(backend="torch", **UNFUSED)]


def lowered(kind: str = "llama-gqa", passes=PIPELINE):
    return fxforge.optimize(tiny_model(kind), passes=passes)


def fused(kind: str = "llama-gqa", passes=PIPELINE, **options):
    opt = lowered(kind, passes)
    records = fuse_add_rmsnorm(opt.module, **options), fuse_rope_kv_write(opt.module)
    return opt, records


def calls(gm, target) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TINY_SPECS))
def test_every_pair_is_fused_and_the_ir_holds(kind):
    """2 per layer of add + norm (each mlp_norm, each attn_norm after the first, the final norm), one
    rope + kv_write per layer; q's rope and the QK-norms stay; ir.verify accepts the result."""
    spec = TINY_SPECS[kind]
    before = lowered(kind).module
    opt, (adds, ropes) = fused(kind)
    gm = opt.module
    layers = spec.num_layers
    assert len(adds) == len(calls(gm, ops.ADD_RMSNORM)) == 2 * layers
    assert len(calls(gm, ops.RMSNORM)) == len(calls(before, ops.RMSNORM)) - 2 * layers == 1 + (2 * layers if spec.qk_norm else 0)
    assert not [n for n in gm.graph.nodes if n.target is operator.add], "a residual add survived"
    assert len(ropes) == len(calls(gm, ops.ROPE_KV_WRITE)) == layers and calls(gm, ops.KV_WRITE) == []
    assert not any(w.args[0].target is ops.ROPE for w in calls(gm, ops.KV_WRITE)), "a rope still feeds a kv_write"
    assert len(calls(gm, ops.ROPE)) == layers and {meta(n).tensor for n in calls(gm, ops.ROPE)} == {"q"}
    norms = calls(gm, ops.ADD_RMSNORM)
    assert {meta(n).role for n in norms} == {"norm"}
    assert sorted((meta(n).layer for n in norms), key=str) == sorted([*range(layers), *range(1, layers), None], key=str)
    writes = calls(gm, ops.ROPE_KV_WRITE)
    assert [(meta(n).role, meta(n).layer) for n in writes] == [("kv_write", layer) for layer in range(layers)]
    assert all(meta(n).heads is not None and "bfp-kv" in meta(n).notes for n in writes), "kv_write's metadata kept"
    verify(gm)


def test_records_name_the_replaced_nodes_and_a_second_run_finds_nothing():
    opt, (adds, ropes) = fused()
    assert adds[0]["replaced"][1] == "rmsnorm_1" and adds[0]["layer"] == 0
    assert [r["replaced"] for r in ropes] == [["rope_1", "kv_write"], ["rope_3", "kv_write_1"]]
    assert (fuse_add_rmsnorm(opt.module), fuse_rope_kv_write(opt.module)) == ([], [])


def test_fused_ops_take_the_binding_of_the_pairs():
    opt, _ = fused(passes=PIPELINE[:2] + [Lower(backend="triton", **UNFUSED)])
    assert {n.args[-1] for n in calls(opt.module, ops.ADD_RMSNORM) + calls(opt.module, ops.ROPE_KV_WRITE)} == {"triton"}
    assert ops.bindings(opt.module)["add_rmsnorm"] == ops.bindings(opt.module)["rope_kv_write"] == "triton"


def test_a_pair_bound_differently_is_left_alone():
    opt = lowered()
    (rope, *_) = [n for n in calls(opt.module, ops.ROPE) if meta(n).tensor == "k"]
    ops.bind(rope, ops.TRITON)
    assert [r["layer"] for r in fuse_rope_kv_write(opt.module)] == [1]
    assert calls(opt.module, ops.KV_WRITE)[0].args[0] is rope


def test_pre_rope_cache_has_no_rope_to_fuse(tokens):
    """bfp-kv pre_rope=True writes keys before RoPE (attention rotates them): kv_write stays; adds fuse."""
    passes = [BFPKVCache(k_format="bfp12", v_format="bfp16", block=16, pre_rope=True), Lower(backend="torch", **UNFUSED)]
    opt, (adds, ropes) = fused(passes=passes)
    assert ropes == [] and len(calls(opt.module, ops.KV_WRITE)) == 2 and len(adds) == 4
    verify(opt.module)
    torch.testing.assert_close(opt.logits(tokens), lowered(passes=passes).logits(tokens), rtol=0, atol=0)


def test_within_layers_keeps_the_graph_splittable_per_layer(tokens):
    """across_layers=False fuses only each layer's own add into its mlp_norm: split_layers (skip-decode,
    the layer-tying loop) still finds one hidden state per boundary; across layers it cannot."""
    opt, (adds, _) = fused(across_layers=False)
    assert [a["layer"] for a in adds] == [0, 1]
    embed, layers, head = split_layers(opt.module, 2)
    assert len(layers) == 2 and calls(layers[0], ops.ADD_RMSNORM) and calls(layers[0], ops.ROPE_KV_WRITE)
    with pytest.raises(ValueError, match="cannot split the graph"):
        split_layers(fused()[0].module, 2)


def test_unfuse_restores_the_pairs():
    """unfuse_elementwise ∘ fuse = the lowered graph: the same ops with the same roles, layers and notes."""
    def signature(gm):
        return Counter((n.op, str(n.target), meta(n).role, meta(n).layer, repr(meta(n).notes)) for n in gm.graph.nodes
                       if n.op != "get_attr")

    original = lowered().module
    opt, _ = fused()
    assert unfuse_elementwise(opt.module.graph) == 6
    opt.module.recompile()
    assert signature(opt.module) == signature(original)
    assert not any(FUSED_FROM in n.meta for n in opt.module.graph.nodes)
    verify(opt.module)


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TINY_SPECS))
def test_logits_are_unchanged(kind, tokens):
    opt, _ = fused(kind)
    assert torch.equal(opt.logits(tokens), lowered(kind).logits(tokens))


def test_ops_equal_their_pairs_and_have_fakes():
    """The reference binding of each fused op is its pair, bit for bit; opcheck: schema, fake, mutation."""
    gen = torch.Generator().manual_seed(3)
    x, residual, weight = torch.randn(5, 64, generator=gen), torch.randn(5, 64, generator=gen), torch.rand(64) + 0.5
    total, normed = ops.ADD_RMSNORM(x, residual, weight, 1e-5, ops.REFERENCE)
    assert torch.equal(total, residual + x) and torch.equal(normed, ops.RMSNORM(residual + x, weight, 1e-5, ops.REFERENCE))
    torch.library.opcheck(ops.ADD_RMSNORM.default, (x.bfloat16(), residual, weight, 1e-5, ops.REFERENCE))
    k, v = torch.randn(3, 2, 32, generator=gen), torch.randn(3, 2, 32, generator=gen)
    slots, positions, inv_freq = torch.tensor([4, 9, 1]), torch.tensor([7, 8, 9]), torch.rand(16, generator=gen)
    perm = torch.stack([torch.randperm(32, generator=gen) for _ in range(2)])
    cache, expected = allocate_kv_pair(2, 8, 2, 32, "bfp12_16", "mxfp4_32"), allocate_kv_pair(2, 8, 2, 32, "bfp12_16", "mxfp4_32")
    ops.ROPE_KV_WRITE(k, v, *cache, slots, positions, inv_freq, True, perm, "bfp12_16", "mxfp4_32", ops.REFERENCE)
    ops.KV_WRITE(ops.ROPE(k, positions, inv_freq, True, perm, ops.REFERENCE), v, *expected, slots, "bfp12_16", "mxfp4_32",
                 ops.REFERENCE)
    assert all(torch.equal(a, b) for a, b in zip(cache, expected))
    torch.library.opcheck(ops.ROPE_KV_WRITE.default, (k, v, *cache, slots, positions, inv_freq, True, perm, "bfp12_16",
                                                      "mxfp4_32", ops.REFERENCE))


@pytest.mark.parametrize("kind", ["llama-gqa", "mixtral-moe"])
def test_greedy_engine_decode_is_unchanged(kind):
    rng = random.Random(5)
    prompts = [[rng.randrange(257) for _ in range(rng.randint(1, 30))] for _ in range(4)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)

    def generate(model):
        engine = Engine(model, num_pages=64, page_size=4, max_num_batched_tokens=32)
        return [o.token_ids for o in engine.generate(prompts, params)]

    assert generate(fused(kind)[0]) == generate(lowered(kind))


# ----------------------------------------------------------------------------------------------
# Consumers of the fused forms
# ----------------------------------------------------------------------------------------------


def test_kv_format_readers_and_writers_see_rope_kv_write():
    opt, _ = fused()
    assert kv_formats(opt.module, 2) == [("bfp12_16", "bfp16_16")] * 2 == opt.kv_formats()
    (write, _) = calls(opt.module, ops.ROPE_KV_WRITE)
    set_kv_format_args(write, "bfp14_16", "mxfp4_32")
    assert write.args[11:13] == ("bfp14_16", "mxfp4_32") and kv_formats(opt.module, 2)[0] == ("bfp14_16", "mxfp4_32")
    with pytest.raises(AssertionError, match="layer 0: kv_write formats"):
        verify(opt.module)  # attention of layer 0 still reads the old formats


def test_cost_model_counts_the_saved_traffic():
    """Per role the fused graph costs what the unfused one does, less the round trips it removes: one read
    of each fused sum, and K's rotated rows written by rope and read back by kv_write."""
    spec, batch = TINY_SPECS["llama-gqa"], BatchDesc("decode", batch=4, context=64, dtype="float32")
    unfused_costs = annotate_costs(lowered().module, spec, batch)
    fused_costs = annotate_costs(fused()[0].module, spec, batch)
    total = {name: sum(c.bytes for c in costs) for name, costs in (("unfused", unfused_costs), ("fused", fused_costs))}
    act, tokens = 4, 4
    saved = 2 * spec.num_layers * tokens * spec.hidden_size * act  # the sum's read, per fused add
    saved += spec.num_layers * 2 * tokens * spec.num_kv_heads * spec.head_dim * act  # K rotated: written, read
    assert total["unfused"] - total["fused"] == saved
    assert sum(c.flops for c in unfused_costs) == sum(c.flops for c in fused_costs)
    roles = Counter(c.role for c in fused_costs)
    assert roles["residual"] == 0 and roles["rope"] == spec.num_layers and roles["kv_write"] == spec.num_layers


def test_onnx_functional_graph_unfuses_and_computes_the_same():
    from fxforge.onnx_export import example_batch, functional_graph

    opt = lowered()
    fused_opt, _ = fused()
    batch, cache = example_batch(opt)
    graph = functional_graph(fused_opt.module)
    assert not calls(graph, ops.ADD_RMSNORM) and not calls(graph, ops.ROPE_KV_WRITE)
    with torch.no_grad():
        got = graph(*batch.args(), [t.clone() for t in cache])
        want = functional_graph(opt.module)(*batch.args(), [t.clone() for t in cache])
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
