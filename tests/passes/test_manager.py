"""passes/manager.py: configs, registry, ordering, failures named with their position, versions,
copy-on-write weights, in-place optimisation and pass history."""

import pytest
import torch

import fxforge
from fxforge.errors import PassConfigError, PipelineError
from fxforge.passes import BFPKVCache, KSort, Lower
from fxforge.passes.manager import build_pipeline, record_configs, registered_passes, resolve
from tests.conftest import tiny_model
from tests.passes.example_passes import Mode, ScaleOProj

pytestmark = pytest.mark.usefixtures("example_passes")


def test_identity_pipeline_is_bit_identical(any_tiny_model, tokens):
    opt = fxforge.optimize(any_tiny_model, passes=[])
    assert torch.equal(opt.logits(tokens), any_tiny_model.logits(tokens))
    assert opt.passes == []


def test_pass_runs_records_and_leaves_original_untouched(tokens):
    model = tiny_model()
    before = model.logits(tokens)
    opt = fxforge.optimize(model, passes=[{"name": "test-scale-oproj", "factor": 3.0}, "test-after-scale"])
    assert torch.equal(model.logits(tokens), before)
    assert not torch.allclose(opt.logits(tokens), before)
    assert [r["name"] for r in opt.passes] == ["test-scale-oproj", "test-after-scale"]
    assert opt.passes[0]["modified"] is True and opt.passes[1]["modified"] is False
    assert opt.passes[0]["config"] == {"layer": 0, "factor": 3.0, "mode": "scale"}
    assert opt.passes[0]["version"] == ScaleOProj.VERSION == 1


def test_weights_are_shared_except_those_a_pass_declares():
    """No deep copy: every tensor the pass did not declare is the original's own storage."""
    model = tiny_model("llama-mqa-tied")
    opt = fxforge.optimize(model, passes=[ScaleOProj(layer=1)])
    original = dict(model.module.named_parameters(remove_duplicate=False))
    optimized = dict(opt.module.named_parameters(remove_duplicate=False))
    rewritten = {"layers.1.attn.o_proj.weight"}
    for name, tensor in optimized.items():
        same = tensor.data_ptr() == original[name].data_ptr()
        assert same == (name not in rewritten), name
    assert opt.module.lm_head.weight is opt.module.embed.weight, "tied weights stay one tensor"


def test_ksort_clones_only_the_projections_it_permutes(tokens):
    model = tiny_model("qwen2-bias")
    opt = fxforge.optimize(model, passes=[KSort(block=16)])
    original = dict(model.module.named_parameters())
    for name, tensor in opt.module.named_parameters():
        if name not in original:
            continue
        permuted = any(key in name for key in ("q_proj", "k_proj"))
        assert (tensor.data_ptr() != original[name].data_ptr()) == permuted, name
    torch.testing.assert_close(opt.logits(tokens), model.logits(tokens), rtol=0, atol=1e-5)


def test_undeclared_write_into_a_shared_weight_is_stopped():
    with pytest.raises(PipelineError, match=r"'test-sneaky' \(#1 of 1\) changed tensors it shares .*q_proj"):
        fxforge.optimize(tiny_model(), passes=[{"name": "test-sneaky", "use_data": False}])


def test_new_data_for_the_graphs_own_parameter_leaves_the_original_alone(tokens):
    """`param.data = ...` replaces the optimised graph's Parameter data only: no write to shared storage."""
    model = tiny_model()
    before = model.logits(tokens)
    opt = fxforge.optimize(model, passes=[{"name": "test-sneaky", "use_data": True}])
    assert torch.equal(model.logits(tokens), before) and not torch.equal(opt.logits(tokens), before)


def test_moving_the_optimised_model_leaves_the_original_where_it_was():
    model = tiny_model("llama-mqa-tied")
    opt = fxforge.optimize(model, passes=[])
    opt.module.to(torch.float64)
    assert {p.dtype for p in model.module.parameters()} == {torch.float32}
    assert opt.module.lm_head.weight is opt.module.embed.weight


def test_in_place_variant_rewrites_the_given_model_without_copies(tokens):
    """In place, a pass may rewrite any tensor (the sneaky one included): they are the caller's."""
    model = tiny_model()
    weight = model.module.layers[0].attn.o_proj.weight
    ptr = weight.data_ptr()
    reference = weight.detach().clone() * 3.0
    opt = fxforge.optimize_(model, passes=[ScaleOProj(factor=3.0), "test-sneaky"])
    assert opt.module is model.module and [r["name"] for r in opt.passes] == ["test-scale-oproj", "test-sneaky"]
    o_proj = dict(opt.module.named_parameters())["layers.0.attn.o_proj.weight"]
    assert o_proj.data_ptr() == ptr and torch.equal(o_proj, reference), "rewritten in its own storage"
    assert torch.equal(model.logits(tokens), opt.logits(tokens))


