"""Cost model: hand-computed FLOPs/bytes, the Op/B facts of the Duplex paper, devices, analyze()."""

import dataclasses
import io
import json

import pytest
import torch
from rich.console import Console

from fxforge.analyze import analyze
from fxforge.errors import FxforgeError
from fxforge.ir.capture import capture, nodes_by_role
from fxforge.ir.cost import COST_KEY, BatchDesc, NodeCost, annotate_costs, layer_table, placement_hint, summarize
from fxforge.ir.devices import DEVICES, H100, LOGIC_PIM, DeviceSpec, load_device_spec
from fxforge.ir.model import Model
from fxforge.ir.spec import ModelSpec

TINY = ModelSpec(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16)
TINY_MOE = ModelSpec(family="mixtral", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=512)


def _graph(spec: ModelSpec, kv_format: str | None = None):
    model = Model.from_state_dict(spec, None, dtype=torch.bfloat16)
    if kv_format:
        model.module.set_kv_format(kv_format)
    return capture(model.module)


def _cost(gm, spec, batch, role, layer=0) -> NodeCost:
    annotate_costs(gm, spec, batch)
    (node,) = nodes_by_role(gm, role, layer)
    return node.meta[COST_KEY]


@pytest.fixture(scope="module")
def tiny_gm():
    return _graph(TINY)


@pytest.fixture(scope="module")
def moe_gm():
    return _graph(TINY_MOE)


# -- hand-computed costs ----------------------------------------------------------------------

def test_q_proj_decode_by_hand(tiny_gm):
    c = _cost(tiny_gm, TINY, BatchDesc("decode", batch=8, context=100), "q_proj")
    # T = 8 tokens, 64 -> 4*16 = 64; bf16: weight 64*64 + activations 8*(64 in + 64 out), 2 bytes each
    assert (c.flops, c.bytes) == (2 * 8 * 64 * 64, 2 * (64 * 64 + 8 * 128))
    assert c.op_per_byte == pytest.approx(65536 / 10240)
    assert (c.role, c.layer, c.node_name) == ("q_proj", 0, "layers_0_attn_q_proj")


def test_decode_attention_by_hand(tiny_gm):
    c = _cost(tiny_gm, TINY, BatchDesc("decode", batch=8, context=100), "attention", layer=1)
    # 4 * B * Hq * D * ctx; K and V rows: B*ctx*Hkv rows of 16 bf16 values each (32 B), plus q read and o written
    assert c.flops == 4 * 8 * 4 * 16 * 100
    assert c.bytes == 8 * 100 * 2 * (32 + 32) + 2 * 8 * 4 * 16 * 2


def test_prefill_attention_is_causal(tiny_gm):
    c = _cost(tiny_gm, TINY, BatchDesc("prefill", batch=2, context=10), "attention")
    # each sequence: query i sees i+1 keys -> 55 pairs; K/V of 10 rows read once per sequence
    assert c.flops == 4 * 4 * 16 * (2 * 55)
    assert c.bytes == 2 * 10 * 2 * 64 + 2 * 20 * 4 * 16 * 2


def test_sliding_window_caps_decode_keys():
    spec = dataclasses.replace(TINY, sliding_window=32)
    gm = _graph(spec)
    c = _cost(gm, spec, BatchDesc("decode", batch=4, context=100), "attention")
    assert c.flops == 4 * 4 * 4 * 16 * 32
    assert c.bytes == 4 * 32 * 2 * 64 + 2 * 4 * 4 * 16 * 2


def test_lm_head_only_computes_one_row_per_sequence(tiny_gm):
    c = _cost(tiny_gm, TINY, BatchDesc("prefill", batch=3, context=50), "lm_head", layer=None)
    assert c.flops == 2 * 3 * 64 * 128
    mixed = _cost(tiny_gm, TINY, BatchDesc("mixed", batch=5, context=100, prefill_tokens=7), "lm_head", None)
    assert mixed.flops == 2 * (5 + 1) * 64 * 128
    q = _cost(tiny_gm, TINY, BatchDesc("mixed", batch=5, context=100, prefill_tokens=7), "q_proj")
    assert q.flops == 2 * (5 + 7) * 64 * 64


def test_mixed_attention_adds_decode_and_prefill(tiny_gm):
    mixed = _cost(tiny_gm, TINY, BatchDesc("mixed", batch=5, context=100, prefill_tokens=7), "attention")
    decode = _cost(tiny_gm, TINY, BatchDesc("decode", batch=5, context=100), "attention")
    prefill = _cost(tiny_gm, TINY, BatchDesc("prefill", batch=1, context=7), "attention")
    assert mixed.flops == decode.flops + prefill.flops
    assert mixed.bytes == decode.bytes + prefill.bytes


