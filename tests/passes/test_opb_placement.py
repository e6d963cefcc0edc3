"""passes/opb_placement.py: the DP against hand-computed placements and exhaustive search, transfers
counted once per value and device, the GQA rule, the expert threshold, plan round-trip, bad input."""

import dataclasses
import itertools
import json
import random

import pytest
import torch

import fxforge
from fxforge.artifact import load_artifact
from fxforge.errors import FxforgeError, PassConfigError
from fxforge.ir.capture import META_KEY, capture, meta
from fxforge.ir.cost import BatchDesc, annotate_costs
from fxforge.ir.devices import H100, H200, LOGIC_PIM, DeviceSpec, LinkSpec, System
from fxforge.ir.model import Model
from fxforge.passes import OpBPlacement
from fxforge.passes.manager import resolve
from fxforge.passes.opb_placement import (PLAN_KEY, ExpertCoster, MemoryPlan, Unit, break_even_op_per_byte, build_units,
                                          expert_token_counts, memory_plan, place, placement_markdown,
                                          plot_placement, solve, transfers_of)
from tests.conftest import TINY_SPECS, tiny_model

A = DeviceSpec("a", {"bfloat16": 1e12}, 1e11, 1e12, kind="xpu")
B = DeviceSpec("b", {"bfloat16": 1e11}, 1e12, 1e12, kind="pim")
LINK = LinkSpec("ab", "a", "b", bandwidth=1e9, latency_s=1.0)  # 1 s + 1 ns per byte
AB = System({"a": A, "b": B}, (LINK,))


def unit(i, a, b, **inputs):
    return Unit(f"u{i}", [], {"a": a, "b": b}, {int(k[1:]): v for k, v in inputs.items()}, order=i)


def brute_force(units, system):
    best = None
    for devices in itertools.product(system.devices, repeat=len(units)):
        moves = transfers_of(units, list(devices), system)
        total = sum(u.times[d] for u, d in zip(units, devices)) + sum(t.seconds for t in moves)
        best = total if best is None else min(best, total)
    return best


# ----------------------------------------------------------------------------------------------
# The DP
# ----------------------------------------------------------------------------------------------

def test_chain_by_hand():
    # u0 (a: 1, b: 9) -> u1 (a: 10, b: 2) -> u2 (a: 1, b: 9); moving a value costs 1 s + bytes * 1 ns.
    # all on a: 12; a,b,a: 1 + 2 + 1 + 2 moves of 1 s = 6 (bytes 0); all on b: 20.
    units = [unit(0, 1, 9), unit(1, 10, 2, u0=0), unit(2, 1, 9, u1=0)]
    # zero-byte values cost nothing to move (LinkSpec.time_s(0) = 0): give them bytes
    units[1].inputs[0] = units[2].inputs[1] = 1e9  # 1 s of bandwidth each: a move costs 2 s
    solution = solve(units, AB)
    # a,b,a: 1 + 2 + 1 + 2 * 2 = 8 < all on a (12) < all on b (20)
    assert solution.devices == ["a", "b", "a"] and solution.total_s == pytest.approx(8.0)
    assert [(t.unit, t.src, t.dst) for t in solution.transfers] == [(0, "a", "b"), (1, "b", "a")]


def test_a_value_moves_once_per_device():
    # u0 on a feeds u1, u2, u3, all much faster on b: one move of u0 serves all three.
    units = [unit(0, 0, 100), unit(1, 10, 1, u0=5e8), unit(2, 10, 1, u0=5e8), unit(3, 10, 1, u0=5e8)]
    solution = solve(units, AB)
    assert solution.devices == ["a", "b", "b", "b"]
    assert len(solution.transfers) == 1 and solution.total_s == pytest.approx(0 + 3 * 1 + 1.5)


