"""MoE experts past a GPU memory budget, in pinned host memory, run each step where the cost model says.

An `OffloadedExperts` holds one MoE layer's experts (stacked as in ir/modules.py: w_gate, w_up
[E, I, H], w_down [E, H, I]): the first `resident` stay on the compute device, the rest live in
(pinned, on CUDA) host memory. Each forward reads how many (token, slot) pairs reach each expert
(one host sync, as Fiddler does) and runs every routed expert by the policy:
  rule  an offloaded expert with fewer than `threshold` pairs runs on the CPU (its tokens' rows
        cross the link and its outputs come back); with more, its weights are copied to the device
        and it runs there. The threshold is where the cost model (OffloadCosts) says copying wins.
  copy  every offloaded expert is copied to the device (always-copy).
  cpu   every offloaded expert runs on the CPU (always-CPU).
Resident experts always run on the device. Order of work: the CPU experts' rows go to the host
first, then the device work is queued (asynchronous on CUDA), then the CPU experts run while it
runs, then their outputs go back; so a step takes about max(device side, CPU side).

Numerics: with math="exact" every expert, wherever it runs, computes what fused_moe_ref
(kernels/moe.py) computes: both GEMMs in float32, h rounded to x's dtype, the pair's weighted output
kept per slot, the slots summed in order and rounded once; on one device the result is bit-equal to
the reference (an expert of a bf16 model converts its weights to float32 first, which costs time).
math="native" runs the GEMMs in the weights' dtype (Fiddler's choice): faster, within the dtype's
rounding of the reference, not bit-equal. The cost model counts the conversion in exact mode.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fxforge.ir.devices import DeviceSpec, LinkSpec
from fxforge.ir.errors import FxforgeError

INDEX_BYTES = 8


class Policy(str, enum.Enum):
    RULE = "rule"
    COPY = "copy"
    CPU = "cpu"


@dataclass(frozen=True)
class OffloadCosts:
    """Roofline times of the three ways to run one expert: on the device with resident weights, copied to
    the device, or on the CPU; plus a fixed cost per expert call on each side (launches, indexing)."""

    gpu: DeviceSpec
    cpu: DeviceSpec
    link: LinkSpec
    dtype: str = "bfloat16"
    exact: bool = True  # float32 math: 16-bit weights are converted (read, written and read again as float32)
    gpu_overhead_s: float = 30e-6
    cpu_overhead_s: float = 30e-6
    # measured / modelled time of each component (1: the roofline as is; fxforge bench offload fits them)
    gpu_scale: float = 1.0
    cpu_scale: float = 1.0
    link_scale: float = 1.0

    @property
    def act(self) -> int:
        return {"float32": 4}.get(self.dtype, 2)

    def _flops(self, n: int, hidden: int, inter: int) -> float:
        return 6.0 * n * hidden * inter

    def _side_s(self, device: DeviceSpec, n: int, hidden: int, inter: int) -> float:
        """One expert's GEMMs on a device, after the float32 conversion of its weights in exact mode."""
        weight = 3.0 * hidden * inter * self.act
        seconds = 0.0
        if self.exact and self.act != 4:  # read the weights, write them as float32; the GEMMs read those
            seconds += 3 * weight / device.mem_bandwidth
            weight *= 2
        math_dtype = "float32" if self.exact else self.dtype
        return seconds + device.time_s(self._flops(n, hidden, inter), weight + 2 * n * hidden * 4, math_dtype)

    def resident_s(self, n: int, hidden: int, inter: int) -> float:
        return self.gpu_scale * (self.gpu_overhead_s + self._side_s(self.gpu, n, hidden, inter))

    def weight_copy_s(self, hidden: int, inter: int) -> float:
        return self.link_scale * self.link.time_s(3.0 * hidden * inter * self.act)

    def copy_s(self, n: int, hidden: int, inter: int) -> float:
        return self.weight_copy_s(hidden, inter) + self.resident_s(n, hidden, inter)

    def cpu_s(self, n: int, hidden: int, inter: int) -> float:
        """CPU compute + the rows' round trip across the link."""
        rows = 2 * self.link_scale * self.link.time_s(n * hidden * self.act)
        return self.cpu_scale * (self.cpu_overhead_s + self._side_s(self.cpu, n, hidden, inter)) + rows

    def threshold(self, hidden: int, inter: int, max_pairs: int) -> int:
        """Least n at which copying to the device is at least as fast as the CPU (max_pairs + 1: never)."""
        for n in range(1, max_pairs + 1):
            if self.copy_s(n, hidden, inter) <= self.cpu_s(n, hidden, inter):
                return n
        return max_pairs + 1


def expert_rows(x_rows: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                 pair_weights: torch.Tensor, out_dtype: torch.dtype, exact: bool) -> torch.Tensor:
    """One expert on its rows, float32 [n, H] weighted outputs (exact: fused_moe_ref's arithmetic)."""
    if exact:
        xe = x_rows.float()
        h = (F.silu(xe @ w_gate.float().T) * (xe @ w_up.float().T)).to(out_dtype).float()
        return (h @ w_down.float().T) * pair_weights[:, None].float()
    xe = x_rows.to(w_gate.dtype)
    h = F.silu(xe @ w_gate.T) * (xe @ w_up.T)
    return (h @ w_down.T).float() * pair_weights[:, None].float()


