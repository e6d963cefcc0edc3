import torch
import torch.fx as fx

from fxforge.ir import IRVerificationError, capture, meta, nodes_by_role, verify
from fxforge.ir.capture import kv_formats
from fxforge.ir.model import Model, build_batch
from tests.conftest import TINY_SPECS, tiny_model


def test_capture_annotates_every_role_per_layer(any_tiny_model):
    gm = capture(any_tiny_model.module)
    spec = any_tiny_model.spec
    verify(gm)
    for layer in range(spec.num_layers):
        for role in ("q_proj", "k_proj", "v_proj", "o_proj", "attention", "kv_write"):
            assert len(nodes_by_role(gm, role, layer)) == 1, (role, layer)
        ropes = nodes_by_role(gm, "rope", layer)
        assert sorted(meta(n).tensor for n in ropes) == ["k", "q"]
        assert meta(ropes[0]).heads.num_kv_heads == spec.num_kv_heads
        if spec.is_moe:
            assert nodes_by_role(gm, "router", layer) and nodes_by_role(gm, "expert", layer)
            assert not nodes_by_role(gm, "mlp_gate", layer)
        else:
            assert [len(nodes_by_role(gm, r, layer)) for r in ("mlp_gate", "mlp_up", "mlp_down")] == [1, 1, 1]
    assert len(nodes_by_role(gm, "embed")) == 1 and len(nodes_by_role(gm, "lm_head")) == 1


def test_captured_graph_equals_eager_bitwise(any_tiny_model, tokens):
    eager = any_tiny_model.logits(tokens)
    captured = Model(capture(any_tiny_model.module), any_tiny_model.spec).logits(tokens)
    assert torch.equal(eager, captured)


def test_paged_prefill_then_decode_matches_full_forward(tokens):
    """Chunked prefill + single-token decode through the cache gives the full-sequence logits."""
    model = tiny_model("llama-gqa")
    full = model.logits(tokens[0])
    page_size, pages = 4, list(range(7))
    cache = model.new_kv_cache(len(pages), page_size)
    ids = tokens[0].tolist()
    got = []
    for start, end in [(0, 9), (9, 15)] + [(i, i + 1) for i in range(15, len(ids))]:
        batch = build_batch([ids[start:end]], [start], [pages], page_size, "cpu", all_logits=True)
        got.append(model.forward(batch, cache))
    torch.testing.assert_close(torch.cat(got), full, rtol=1e-5, atol=1e-5)


def test_verify_rejects_broken_contracts():
    gm = capture(tiny_model().module)
    attention = nodes_by_role(gm, "attention", 1)[0]
    meta(attention).layer = 0  # layer 0 now has two attention nodes, layer 1 none
    try:
        verify(gm)
    except IRVerificationError as exc:
        assert "layer 1 has 0 attention" in str(exc) and "layer 0 has 2 attention" in str(exc)
    else:
        raise AssertionError("verify accepted a graph with a mislabelled attention node")


def test_verify_rejects_format_mismatch():
    gm = capture(tiny_model().module)
    write = nodes_by_role(gm, "kv_write", 0)[0]
    args = list(write.args)
    args[7] = "bfloat16"
    write.args = tuple(args)
    try:
        verify(gm)
    except IRVerificationError as exc:
        assert "kv_write formats" in str(exc)
    else:
        raise AssertionError("verify accepted mismatched kv formats")


def test_kv_formats_and_bytes_follow_dtype():
    model = tiny_model(dtype=torch.bfloat16)
    gm = capture(model.module)
    spec = TINY_SPECS["llama-gqa"]
    assert kv_formats(gm, spec.num_layers) == [("bfloat16", "bfloat16")] * spec.num_layers
    assert model.kv_bytes_per_token() == spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 2


def test_capture_rejects_foreign_modules():
    try:
        capture(torch.nn.Linear(2, 2))
    except TypeError as exc:
        assert "DecoderLM" in str(exc)
    else:
        raise AssertionError
    assert isinstance(capture(capture(tiny_model().module)), fx.GraphModule)
