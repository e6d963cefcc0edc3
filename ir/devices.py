"""Device specs for the cost model: peak FLOP/s per dtype, memory bandwidth, capacity.

Built-ins: `h100` (the xPU) and `logic-pim` (the memory-side device of the Duplex paper). Any other
device is a JSON file with the keys of `DeviceSpec` (see `DeviceSpec.to_dict`), e.g.

    {"version": 1, "name": "my-gpu", "peak_flops": {"bfloat16": 3.0e14}, "mem_bandwidth": 1.0e12,
     "memory_bytes": 2.4e10, "notes": "from the data sheet"}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fxforge.ir.errors import FxforgeError

DEVICE_VERSION = 1
_REQUIRED_KEYS = ("name", "peak_flops", "mem_bandwidth", "memory_bytes")
_OPTIONAL_KEYS = ("notes", "version")


@dataclass(frozen=True)
class DeviceSpec:
    """A device as the roofline sees it: compute peaks (FLOP/s, by dtype name) and one memory roof."""

    name: str
    peak_flops: dict[str, float] = field(hash=False)  # dtype name ("bfloat16", "float32", ...) -> FLOP/s
    mem_bandwidth: float  # bytes/s
    memory_bytes: float
    notes: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise FxforgeError(f"device name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.peak_flops, dict) or not self.peak_flops:
            raise FxforgeError(f"device {self.name}: peak_flops must be a non-empty {{dtype: FLOP/s}} mapping, "
                               f"got {self.peak_flops!r}")
        for dtype, value in self.peak_flops.items():
            _check_positive(f"device {self.name}: peak_flops[{dtype!r}]", value)
        _check_positive(f"device {self.name}: mem_bandwidth", self.mem_bandwidth)
        _check_positive(f"device {self.name}: memory_bytes", self.memory_bytes)

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for dtype; FxforgeError naming the dtypes this device knows."""
        if dtype not in self.peak_flops:
            raise FxforgeError(f"device {self.name} has no peak FLOP/s for dtype {dtype!r}; "
                               f"known: {sorted(self.peak_flops)}")
        return self.peak_flops[dtype]

    def ridge(self, dtype: str) -> float:
        """Op/B at which the compute roof meets the memory roof."""
        return self.peak(dtype) / self.mem_bandwidth

    def time_s(self, flops: float, nbytes: float, dtype: str) -> float:
        """Roofline time of one op: max(compute time, memory time); no overlap between ops, no launch cost."""
        return max(flops / self.peak(dtype), nbytes / self.mem_bandwidth)

    def bound(self, flops: float, nbytes: float, dtype: str) -> str:
        """"compute" or "memory": the roof that sets `time_s`."""
        return "compute" if flops / self.peak(dtype) > nbytes / self.mem_bandwidth else "memory"

    def to_dict(self) -> dict:
        return {"version": DEVICE_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _check_positive(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FxforgeError(f"{what} must be a positive number, got {value!r}")


H100 = DeviceSpec(
    name="h100",
    peak_flops={"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12},
    mem_bandwidth=3.35e12,
    memory_bytes=80e9,
    notes="H100 SXM5, dense tensor-core peaks (no sparsity); float32 is the non-tensor-core peak, "
          "tf32 the tensor-core one; HBM3 3.35 TB/s, 80 GB.",
)

# Duplex (2024), Logic-PIM: each of the xPU's 5 HBM stacks gets logic with 4x the bandwidth the xPU
# sees per stack and a compute-to-bandwidth ratio of 8 FLOP/B, i.e. 21.3 TFLOPS per stack.
# Total: 5 x 21.3 = 106.5 TFLOPS; bandwidth 106.5e12 / 8 = 13.3 TB/s (~4 x 3.35 TB/s of an H100).
# Capacity is the same HBM as the xPU's. The paper's units compute in 16-bit floats, so only the
# 16-bit dtypes have a peak here.
LOGIC_PIM = DeviceSpec(
    name="logic-pim",
    peak_flops={"bfloat16": 106.5e12, "float16": 106.5e12},
    mem_bandwidth=106.5e12 / 8,
    memory_bytes=80e9,
    notes="Duplex Logic-PIM: 5 stacks x 21.3 TFLOPS = 106.5 TFLOPS; compute/bandwidth = 8 FLOP/B "
          "=> 13.3 TB/s (4x the xPU's per-stack HBM bandwidth).",
)

DEVICES = {d.name: d for d in (H100, LOGIC_PIM)}


def load_device_spec(name_or_path: str | Path) -> DeviceSpec:
    """A built-in device by name ("h100", "logic-pim") or a DeviceSpec JSON file."""
    if isinstance(name_or_path, str) and name_or_path in DEVICES:
        return DEVICES[name_or_path]
    path = Path(name_or_path)
    expected = f"expected a JSON object with keys {list(_REQUIRED_KEYS)} (optional {list(_OPTIONAL_KEYS)})"
    if not path.is_file():
        raise FxforgeError(f"device {str(name_or_path)!r} is neither a built-in ({', '.join(DEVICES)}) "
                           f"nor a readable file; a device file is {expected}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FxforgeError(f"device file {path} is not valid JSON ({exc}); {expected}") from None
    if not isinstance(data, dict):
        raise FxforgeError(f"device file {path} holds a {type(data).__name__}; {expected}")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    unknown = sorted(set(data) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if missing or unknown:
        raise FxforgeError(f"device file {path}: missing keys {missing}, unknown keys {unknown}; {expected}")
    version = data.pop("version", DEVICE_VERSION)
    if version != DEVICE_VERSION:
        raise FxforgeError(f"device file {path} has version {version!r}; this fxforge reads version {DEVICE_VERSION}")
    try:
        return DeviceSpec(**data)
    except FxforgeError as exc:
        raise FxforgeError(f"device file {path}: {exc}; {expected}") from None


__all__ = ["DeviceSpec", "DEVICES", "H100", "LOGIC_PIM", "load_device_spec", "DEVICE_VERSION"]