def test_history_is_kept_and_appended(tokens):
    once = fxforge.optimize(tiny_model(), passes=[BFPKVCache(k_format="bfp12", v_format="bfp16", block=16)])
    twice = fxforge.optimize(once, passes=[Lower(backend="torch")])
    assert [r["name"] for r in twice.passes] == ["bfp-kv", "lower"]
    assert twice.kv_formats() == once.kv_formats() == [("bfp12_16", "bfp16_16")] * 2
    assert [r["name"] for r in once.passes] == ["bfp-kv"], "the input model's history is not mutated"
    torch.testing.assert_close(twice.logits(tokens), once.logits(tokens), rtol=0, atol=1e-5)


def test_ordering_is_checked_against_the_history():
    lowered = fxforge.optimize(tiny_model(), passes=[Lower(backend="torch")])
    with pytest.raises(PassConfigError, match="already ran 'lower', and 'bfp-kv' must run before it"):
        fxforge.optimize(lowered, passes=[BFPKVCache()])


def test_recorded_versions_are_checked_on_replay():
    records = fxforge.optimize(tiny_model(), passes=[ScaleOProj()]).passes
    assert record_configs(records) == [ScaleOProj()]
    with pytest.raises(PassConfigError, match="recorded with config version 7; this fxforge's is 1"):
        record_configs([{**records[0], "version": 7}])


def test_a_failing_pass_is_named_with_its_position_and_predecessors():
    with pytest.raises(PipelineError) as info:
        fxforge.optimize(tiny_model(), passes=[ScaleOProj(), "test-after-scale", "test-broken"])
    message = str(info.value)
    assert "pass 'test-broken' (#3 of 3) failed (after ['test-scale-oproj', 'test-after-scale'])" in message
    assert "a bug inside the pass" in message and isinstance(info.value.__cause__, KeyError)


def test_a_broken_graph_is_caught_by_the_check_after_the_pass():
    with pytest.raises(PipelineError, match=r"the IR check after pass 'test-drop-meta' \(#2 of 2\) failed "
                                            r"\(after \['test-scale-oproj'\]\): IR contract broken"):
        fxforge.optimize(tiny_model(), passes=[ScaleOProj(), "test-drop-meta"])


def test_example_passes_are_registered_by_the_fixture_and_removed_after(example_passes):
    from fxforge.passes.manager import register_pass, unregister_pass
    from tests.passes.example_passes import AfterScale, after_scale

    assert set(example_passes) <= set(registered_passes())
    unregister_pass("test-after-scale")
    assert "test-after-scale" not in registered_passes()
    with pytest.raises(PassConfigError, match="unknown pass 'test-after-scale'"):
        resolve("test-after-scale")
    register_pass("test-after-scale", AfterScale, after=("test-scale-oproj",))(after_scale)


def test_config_objects_names_and_dicts_resolve_alike():
    assert resolve(ScaleOProj(factor=2.0)) == resolve({"name": "test-scale-oproj", "factor": 2.0})
    assert resolve("test-scale-oproj") == ScaleOProj()
    assert resolve({"name": "test-scale-oproj", "mode": "keep"}).mode is Mode.KEEP


@pytest.mark.parametrize("bad, message", [
    ({"name": "no-such-pass"}, "unknown pass 'no-such-pass'"),
    ({"name": "test-scale-oproj", "facter": 2}, "unknown option(s) ['facter']"),
    ({"name": "test-scale-oproj", "factor": -1.0}, "factor=-1.0 must be > 0"),
    ({"name": "test-scale-oproj", "mode": "squash"}, "mode='squash' is not valid"),
    (42, "cannot read pass 42"),
], ids=["unknown-name", "unknown-key", "bad-value", "bad-enum", "not-a-pass"])
def test_bad_pass_specs_are_clear_errors(bad, message):
    with pytest.raises(PassConfigError) as info:
        build_pipeline([bad])
    assert message in str(info.value)


def test_ordering_constraint_checked_when_pipeline_is_built():
    with pytest.raises(PassConfigError, match="must run after 'test-scale-oproj'"):
        build_pipeline(["test-after-scale", "test-scale-oproj"])
    assert len(build_pipeline(["test-scale-oproj", "test-after-scale"])) == 2


def test_config_is_frozen():
    config = ScaleOProj()
    with pytest.raises(Exception):
        config.factor = 5.0