def test_dp_equals_exhaustive_search_on_random_dags():
    rng = random.Random(0)
    c = DeviceSpec("c", {"bfloat16": 1e12}, 1e11, 1e12, kind="cpu")
    system = System({"a": A, "b": B, "c": c}, (LINK, LinkSpec("ac", "a", "c", 2e9, 0.5),
                                               LinkSpec("bc", "b", "c", 5e8, 0.2)))
    for trial in range(25):
        n = rng.randint(3, 7)
        units = []
        for i in range(n):
            inputs = {v: rng.choice([0.0, 1e8, 1e9, 3e9]) for v in rng.sample(range(i), min(i, rng.randint(0, 3)))}
            units.append(Unit(f"u{i}", [], {d: rng.uniform(0.1, 5) for d in system.devices}, inputs, order=i))
        assert solve(units, system).total_s == pytest.approx(brute_force(units, system)), f"trial {trial}"


def test_unlinked_devices_never_exchange_values():
    system = System({"a": A, "b": B}, ())
    units = [unit(0, 1, 9), unit(1, 10, 2, u0=1.0)]
    solution = solve(units, system)
    assert solution.devices == ["a", "a"] and solution.transfers == []


# ----------------------------------------------------------------------------------------------
# On graphs
# ----------------------------------------------------------------------------------------------

MID = dataclasses.replace(TINY_SPECS["mixtral-moe"], hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                          intermediate_size=14336, moe_intermediate_size=14336, num_experts=8, vocab_size=32000)


def meta_graph(spec):
    return capture(Model.from_state_dict(spec, None, device="meta", dtype=torch.bfloat16).module)


def test_gqa_group_stays_on_one_device():
    """Decode attention (Op/B ~ g = 4) goes to the PIM side, the projections (Op/B ~ batch) to the xPU,
    and each layer's GQA unit (q/k norms, ropes, KV write, attention) is on one device."""
    gm = meta_graph(MID)
    place(gm, OpBPlacement(devices=("h200", "logic-pim"), batch=64, context=4096))
    units, node_unit = build_units(gm)
    gqa = [u for u in units if u.key.startswith("gqa.")]
    assert len(gqa) == MID.num_layers
    for u in gqa:
        roles = sorted(meta(n).role for n in u.nodes if META_KEY in n.meta)
        assert roles.count("rope") == 2 and "attention" in roles and "kv_write" in roles, roles
        assert {meta(n).notes[PLAN_KEY]["device"] for n in u.nodes} == {"logic-pim"}
    devices = {meta(n).role: meta(n).notes[PLAN_KEY]["device"] for n in gm.graph.nodes
               if META_KEY in n.meta and PLAN_KEY in meta(n).notes}
    assert devices["q_proj"] == devices["o_proj"] == "h200"
    plan = gm.meta[PLAN_KEY]
    # the activations that cross: q, k, v into each GQA unit and its output back, through the shared HBM
    link = plan["per_link"]["pim-internal"]
    assert link["transfers"] >= 4 * MID.num_layers and plan["transfer_s"] > 0
    assert plan["predicted_step_s"] < min(plan["single_device_s"].values())
    total = sum(plan["per_device_s"].values()) + plan["transfer_s"]
    assert total == pytest.approx(plan["predicted_step_s"], rel=1e-9)


def test_prefill_stays_on_the_xpu():
    gm = meta_graph(dataclasses.replace(MID, num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0,
                                        family="llama"))
    plan = place(gm, OpBPlacement(devices=("h200", "logic-pim"), phase="prefill", batch=4, context=2048))
    assert {op["device"] for op in plan["ops"] if op["role"] in ("attention", "q_proj", "mlp_up")} == {"h200"}