def test_costs_only_on_compute_nodes_and_replaced_on_reannotation(tiny_gm):
    costs = annotate_costs(tiny_gm, TINY, BatchDesc("decode", batch=2, context=10))
    costed = {n.name for n in tiny_gm.graph.nodes if COST_KEY in n.meta}
    assert costed == {c.node_name for c in costs}
    assert "view" not in costed and "layers_0_attn_k_proj" in costed and "kv_write" in costed
    roles = {c.role for c in costs}
    assert {"embed", "norm", "rope", "attention", "kv_write", "mlp_gate", "mlp_act", "residual", "lm_head"} <= roles
    before = _cost(tiny_gm, TINY, BatchDesc("decode", batch=2, context=10), "o_proj")
    after = _cost(tiny_gm, TINY, BatchDesc("decode", batch=4, context=10), "o_proj")
    assert after.flops == 2 * before.flops


# -- Op/B facts ---------------------------------------------------------------------------------

def test_decode_attention_op_per_byte_is_group_size_and_rises_with_bfp():
    batch = BatchDesc("decode", batch=16, context=4096)
    dense = _cost(_graph(TINY), TINY, batch, "attention")
    assert dense.op_per_byte == pytest.approx(TINY.group_size, rel=0.10)
    bfp = _cost(_graph(TINY, "bfp12_16"), TINY, batch, "attention")
    # bfp12 with block 16: 16 values * 4 bits + one exponent byte = 9 bytes per row instead of 32
    assert bfp.flops == dense.flops
    assert bfp.bytes == 16 * 4096 * 2 * (9 + 9) + 2 * 16 * 4 * 16 * 2
    assert bfp.op_per_byte > 3 * dense.op_per_byte


def test_kv_write_bytes_follow_the_format():
    batch = BatchDesc("decode", batch=4, context=64)
    dense = _cost(_graph(TINY), TINY, batch, "kv_write")
    bfp = _cost(_graph(TINY, "bfp12_16"), TINY, batch, "kv_write")
    rows = 4 * 2  # tokens * kv heads
    assert dense.bytes - bfp.bytes == rows * 2 * (32 - 9)


def test_prefill_projections_far_more_intense_than_decode(tiny_gm):
    for role in ("q_proj", "mlp_down"):
        prefill = _cost(tiny_gm, TINY, BatchDesc("prefill", batch=1, context=512), role)
        decode = _cost(tiny_gm, TINY, BatchDesc("decode", batch=1, context=512), role)
        assert prefill.op_per_byte > 10 * decode.op_per_byte, role


def test_expert_op_per_byte_is_tokens_per_expert(moe_gm):
    # decode batch 8, top-2 of 4 experts: 16 routed tokens, 4 per expert, all experts' weights read
    c = _cost(moe_gm, TINY_MOE, BatchDesc("decode", batch=8, context=128), "expert")
    assert c.flops == 3 * 2 * 16 * 64 * 512
    assert c.op_per_byte == pytest.approx(16 / 4, rel=0.05)
    # one token: 2 routed pairs -> only 2 experts' weights are read, 1 token each
    one = _cost(moe_gm, TINY_MOE, BatchDesc("decode", batch=1, context=128), "expert")
    assert one.op_per_byte == pytest.approx(1.0, rel=0.05)
    all_weights = 4 * 3 * 64 * 512 * 2
    assert all_weights / 2 < one.bytes < 0.6 * all_weights


def test_placement_decode_attention_on_pim_prefill_projection_on_xpu(tiny_gm):
    attention = _cost(tiny_gm, TINY, BatchDesc("decode", batch=64, context=4096), "attention")
    hint = placement_hint(attention, H100, LOGIC_PIM)
    assert (hint.target, hint.device) == ("pim", "logic-pim") and hint.speedup > 3
    q = _cost(tiny_gm, TINY, BatchDesc("prefill", batch=4, context=2048), "q_proj")
    assert placement_hint(q, H100, LOGIC_PIM).target == "xpu"


# -- tables -------------------------------------------------------------------------------------

def test_layer_table_totals_equal_node_sums(moe_gm):
    costs = annotate_costs(moe_gm, TINY_MOE, BatchDesc("decode", batch=8, context=256))
    rows = layer_table(costs, H100)
    assert [r["layer"] for r in rows] == ["embed", 0, 1, "head"]
    assert sum(r["flops"] for r in rows) == sum(c.flops for c in costs)
    assert sum(r["bytes"] for r in rows) == sum(c.bytes for c in costs)
    expected_time = sum(max(c.flops / H100.peak("bfloat16"), c.bytes / H100.mem_bandwidth) for c in costs)
    assert sum(r["time_s"] for r in rows) == pytest.approx(expected_time)
    assert summarize(costs, H100)["time_s"] == pytest.approx(expected_time)
    assert all(r["bound"] == "memory" for r in rows)  # decode at batch 8 is memory bound everywhere