class OffloadedExperts:
    """One MoE layer's experts: the first `resident` on `device`, the others in (pinned) host memory."""

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, resident: int,
                 device: torch.device | str, costs: OffloadCosts):
        num_experts = w_gate.shape[0]
        if not 0 <= resident <= num_experts:
            raise FxforgeError(f"resident={resident} experts must be in 0..{num_experts}")
        self.device = torch.device(device)
        self.num_experts, self.resident, self.exact = num_experts, resident, costs.exact
        self.intermediate, self.hidden = w_gate.shape[1], w_gate.shape[2]
        self.costs = costs
        pin = self.device.type == "cuda"
        # copies, not views: a view would keep the whole stack (the offloaded experts too) on the device
        self.gpu = [tuple(w[e].to(self.device, copy=True) for w in (w_gate, w_up, w_down)) for e in range(resident)]
        self.host = [tuple(_host(w[e], pin) for w in (w_gate, w_up, w_down)) for e in range(resident, num_experts)]
        self.dtype = w_gate.dtype
        # one device buffer a copied expert lands in (reused: copies of a step run in stream order)
        self.staging = tuple(torch.empty_like(w, device=self.device) for w in self.host[0]) if self.host else None

    def threshold(self, max_pairs: int) -> int:
        return self.costs.threshold(self.hidden, self.intermediate, max_pairs)

    def plan(self, counts: list[int], policy: Policy | str) -> list[str | None]:
        """Per expert: 'gpu' (resident), 'copy', 'cpu', or None (no pairs)."""
        policy = Policy(policy)
        threshold = self.threshold(max(counts) if counts else 0)
        where = []
        for expert, n in enumerate(counts):
            if n == 0:
                where.append(None)
            elif expert < self.resident:
                where.append("gpu")
            elif policy is Policy.COPY or (policy is Policy.RULE and n >= threshold):
                where.append("copy")
            else:
                where.append("cpu")
        return where

    def predict_s(self, counts: list[int], policy: Policy | str) -> float:
        """Modelled seconds of one forward: max(device side, CPU side), each a sum over its experts."""
        sides = {"device": 0.0, "cpu": 0.0}
        for n, where in zip(counts, self.plan(counts, policy)):
            if where is None:
                continue
            time = {"gpu": self.costs.resident_s, "copy": self.costs.copy_s, "cpu": self.costs.cpu_s}[where]
            sides["cpu" if where == "cpu" else "device"] += time(n, self.hidden, self.intermediate)
        return max(sides.values())

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor,
                policy: Policy | str = Policy.RULE) -> torch.Tensor:
        """x [T, H] on the device, routing [T, k] -> sum_k weight * expert_k(x), [T, H] in x's dtype."""
        if x.device != self.device or x.dim() != 2 or x.shape[1] != self.hidden or x.dtype != self.dtype:
            raise ValueError(f"x must be {self.dtype} [T, {self.hidden}] on {self.device}, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        flat = expert_ids.reshape(-1).long()
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        where = self.plan(counts, policy)
        per_slot = torch.zeros(*expert_ids.shape, self.hidden, dtype=torch.float32, device=x.device)
        pairs = {e: (expert_ids == e).nonzero(as_tuple=True) for e, w in enumerate(where) if w is not None}
        cpu_rows = {e: (x[pairs[e][0]].to("cpu", non_blocking=False), weights[pairs[e]].to("cpu"))
                    for e, w in enumerate(where) if w == "cpu"}
        for expert, w in enumerate(where):  # device work: queued, asynchronous on CUDA
            if w in ("gpu", "copy"):
                token, slot = pairs[expert]
                per_slot[token, slot] = expert_rows(x[token], *self.device_weights(expert, w), weights[token, slot],
                                                     x.dtype, self.exact)
        for expert, (rows, pair_weights) in cpu_rows.items():  # CPU work, while the device runs
            token, slot = pairs[expert]
            out = expert_rows(rows, *self.host[expert - self.resident], pair_weights, x.dtype, self.exact)
            per_slot[token, slot] = out.to(x.device, non_blocking=True)
        return per_slot.sum(dim=1).to(x.dtype)

    def device_weights(self, expert: int, where: str) -> tuple[torch.Tensor, ...]:
        """An expert's weights on the device: its own (resident) or copied into the staging buffer."""
        if where == "gpu":
            return self.gpu[expert]
        for target, source in zip(self.staging, self.host[expert - self.resident]):
            target.copy_(source, non_blocking=True)
        return self.staging


def _host(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    host = tensor.detach().to("cpu").contiguous()
    return host.pin_memory() if pin else host.clone()


def resident_experts(budget_bytes: float, dense_bytes: float, expert_bytes: float, num_layers: int,
                     num_experts: int) -> int:
    """Experts per layer the device keeps within budget after the dense part; FxforgeError when even the
    dense part does not fit."""
    if budget_bytes < dense_bytes:
        raise FxforgeError(f"--gpu-memory-gb {budget_bytes / 1e9:.1f} is too small even for the dense part "
                           f"({dense_bytes / 1e9:.1f} GB of non-expert weights); give at least that")
    return min(num_experts, int((budget_bytes - dense_bytes) // (expert_bytes * num_layers)))


__all__ = ["Policy", "OffloadCosts", "OffloadedExperts", "expert_rows", "resident_experts"]
