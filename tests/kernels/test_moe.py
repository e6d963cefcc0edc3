"""kernels/moe.py: routing, alignment by expert and the fused expert kernels against their references.

The routing must equal MoE.forward's exactly; the alignment must keep its invariants, and its Triton
program must equal the torch one bit for bit; fused_moe must match fused_moe_ref. The kernels run under
the interpreter on CPU and natively on CUDA (class TestCUDA), where fused_moe is also captured in a
CUDA graph and replayed with new routing. Inputs are drawn fresh; failures print the seed.
"""

import dataclasses
import functools
import json
import math
import secrets
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

from tests.conftest import TINY_SPECS
from tests.kernels import checks
from tests.kernels.interpreter import fresh_process_test, interpreter_mark, is_interpreted

from fxforge.ir.modules import MoE, MoEExperts
from fxforge.kernels import moe
from fxforge.kernels.moe import (CONFIG_DIR, GemmTiles, MoEConfig, default_config, fused_moe_ref, moe_align_ref,
                                 moe_route, padded_size, shape_key, tuned_configs)
from fxforge.kernels.moe_bench import eager_moe

INTERPRETER = is_interpreted(moe._gate_up_swiglu_kernel)
needs_interpreter = interpreter_mark(INTERPRETER)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (atol, rtol). float32: the GEMMs' sums run in another order (~1e-6 relative, more where terms cancel).
# bf16/fp16: h is rounded to the dtype in both (the interpreter truncates instead of rounding, a bias
# that adds up over the I terms of the down GEMM, hence bf16's atol), and a sum order that flips one
# rounding of h moves the output by a fraction of a step; the output is rounded once: two steps.
TOLERANCE = {torch.float32: (1e-5, 2e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (1e-3, 2e-3)}

# launch configs small enough to need several tiles along every dim of the tiny shapes
TILES_16 = MoEConfig(16, GemmTiles(16, 16, group_m=2), GemmTiles(32, 16))
BLOCK_M_32 = MoEConfig(32, GemmTiles(32, 32, group_m=4), GemmTiles(16, 32, num_warps=2))


class Case(NamedTuple):
    tokens: int
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    routing: str  # "random" (softmax top-k), "idle" (expert 0 gets nothing), "one_expert" (all to the last)
    config: MoEConfig | None  # None: what fused_moe picks


CASES = {
    "t1_e4_k2": Case(1, 32, 64, 4, 2, "random", None),
    "t37_h40_i24_tiles16": Case(37, 40, 24, 4, 2, "random", TILES_16),
    "t40_idle_expert": Case(40, 64, 48, 8, 2, "idle", TILES_16),
    "t20_e1_k1": Case(20, 32, 32, 1, 1, "random", None),
    "t9_topk_eq_e": Case(9, 48, 40, 3, 3, "random", TILES_16),
    "t33_all_to_one_expert": Case(33, 64, 64, 4, 1, "one_expert", TILES_16),
    "t24_h56_block_m32": Case(24, 56, 40, 6, 2, "random", BLOCK_M_32),
    "t0_no_tokens": Case(0, 32, 32, 4, 2, "random", None),
}


def cases(every_dtype: bool) -> list:
    names = list(DTYPES)
    return [pytest.param(case, DTYPES[name], id=f"{case_id}-{name}")
            for i, (case_id, case) in enumerate(CASES.items()) for name in (names if every_dtype else [names[i % 3]])]


@pytest.fixture
def seed():
    return secrets.randbelow(2**31)


def routing(case: Case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(case.tokens, case.experts, generator=generator)
    if case.routing == "idle":
        logits[:, 0] = -math.inf
    weights, expert_ids = moe_route(logits, case.top_k, renormalize=True)
    if case.routing == "one_expert":
        expert_ids.fill_(case.experts - 1)
    return weights, expert_ids


def inputs(case: Case, dtype, seed, device="cpu"):
    """x, w_gate, w_up, w_down (scaled so gate, up and the output are O(1)), weights, expert_ids."""
    gen = torch.Generator().manual_seed(seed)
    t, h, i, e = case.tokens, case.hidden, case.intermediate, case.experts
    tensors = [torch.randn(t, h, generator=gen), torch.randn(e, i, h, generator=gen) * h**-0.5,
               torch.randn(e, i, h, generator=gen) * h**-0.5, torch.randn(e, h, i, generator=gen) * i**-0.5]
    weights, expert_ids = routing(case, gen)
    return [x.to(dtype).to(device) for x in tensors] + [weights.to(device), expert_ids.to(device)]


assert_close = functools.partial(checks.assert_close, tolerance=TOLERANCE)


def check_against_reference(case: Case, dtype, seed, device):
    args = inputs(case, dtype, seed, device)
    expected = fused_moe_ref(*[a.cpu() for a in args])
    assert_close(moe.fused_moe(*args, config=case.config), expected, f"fused_moe {case}", seed)


ALIGNMENT_TENSORS = moe.MoEAlignment._fields[:4]  # the last field, block_m, is an int


def check_alignment(alignment: moe.MoEAlignment, expert_ids: torch.Tensor, num_experts: int, block_m: int):
    """Each expert's segment holds exactly its pairs, in pair order, then -1 up to a multiple of
    block_m; segments follow in expert order; tiles name their segment's expert; sizes are static."""
    ids = expert_ids.reshape(-1).tolist()
    num_pairs = len(ids)
    sorted_pairs, tiles = alignment.sorted_pairs.tolist(), alignment.tile_experts.tolist()
    for name, t in zip(ALIGNMENT_TENSORS, alignment):
        assert t.dtype == torch.int32 and t.device == expert_ids.device, f"{name}: {t.dtype} on {t.device}"
    assert len(sorted_pairs) == padded_size(num_pairs, num_experts, block_m) == len(tiles) * block_m
    assert len(sorted_pairs) <= -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    counts = [ids.count(e) for e in range(num_experts)]
    assert alignment.expert_counts.tolist() == counts
    start = 0
    for e in range(num_experts):
        padded = -(-counts[e] // block_m) * block_m
        segment = sorted_pairs[start:start + padded]
        assert segment == [p for p in range(num_pairs) if ids[p] == e] + [-1] * (padded - counts[e]), (
            f"segment of expert {e}")
        assert tiles[start // block_m:(start + padded) // block_m] == [e] * (padded // block_m), f"tiles of expert {e}"
        start += padded
    assert alignment.num_padded.tolist() == [start]
    assert sorted_pairs[start:] == [-1] * (len(sorted_pairs) - start), "entries past num_padded"
    assert tiles[start // block_m:] == [-1] * (len(tiles) - start // block_m), "tiles past num_padded"


# (tokens, experts, top_k, routing): zero tokens to an expert, one token, all tokens to one expert
ALIGN_CASES = {
    "random_t37_e5_k2": (37, 5, 2, "random"),
    "idle_expert_t40_e8_k2": (40, 8, 2, "idle"),
    "one_token_t1_e4_k1": (1, 4, 1, "random"),
    "all_to_one_t33_e4_k1": (33, 4, 1, "one_expert"),
    "topk_eq_e_t7_e3_k3": (7, 3, 3, "random"),
    "one_expert_t5_e1_k1": (5, 1, 1, "random"),
    "many_experts_t40_e100_k8": (40, 100, 8, "random"),
    "no_tokens_t0_e4_k2": (0, 4, 2, "random"),
}


def align_cases() -> list:
    return [pytest.param(*values, block_m, id=f"{name}-m{block_m}")
            for name, values in ALIGN_CASES.items() for block_m in (16, 32)]


def align_ids(tokens, experts, top_k, kind, seed, device="cpu"):
    case = Case(tokens, 0, 0, experts, top_k, kind, None)
    return routing(case, torch.Generator().manual_seed(seed))[1].to(device)


# ----------------------------------------------------------------------------------------------
# Routing, alignment and the reference (torch, any machine)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renormalized", "raw"])
def test_route_equals_moe_forward(renormalize, dtype, seed):
    """moe_route gives the module's expert ids and weights bit for bit (the weights before the module
    casts them to the activation dtype)."""
    torch.manual_seed(seed)
    spec = dataclasses.replace(TINY_SPECS["mixtral-moe"], norm_topk_prob=renormalize)
    block = MoE(spec).to(dtype)
    seen = {}
    block.experts.register_forward_pre_hook(lambda _, args: seen.update(ids=args[1], weights=args[2]))
    x = torch.randn(29, spec.hidden_size).to(dtype)
    with torch.no_grad():
        block(x)
        weights, expert_ids = moe_route(block.router(x), spec.num_experts_per_tok, renormalize)
    assert weights.dtype == torch.float32 and expert_ids.dtype == torch.int32
    assert torch.equal(expert_ids.long(), seen["ids"]), f"seed {seed}: expert ids differ"
    assert torch.equal(weights.to(dtype), seen["weights"]), f"seed {seed}: weights differ"
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(29), rtol=1e-6, atol=0)


def test_route_rejects_bad_top_k():
    with pytest.raises(ValueError, match="moe_route: router_logits must be \\[T, E\\] with 1 <= top_k <= E"):
        moe_route(torch.zeros(3, 4), 5, True)


@pytest.mark.parametrize("tokens, experts, top_k, kind, block_m", align_cases())
def test_align_reference_invariants(tokens, experts, top_k, kind, block_m, seed):
    expert_ids = align_ids(tokens, experts, top_k, kind, seed)
    check_alignment(moe_align_ref(expert_ids, experts, block_m), expert_ids, experts, block_m)


def test_reference_equals_the_per_expert_loop(seed):
    """In float32, fused_moe_ref computes what the canonical MoEExperts computed before fxforge::moe,
    a loop over the experts that got tokens (moe_bench.eager_moe; only the order of the sum over
    slots differs)."""
    torch.manual_seed(seed)
    experts = MoEExperts(6, 48, 80)
    x = torch.randn(31, 48)
    weights, expert_ids = moe_route(torch.randn(31, 6), 2, renormalize=True)
    with torch.no_grad():
        expected = eager_moe(x, experts.w_gate, experts.w_up, experts.w_down, weights, expert_ids.long())
        actual = fused_moe_ref(x, experts.w_gate, experts.w_up, experts.w_down, weights, expert_ids)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7, msg=lambda m: f"seed {seed}: {m}")


def bad_inputs() -> list:
    t, h, i, e, k = 3, 8, 12, 4, 2
    good = dict(x=torch.zeros(t, h), w_gate=torch.zeros(e, i, h), w_up=torch.zeros(e, i, h),
                w_down=torch.zeros(e, h, i), weights=torch.zeros(t, k), expert_ids=torch.zeros(t, k, dtype=torch.int32))
    bad = {
        "x_int": ({"x": torch.zeros(t, h, dtype=torch.int64)}, "x must be \\[T, H\\] float32"),
        "x_3d": ({"x": torch.zeros(1, t, h)}, "x must be \\[T, H\\]"),
        "w_gate_hidden": ({"w_gate": torch.zeros(e, i, h + 1)}, "w_gate must be \\[E, I, H=8\\]"),
        "w_up_shape": ({"w_up": torch.zeros(e, i + 1, h)}, "w_up must be torch.float32 \\[4, 12, 8\\]"),
        "w_down_transposed": ({"w_down": torch.zeros(e, i, h)}, "w_down must be torch.float32 \\[4, 8, 12\\]"),
        "w_down_dtype": ({"w_down": torch.zeros(e, h, i, dtype=torch.bfloat16)}, "w_down must be torch.float32"),
        "expert_ids_float": ({"expert_ids": torch.zeros(t, k)}, "expert_ids must be int32/int64"),
        "expert_ids_rows": ({"expert_ids": torch.zeros(t + 1, k, dtype=torch.int32)}, "expert_ids must be"),
        "top_k_above_e": ({"expert_ids": torch.zeros(t, e + 1, dtype=torch.int32)}, "expert_ids has top_k=5 slots; expected 1..E=4"),
        "weights_shape": ({"weights": torch.zeros(t, k + 1)}, "weights must be float \\[3, 2\\]"),
        "weights_int": ({"weights": torch.zeros(t, k, dtype=torch.int32)}, "weights must be float"),
        "w_down_device": ({"w_down": torch.zeros(e, h, i, device="meta")}, "w_down is on meta, x on cpu"),
    }
    return [pytest.param({**good, **change}, message, id=name) for name, (change, message) in bad.items()]


def test_reference_fills_expert_counts(seed):
    """The counts buffer ends up holding the pairs per expert (whatever it held before), the output is
    the same as without it."""
    case = CASES["t40_idle_expert"]
    args = inputs(case, torch.float32, seed)
    counts = torch.full((case.experts,), 7, dtype=torch.int32)
    out = fused_moe_ref(*args, expert_counts=counts)
    expected = torch.bincount(args[5].reshape(-1), minlength=case.experts)
    assert counts.tolist() == expected.tolist() and counts[0] == 0, f"seed {seed}: {counts.tolist()}"
    assert torch.equal(out, fused_moe_ref(*args))


@pytest.mark.parametrize("counts, got", [
    (torch.zeros(4, dtype=torch.int64), "torch.int64 \\(4,\\)"),
    (torch.zeros(5, dtype=torch.int32), "torch.int32 \\(5,\\)"),
    (torch.zeros(8, dtype=torch.int32)[::2], "torch.int32 \\(4,\\)"),  # right dtype and length, strided
], ids=["int64", "wrong_length", "strided"])
def test_bad_expert_counts_buffer_is_refused(counts, got):
    args = inputs(CASES["t1_e4_k2"], torch.float32, 0)
    message = f"fused_moe_ref: expert_counts must be a contiguous int32 \\[E=4\\] tensor on cpu, got {got} on cpu"
    with pytest.raises(ValueError, match=message):
        fused_moe_ref(*args, expert_counts=counts)


@pytest.mark.parametrize("args, message", bad_inputs())
def test_reference_rejects_bad_inputs(args, message):
    with pytest.raises(ValueError, match=f"fused_moe_ref: {message}"):
        fused_moe_ref(**args)


@pytest.mark.skipif(INTERPRETER, reason="this process runs Triton on CPU tensors")
def test_moe_experts_runs_the_reference_on_cpu(seed, monkeypatch):
    spy, kernel = checks.Spy(moe.fused_moe_ref), checks.Spy(moe.fused_moe)
    monkeypatch.setattr(moe, "fused_moe_ref", spy)
    monkeypatch.setattr(moe, "fused_moe", kernel)
    args = inputs(CASES["t37_h40_i24_tiles16"], torch.float32, seed)
    assert torch.equal(moe.moe_experts(*args), fused_moe_ref(*args))
    assert (spy.calls, kernel.calls) == (1, 0)
    with pytest.raises(ValueError, match="fused_moe needs CUDA tensors .* use fused_moe_ref"):
        moe.fused_moe(*args)


def test_kernel_module_imports_no_ir():
    code = ("import sys, fxforge.kernels.moe; "
            "print([m for m in sys.modules if m.startswith(('fxforge.ir', 'fxforge.passes', 'fxforge.runtime'))])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


# ----------------------------------------------------------------------------------------------
# Launch configs
# ----------------------------------------------------------------------------------------------


def test_default_config():
    decode, prefill = default_config(2.0, torch.bfloat16), default_config(40.0, torch.bfloat16)
    assert (decode.block_m, prefill.block_m) == (16, 64)
    assert (decode.gate_up.block_k, default_config(2.0, torch.float32).gate_up.block_k) == (64, 32)


@pytest.mark.parametrize("bad, message", [
    (lambda: GemmTiles(block_n=24, block_k=32), "block_n=24 must be a power of two >= 16"),
    (lambda: GemmTiles(block_n=32, block_k=8), "block_k=8 must be a power of two >= 16"),
    (lambda: GemmTiles(block_n=32, block_k=32, num_warps=3), "num_warps=3"),
    (lambda: MoEConfig(8, GemmTiles(16, 16), GemmTiles(16, 16)), "block_m=8"),
    (lambda: MoEConfig.from_dict({**TILES_16.to_dict(), "block_q": 4}), "unknown keys \\['block_q'\\]"),
    (lambda: MoEConfig.from_dict({"block_m": 16, "gate_up": {"block_n": 16}, "down": {"block_n": 16, "block_k": 16}}),
     "MoEConfig.gate_up: unknown keys \\[\\], missing keys \\['block_k'\\]"),
], ids=["block_n", "block_k", "warps", "block_m", "unknown_key", "missing_key"])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


BUCKETS = {1: TILES_16, 8: dataclasses.replace(TILES_16, block_m=32), 64: BLOCK_M_32,
           256: dataclasses.replace(BLOCK_M_32, block_m=64), 2048: dataclasses.replace(BLOCK_M_32, block_m=128)}


def write_config_file(directory, device_name, buckets, version=MoEConfig.VERSION):
    key = shape_key(8, 96, 64, torch.bfloat16)
    shapes = {key: {str(t): {"config": c.to_dict(), "time_us": 1.0, "default_time_us": 2.0} for t, c in buckets.items()}}
    path = moe.config_path(device_name, directory)
    path.write_text(json.dumps({"version": version, "device": device_name, "shapes": shapes}))
    return path


def test_config_file_round_trip(tmp_path):
    path = write_config_file(tmp_path, "Fake GPU (rev 2)", BUCKETS)
    assert path.name == "moe_Fake_GPU_rev_2.json"
    assert tuned_configs("Fake GPU (rev 2)", tmp_path) == {shape_key(8, 96, 64, torch.bfloat16): BUCKETS}
    assert tuned_configs("Other GPU", tmp_path) == {}


def test_config_file_of_another_version_is_refused(tmp_path):
    write_config_file(tmp_path, "Old GPU", BUCKETS, version=0)
    with pytest.raises(ValueError, match="version 0, this fxforge reads version 1; rerun benchmarks/moe_tune.py"):
        tuned_configs("Old GPU", tmp_path)


@pytest.mark.parametrize("tokens, bucket", [(1, 1), (2, 1), (5, 8), (100, 64), (200, 256), (9000, 2048)],
                         ids=["t1", "t2", "t5", "t100", "t200", "t9000"])
def test_pick_config_takes_the_nearest_tuned_token_count(tokens, bucket, tmp_path, monkeypatch):
    write_config_file(tmp_path, "Fake GPU", BUCKETS)
    monkeypatch.setattr(moe, "_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(moe, "tuned_configs", lambda name: tuned_configs(name, tmp_path))
    cuda = torch.device("cuda")
    assert moe.pick_config(8, 96, 64, 2, tokens, torch.bfloat16, cuda) == BUCKETS[bucket]
    assert moe.pick_config(8, 96, 64, 2, tokens, torch.float32, cuda) == default_config(tokens / 4, torch.float32)
    assert moe.pick_config(8, 96, 64, 2, tokens, torch.bfloat16, torch.device("cpu")) == default_config(
        tokens / 4, torch.bfloat16)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("moe_*.json")), ids=lambda path: path.name)
def test_shipped_config_files_load(path):
    device = json.loads(path.read_text())["device"]
    assert moe.config_path(device) == path
    assert tuned_configs(device), f"{path} holds no shapes"


# ----------------------------------------------------------------------------------------------
# The Triton kernels under the interpreter
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("tokens, experts, top_k, kind, block_m", align_cases())
def test_triton_align_equals_reference(tokens, experts, top_k, kind, block_m, seed, monkeypatch):
    expert_ids = align_ids(tokens, experts, top_k, kind, seed)
    expected = moe_align_ref(expert_ids, experts, block_m)
    spy = checks.Spy(moe_align_ref)
    monkeypatch.setattr(moe, "moe_align_ref", spy)
    actual = moe.moe_align(expert_ids, experts, block_m)
    assert spy.calls == 0, "the Triton kernels must align every routing"
    for name, a, e in zip(ALIGNMENT_TENSORS, actual, expected):
        assert torch.equal(a, e), f"{name} differs, seed {seed}: {a.tolist()} vs {e.tolist()}"


@needs_interpreter
@pytest.mark.parametrize("case, dtype", cases(every_dtype=False))
def test_triton_matches_reference(case, dtype, seed):
    check_against_reference(case, dtype, seed, "cpu")


@needs_interpreter
def test_triton_routing_weights_in_activation_dtype(seed):
    """MoE passes its weights already cast to x's dtype: the kernel reads them as they come."""
    args = inputs(CASES["t37_h40_i24_tiles16"], torch.bfloat16, seed)
    args[4] = args[4].to(torch.bfloat16)
    assert_close(moe.fused_moe(*args, config=TILES_16), fused_moe_ref(*args), "fused_moe bf16 weights", seed)


@needs_interpreter
@pytest.mark.parametrize("args, message", bad_inputs())
def test_triton_launcher_rejects_bad_inputs(args, message):
    with pytest.raises(ValueError, match=f"fused_moe: {message}"):
        moe.fused_moe(**args)


@needs_interpreter
@pytest.mark.parametrize("case_id", ["t40_idle_expert", "t24_h56_block_m32"])
def test_triton_fills_expert_counts(case_id, seed):
    """The alignment writes the counts straight into the caller's buffer: the same values as the reference's."""
    case = CASES[case_id]
    args = inputs(case, torch.float32, seed)
    counts, expected = (torch.full((case.experts,), -1, dtype=torch.int32) for _ in range(2))
    assert_close(moe.fused_moe(*args, config=case.config, expert_counts=counts),
                 fused_moe_ref(*args, expert_counts=expected), "fused_moe with counts", seed)
    assert counts.tolist() == expected.tolist(), f"seed {seed}: {counts.tolist()} vs {expected.tolist()}"


@needs_interpreter
def test_triton_moe_experts_runs_the_kernel(seed, monkeypatch):
    spy = checks.Spy(moe.fused_moe)
    monkeypatch.setattr(moe, "fused_moe", spy)
    args = inputs(CASES["t1_e4_k2"], torch.float32, seed)
    assert_close(moe.moe_experts(*args), fused_moe_ref(*args), "moe_experts", seed)
    assert spy.calls == 1, "moe_experts must run the kernel where it can launch"


test_interpreted_kernels_in_a_fresh_process = fresh_process_test(__file__, "-k", "triton and not TestCUDA", interpreting=INTERPRETER)


# ----------------------------------------------------------------------------------------------
# Native on the GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCUDA:
    @pytest.mark.parametrize("case, dtype", cases(every_dtype=True))
    def test_matches_reference(self, case, dtype, seed):
        check_against_reference(case, dtype, seed, "cuda")

    @pytest.mark.parametrize("case", [Case(300, 1024, 1536, 8, 2, "random", None),
                                      Case(64, 512, 256, 128, 8, "random", None),
                                      Case(2048, 256, 128, 128, 8, "random", None)],
                             ids=["mixtral_like_t300", "qwen_like_t64", "qwen_like_t2048"])
    def test_larger_shapes(self, case, seed):
        check_against_reference(case, torch.bfloat16, seed, "cuda")

    @pytest.mark.parametrize("tokens, experts, top_k, kind, block_m", align_cases() + [
        pytest.param(2048, 128, 8, "random", 64, id="torch_path_t2048_e128_k8-m64")])
    def test_align(self, tokens, experts, top_k, kind, block_m, seed):
        expert_ids = align_ids(tokens, experts, top_k, kind, seed, "cuda")
        actual = moe.moe_align(expert_ids, experts, block_m)
        check_alignment(actual, expert_ids, experts, block_m)
        for name, a, e in zip(ALIGNMENT_TENSORS, actual, moe_align_ref(expert_ids, experts, block_m)):
            assert torch.equal(a, e), f"{name} differs from moe_align_ref, seed {seed}"

    def test_no_host_sync(self, seed):
        case = Case(40, 64, 96, 8, 2, "random", None)
        x, w_gate, w_up, w_down, _, _ = inputs(case, torch.bfloat16, seed, "cuda")
        logits = torch.randn(case.tokens, case.experts, device="cuda")
        moe.fused_moe(x, w_gate, w_up, w_down, *moe_route(logits, 2, True))  # compiles outside the check
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe.fused_moe(x, w_gate, w_up, w_down, *moe_route(logits, 2, True))
        finally:
            torch.cuda.set_sync_debug_mode("default")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
    def test_cuda_graph_replays_new_routing(self, dtype, seed):
        """Routing and experts captured once; replays with other router logits (first all tokens to
        one expert, then random) give the eager result bit for bit and match the reference, and
        refresh the expert counts buffer."""
        case = Case(37, 64, 96, 8, 2, "random", None)
        x, w_gate, w_up, w_down, _, _ = inputs(case, dtype, seed, "cuda")
        gen = torch.Generator(device="cuda").manual_seed(seed)
        logits = torch.randn(case.tokens, case.experts, device="cuda", generator=gen)
        counts = torch.zeros(case.experts, dtype=torch.int32, device="cuda")

        def layer():
            return moe.fused_moe(x, w_gate, w_up, w_down, *moe_route(logits, case.top_k, True), expert_counts=counts)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer()
        skewed = torch.randn(case.tokens, case.experts, device="cuda", generator=gen)
        skewed[:, 3] += 100.0
        for new_logits in (skewed, torch.randn(case.tokens, case.experts, device="cuda", generator=gen)):
            logits.copy_(new_logits)
            counts.fill_(-1)
            graph.replay()
            weights, expert_ids = moe_route(new_logits, case.top_k, True)
            assert counts.tolist() == torch.bincount(expert_ids.reshape(-1).long(), minlength=case.experts).tolist()
            eager = layer()
            mismatch = int((out != eager).sum())
            assert mismatch == 0, f"replay vs eager: {mismatch} of {out.numel()} differ, seed {seed}"
            expected = fused_moe_ref(x.cpu(), w_gate.cpu(), w_up.cpu(), w_down.cpu(), weights.cpu(), expert_ids.cpu())
            assert_close(out, expected, "fused_moe replayed", seed)

    def test_moe_experts_runs_the_kernel(self, seed, monkeypatch):
        spy = checks.Spy(moe.fused_moe)
        monkeypatch.setattr(moe, "fused_moe", spy)
        args = inputs(CASES["t40_idle_expert"], torch.bfloat16, seed, "cuda")
        assert_close(moe.moe_experts(*args), fused_moe_ref(*[a.cpu() for a in args]), "moe_experts", seed)
        assert spy.calls == 1, "moe_experts must run the kernel for CUDA tensors"