# -- BatchDesc validation -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, word", [
    ({"phase": "train", "batch": 1, "context": 8}, "phase"),
    ({"phase": "decode", "batch": 0, "context": 8}, "batch"),
    ({"phase": "decode", "batch": 2, "context": -1}, "context"),
    ({"phase": "decode", "batch": 2.5, "context": 8}, "batch"),
    ({"phase": "mixed", "batch": 2, "context": 8}, "prefill_tokens"),
    ({"phase": "decode", "batch": 2, "context": 8, "prefill_tokens": 4}, "prefill_tokens"),
    ({"phase": "decode", "batch": 2, "context": 8, "dtype": "int8"}, "dtype"),
    ({"phase": "decode", "batch": 2, "context": 8, "dtype": "bfp12_32"}, "dtype"),
], ids=["phase", "batch0", "context", "batch-float", "mixed-no-prefill", "decode-prefill", "int8", "bfp-dtype"])
def test_batch_desc_rejects_bad_input(kwargs, word):
    with pytest.raises(FxforgeError, match=word):
        BatchDesc(**kwargs)


def test_batch_desc_normalises_dtype_and_counts_tokens():
    b = BatchDesc("mixed", batch=3, context=64, dtype="bf16", prefill_tokens=10)
    assert (b.dtype, b.dtype_bytes, b.num_tokens, b.num_sequences) == ("bfloat16", 2, 13, 4)
    assert BatchDesc("prefill", batch=2, context=8, dtype="fp32").num_tokens == 16


# -- devices ------------------------------------------------------------------------------------

def test_builtin_devices():
    assert load_device_spec("h100") is H100 and {"h100", "logic-pim"} <= set(DEVICES)
    assert LOGIC_PIM.peak("bfloat16") == pytest.approx(5 * 21.3e12)
    assert LOGIC_PIM.ridge("bfloat16") == pytest.approx(8)
    assert LOGIC_PIM.mem_bandwidth == pytest.approx(4 * H100.mem_bandwidth, rel=0.02)
    with pytest.raises(FxforgeError, match="float32"):
        LOGIC_PIM.peak("float32")


def test_device_json_round_trip(tmp_path):
    path = H100.save(tmp_path / "h100.json")
    assert load_device_spec(str(path)) == H100
    custom = DeviceSpec("toy", {"bfloat16": 1e12}, 1e11, 1e9, "made up")
    assert load_device_spec(custom.save(tmp_path / "toy.json")) == custom


@pytest.mark.parametrize("content, word", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "list"),
    (json.dumps({"name": "x", "peak_flops": {"bfloat16": 1e12}, "memory_bytes": 1e9}), "mem_bandwidth"),
    (json.dumps({"name": "x", "peak_flops": {"bfloat16": 1e12}, "mem_bandwidth": -1, "memory_bytes": 1e9}),
     "positive"),
    (json.dumps({"name": "x", "peak_flops": {}, "mem_bandwidth": 1e12, "memory_bytes": 1e9}), "peak_flops"),
    (json.dumps({"name": "x", "peak_flops": {"bf16": 1}, "mem_bandwidth": 1, "memory_bytes": 1, "bw": 2}),
     "unknown keys"),
], ids=["syntax", "not-object", "missing-key", "negative", "empty-peaks", "unknown-key"])
def test_bad_device_file_names_path_and_keys(tmp_path, content, word):
    path = tmp_path / "dev.json"
    path.write_text(content)
    with pytest.raises(FxforgeError, match=word) as err:
        load_device_spec(path)
    assert str(path) in str(err.value) and "mem_bandwidth" in str(err.value)


def test_unknown_device_name():
    with pytest.raises(FxforgeError, match="h100"):
        load_device_spec("a100")


# -- analyze ------------------------------------------------------------------------------------

def test_analyze_prints_table_writes_png_and_returns_json(tmp_path):
    model = Model.from_state_dict(TINY_MOE, None, dtype=torch.bfloat16)
    out = io.StringIO()
    plot = tmp_path / "plots" / "roofline.png"
    summary = analyze(model, BatchDesc("decode", batch=8, context=512), H100, plot, Console(file=out, width=160))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    text = out.getvalue()
    assert "total" in text and "expert" in text and "logic-pim" in text
    json.dumps(summary)
    assert summary["plot"] == str(plot)
    assert summary["totals"]["flops"] == sum(r["flops"] for r in summary["layers"])
    roles = {r["role"]: r for r in summary["roles"]}
    assert roles["attention"]["faster_on"] == "logic-pim"
    assert roles["expert"]["op_per_byte"] == pytest.approx(4, rel=0.05)


def test_analyze_accepts_a_bare_spec_without_weights():
    summary = analyze(TINY, BatchDesc("decode", batch=4, context=64), "h100", None, None)
    model = Model.from_state_dict(TINY, None, dtype=torch.bfloat16)
    assert summary == analyze(model, BatchDesc("decode", batch=4, context=64), "h100", None, None)
    assert summary["plot"] is None