def test_expert_threshold_by_hand():
    """GPU (100 TF, 1 TB/s), CPU (1 TF, 1 TB/s) holding the offloaded experts, link 100 GB/s. On the GPU an
    offloaded expert's weights (W = 6HI bytes) are copied (W/1e11 s) and then read (W/1e12 s): 11 W/1e12;
    on the CPU n pairs take 6nHI/1e12 = n W/1e12 s plus their activations' trip across the link: the CPU
    wins up to n = 10, the GPU from n = 11 (activations break the tie at 11)."""
    gpu = DeviceSpec("gpu", {"bfloat16": 1e14}, 1e12, 40e9, kind="xpu")
    cpu = DeviceSpec("cpu", {"bfloat16": 1e12}, 1e12, 1e12, kind="cpu")
    system = System({"gpu": gpu, "cpu": cpu}, (LinkSpec("pcie", "gpu", "cpu", 1e11),))
    spec = dataclasses.replace(MID, num_layers=2)
    config = OpBPlacement(devices=("h200",), batch=64, context=128)
    memory = MemoryPlan(dense_bytes=0, kv_bytes=0, expert_bytes=0, budget_bytes=40e9, resident_experts=4)
    coster = ExpertCoster(spec, config.workload(), system, memory)
    rule = coster.rule("gpu")
    assert (rule.compute_side, rule.memory_side, rule.threshold_tokens) == ("gpu", "cpu", 11)
    choices = coster.choices([1, 50, 10, 11, 1, 50, 10, 11], "gpu")
    # experts 0-3 are resident on the GPU: always there; 4-7 follow the threshold
    assert [d for d, _ in choices] == ["gpu"] * 4 + ["cpu", "gpu", "cpu", "gpu"]


def test_token_counts():
    assert expert_token_counts([0.25] * 4, 10, 10) == [3, 3, 2, 2]
    assert sum(expert_token_counts([0.5, 0.3, 0.2], 7, 7)) == 7
    assert expert_token_counts([0.9, 0.05, 0.05], 8, 4) == [4, 2, 2]  # an expert gets each token once at most


def test_break_even_by_hand():
    # no transfer: Logic-PIM beats the H100 while its compute time x*B/P_pim < B/BW_h100, i.e. x < P_pim/BW_h100
    x = break_even_op_per_byte(1e6, 0.0, H100, LOGIC_PIM, None, "bfloat16")
    assert x == pytest.approx(LOGIC_PIM.peak("bfloat16") / H100.mem_bandwidth, rel=1e-6)
    slow = LinkSpec("l", "h100", "logic-pim", 1e9)  # moving the activations costs more than any op saves
    assert break_even_op_per_byte(1e6, 1e9, H100, LOGIC_PIM, slow, "bfloat16") is None


