"""runtime/expert_offload.py: offloaded experts give fused_moe_ref's output (bit-equal on one device under
every policy), the rule follows the cost model's threshold, the budget splits the experts."""

import pytest
import torch

from fxforge.errors import FxforgeError
from fxforge.ir.devices import DeviceSpec, LinkSpec
from fxforge.kernels.moe import fused_moe_ref, moe_route
from fxforge.runtime.expert_offload import OffloadCosts, OffloadedExperts, Policy, resident_experts

GPU = DeviceSpec("gpu", {"bfloat16": 1e14, "float32": 1e13}, 1e12, 40e9, kind="xpu")
CPU = DeviceSpec("cpu", {"bfloat16": 1e12, "float32": 1e12}, 1e12, 1e12, kind="cpu")
LINK = LinkSpec("pcie", "gpu", "cpu", 1e11)


def layer(num_experts=8, hidden=32, inter=48, tokens=13, top_k=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = [0.1 * torch.randn(num_experts, *shape, generator=gen) for shape in ((inter, hidden), (inter, hidden),
                                                                              (hidden, inter))]
    x = torch.randn(tokens, hidden, generator=gen)
    weights, ids = moe_route(torch.randn(tokens, num_experts, generator=gen), top_k, True)
    return [t.to(dtype) for t in w], x.to(dtype), weights.to(dtype), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy", list(Policy), ids=[p.value for p in Policy])
def test_offloaded_equals_reference(dtype, policy):
    (w_gate, w_up, w_down), x, weights, ids = layer(dtype=dtype)
    ids[0] = torch.tensor([7, 6], dtype=ids.dtype)  # offloaded experts get pairs
    counts = torch.bincount(ids.reshape(-1).long(), minlength=8)
    experts = OffloadedExperts(w_gate, w_up, w_down, resident=3, device="cpu",
                               costs=OffloadCosts(GPU, CPU, LINK, dtype=str(dtype)[6:]))
    where = experts.plan(counts.tolist(), policy)
    assert {w for w in where[3:] if w} == {"copy" if policy is Policy.COPY else "cpu"} or policy is Policy.RULE
    out = experts.forward(x, weights, ids, policy)
    expected = fused_moe_ref(x, w_gate, w_up, w_down, weights, ids)
    assert out.dtype == dtype and torch.equal(out, expected), \
        f"{dtype} {policy}: {(out.float() - expected.float()).abs().max()} max diff"


def test_native_math_is_close():
    (w_gate, w_up, w_down), x, weights, ids = layer(dtype=torch.bfloat16, tokens=16)
    experts = OffloadedExperts(w_gate, w_up, w_down, resident=4, device="cpu",
                               costs=OffloadCosts(GPU, CPU, LINK, exact=False))
    out = experts.forward(x, weights, ids, "cpu").float()
    expected = fused_moe_ref(x, w_gate, w_up, w_down, weights, ids).float()
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.02)


def test_rule_threshold_by_hand():
    """float32 model, native math, in units of HI * 1e-12 s: copying W = 12 HI bytes at 1e11 B/s costs 120,
    then the device's GEMMs 6n HI FLOPs at 1e13 FLOP/s cost 0.6 n (compute-bound past its ridge of 10
    FLOP/B, i.e. from n = 20); on the CPU (1e12 FLOP/s, ridge 1) n pairs cost 6 n. Equal at n = 120 / 5.4
    = 22.2: the CPU up to 22 pairs, the copy from 23."""
    hidden, inter = 4096, 14336
    costs = OffloadCosts(GPU, CPU, LINK, dtype="float32", exact=False, gpu_overhead_s=0, cpu_overhead_s=0)
    assert costs.threshold(hidden, inter, 64) == 23
    assert costs.threshold(hidden, inter, 10) == 11  # never within 10 pairs
    w = [torch.zeros(4, 8, 4), torch.zeros(4, 8, 4), torch.zeros(4, 4, 8)]
    experts = OffloadedExperts(*w, resident=1, device="cpu", costs=costs)
    experts.hidden, experts.intermediate = hidden, inter  # the plan only reads the sizes
    assert experts.plan([3, 30, 22, 0], "rule") == ["gpu", "copy", "cpu", None]
    copy, cpu = costs.copy_s(30, hidden, inter), costs.cpu_s(22, hidden, inter)
    expected = max(costs.resident_s(3, hidden, inter) + copy, cpu)  # device side vs CPU side
    assert experts.predict_s([3, 30, 22, 0], "rule") == pytest.approx(expected)


def test_budget_splits_experts():
    assert resident_experts(48e9, 3.2e9, 0.35e9, 32, 8) == 4
    assert resident_experts(1e12, 3.2e9, 0.35e9, 32, 8) == 8
    with pytest.raises(FxforgeError, match="too small even for the dense part"):
        resident_experts(2e9, 3.2e9, 0.35e9, 32, 8)
    with pytest.raises(FxforgeError, match="resident"):
        OffloadedExperts(*layer()[0], resident=9, device="cpu", costs=OffloadCosts(GPU, CPU, LINK))


def test_bench_offload_smoke(tmp_path):
    """The bench's code path on CPU (tiny widths): every policy runs, half the experts are off the device,
    the rows carry measured and predicted times; a budget below the dense part fails before any work."""
    import json

    from typer.testing import CliRunner

    from fxforge.cli import app

    out = tmp_path / "offload.json"
    result = CliRunner().invoke(app, ["bench", "offload", "--smoke", "--repeats", "1", "--batches", "1,8",
                                      "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["resident_experts"] == 4 and data["layers"] == 2
    assert all(data["costs"][f"{k}_scale"] > 0 for k in ("gpu", "cpu", "link"))  # calibrated on layer 0
    rows = {(r["batch"], r["policy"]): r for r in data["rows"]}
    assert set(rows) == {(b, p) for b in (1, 8) for p in ("rule", "copy", "cpu")}
    assert rows[(8, "cpu")]["on_cpu"] > 0 and rows[(8, "copy")]["copied"] > 0
    assert all(r["step_s"] > 0 and r["predicted_s"] > 0 for r in rows.values())
    bad = CliRunner().invoke(app, ["bench", "offload", "--smoke", "--gpu-memory-gb", "0.00001",
                                   "--json-out", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and "too small even for the dense part" in bad.output
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", list(Policy), ids=[p.value for p in Policy])
def test_cuda_offload_matches_reference(policy):
    """On the GPU with pinned host experts: every policy equals fused_moe_ref run on the GPU (exact math:
    the CPU experts' float32 GEMMs may round differently from the GPU's, so within float32 noise)."""
    (w_gate, w_up, w_down), x, weights, ids = layer(num_experts=8, hidden=256, inter=512, tokens=64,
                                                    dtype=torch.bfloat16)
    experts = OffloadedExperts(w_gate.cuda(), w_up.cuda(), w_down.cuda(), resident=4, device="cuda",
                               costs=OffloadCosts(GPU, CPU, LINK))
    assert all(t.is_pinned() for t in experts.host[0])
    out = experts.forward(x.cuda(), weights.cuda(), ids.cuda(), policy)
    expected = fused_moe_ref(x.cuda(), w_gate.cuda(), w_up.cuda(), w_down.cuda(), weights.cuda(), ids.cuda())
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-3)
    if policy is Policy.COPY:
        assert torch.equal(out, expected)  # every expert ran on the GPU with the reference's arithmetic