def test_skewed_and_measured_distributions_and_round_trip(tmp_path):
    """Skewed routing sends more pairs to the first experts; measured shares come from the graph's own
    routing and are recorded, so the artifact replays without data and restores the same plan."""
    model = tiny_model("mixtral-moe")
    skewed = fxforge.optimize(model, passes=[OpBPlacement(devices=("h200", "host-cpu"), batch=32, context=64,
                                                          experts="skewed", skew=1.5)])
    counts = skewed.passes[0]["report"]["expert_rules"]["0"]["tokens_per_expert"]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] and sum(counts) == 64
    calib = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0)).tolist()
    opt = fxforge.optimize(model, passes=[OpBPlacement(devices=("h200", "logic-pim"), batch=16, context=64,
                                                       experts="measured", calib_tokens=64, calib_context=32)],
                           calib=calib)
    record = opt.passes[0]
    shares = record["config"]["expert_shares"]
    assert len(shares) == 2 and all(abs(sum(s) - 1) < 1e-9 for s in shares)
    assert shares[0] != [0.25] * 4  # measured, not uniform
    opt.save(tmp_path / "art")
    plan = json.loads((tmp_path / "art" / "plan.json").read_text())
    saved = plan["passes"][0]["report"]
    loaded = load_artifact(tmp_path / "art")
    assert loaded.passes[0]["report"]["predicted_step_s"] == saved["predicted_step_s"]
    replayed = loaded.module.meta[PLAN_KEY]
    assert replayed["predicted_step_s"] == pytest.approx(saved["predicted_step_s"])
    assert [op["device"] for op in replayed["ops"]] == [op["device"] for op in saved["ops"]]
    text = placement_markdown(saved, "placement.png")
    assert "predicted step time" in text and "| attention |" in text and "threshold" in text
    assert plot_placement(saved, tmp_path / "p.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def test_bad_input(tmp_path):
    with pytest.raises(PassConfigError, match="a100.*neither a built-in"):
        resolve({"name": "opb-placement", "devices": ["h100", "a100"]})
    bad = tmp_path / "dev.json"
    bad.write_text(json.dumps({"name": "x", "peak_flops": {"bfloat16": 1e12}, "memory_bytes": 1e9}))
    with pytest.raises(PassConfigError, match="missing keys \\['mem_bandwidth'\\]"):
        resolve({"name": "opb-placement", "devices": ["h100", str(bad)]})
    with pytest.raises(PassConfigError, match="no peak FLOP/s for dtype 'float32'"):
        resolve({"name": "opb-placement", "devices": ["h100", "logic-pim"], "dtype": "float32"})
    mixtral = dataclasses.replace(MID, num_layers=32)
    with pytest.raises(PassConfigError, match="cannot be held"):
        memory_plan(OpBPlacement(devices=("h100", "logic-pim"), batch=64, context=4096), mixtral)
    with pytest.raises(PassConfigError, match="too small even for the dense part"):
        memory_plan(OpBPlacement(devices=("h200", "host-cpu"), batch=8, context=4096, memory_budget_gb=2), mixtral)
    plan = memory_plan(OpBPlacement(devices=("h200", "host-cpu"), batch=8, context=4096, memory_budget_gb=40), mixtral)
    assert 0 < plan.resident_experts < 8
    with pytest.raises(FxforgeError, match="needs calibration data"):
        fxforge.optimize(tiny_model("mixtral-moe"), passes=[OpBPlacement(experts="measured", devices=("h200",),
                                                                         batch=4, context=16)])
    assert H200.memory_bytes == 141e9


def test_memory_side_roles_keep_other_ops_on_the_compute_side():
    """At decode batch 8 the projections (Op/B ~ 8) are faster on Logic-PIM too; Duplex's mapping lets only
    attention and the experts leave the xPU, and the DP must respect it (at a modelled cost)."""
    gm = meta_graph(MID)
    free = place(gm, OpBPlacement(devices=("h200", "logic-pim"), batch=8, context=2048))
    assert free["placement"]["q_proj"]["devices"] == {"logic-pim": MID.num_layers}
    mapped = place(gm, OpBPlacement(devices=("h200", "logic-pim"), batch=8, context=2048,
                                    memory_side_roles=("attention", "expert")))
    for role in ("q_proj", "o_proj", "router", "lm_head", "embed"):
        assert set(mapped["placement"][role]["devices"]) == {"h200"}, role
    assert mapped["predicted_step_s"] > free["predicted_step_s"]
    with pytest.raises(PassConfigError, match="unknown roles \\['qproj'\\]"):
        resolve({"name": "opb-placement", "memory_side_roles": ["qproj"]})


@pytest.mark.parametrize("backend", ["none", "torch"], ids=["captured", "lowered"])
def test_gqa_unit_holds_the_head_norms(backend):
    """Qwen3's q/k norms act on the heads of each KV group: they join the GQA unit, as modules and after
    lowering (fxforge::rmsnorm)."""
    passes = [] if backend == "none" else [{"name": "lower", "backend": backend}]
    opt = fxforge.optimize(tiny_model("qwen3-qknorm"), passes=passes)
    annotate_costs(opt.module, opt.spec, BatchDesc("decode", 4, 64))
    units, _ = build_units(opt.module)
    for layer in range(opt.spec.num_layers):
        (gqa,) = [u for u in units if u.key == f"gqa.{layer}"]
        names = [str(n.target) for n in gqa.nodes] + [str(a.target) for n in gqa.nodes for a in n.all_input_nodes]
        assert sum("q_norm" in t for t in names) >= 1 and sum("k_norm" in t for t in names) >= 1, names
