"""Device specs for the cost model: peak FLOP/s per dtype, memory bandwidth, capacity; links between devices.

Built-ins: `h100` and `h200` (xPUs), `logic-pim` (the memory-side device of the Duplex paper) and
`host-cpu` (a generic server CPU: replace it with `fxforge calibrate-device`). Any other device is
a JSON file with the keys of `DeviceSpec` (see `DeviceSpec.to_dict`), e.g.

    {"version": 1, "name": "my-gpu", "peak_flops": {"bfloat16": 3.0e14}, "mem_bandwidth": 1.0e12,
     "memory_bytes": 2.4e10, "kind": "xpu", "notes": "from the data sheet"}

A *system* file (what calibrate-device writes) holds several devices and the links between them:

    {"version": 1, "devices": [{...}, {...}],
     "links": [{"name": "pcie", "a": "my-gpu", "b": "my-cpu", "bandwidth": 5.0e10, "latency_s": 1e-5}]}

A link's `bandwidth` is bytes/s in one direction; `shared_memory` links join devices that read the
same memory (Duplex's xPU and Logic-PIM share the HBM stacks): weights need no copy across them,
activations still pay the hand-off through that memory. Between two devices no file links, the
built-in link for their kinds applies (DEFAULT_LINKS).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fxforge.ir.errors import FxforgeError

DEVICE_VERSION = 1
KINDS = ("xpu", "pim", "cpu")
_REQUIRED_KEYS = ("name", "peak_flops", "mem_bandwidth", "memory_bytes")
_OPTIONAL_KEYS = ("notes", "version", "kind")
_LINK_REQUIRED = ("name", "a", "b", "bandwidth")
_LINK_OPTIONAL = ("latency_s", "shared_memory", "notes")


@dataclass(frozen=True)
class DeviceSpec:
    """A device as the roofline sees it: compute peaks (FLOP/s, by dtype name) and one memory roof.

    kind: "xpu" (compute side), "pim" (memory side in the xPU's memory) or "cpu" (host)."""

    name: str
    peak_flops: dict[str, float] = field(hash=False)  # dtype name ("bfloat16", "float32", ...) -> FLOP/s
    mem_bandwidth: float  # bytes/s
    memory_bytes: float
    notes: str = ""
    kind: str = "xpu"

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
        if self.kind not in KINDS:
            raise FxforgeError(f"device {self.name}: kind={self.kind!r} is not one of {KINDS}")

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


@dataclass(frozen=True)
class LinkSpec:
    """A link between devices a and b: bytes/s one way, a fixed cost per transfer, shared memory or not."""

    name: str
    a: str
    b: str
    bandwidth: float
    latency_s: float = 0.0
    shared_memory: bool = False
    notes: str = ""

    def __post_init__(self):
        for key in ("name", "a", "b"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise FxforgeError(f"link {self.name!r}: {key} must be a non-empty string, got {getattr(self, key)!r}")
        if self.a == self.b:
            raise FxforgeError(f"link {self.name!r} joins device {self.a!r} to itself; a link joins two devices")
        _check_positive(f"link {self.name}: bandwidth", self.bandwidth)
        if isinstance(self.latency_s, bool) or not isinstance(self.latency_s, (int, float)) or self.latency_s < 0:
            raise FxforgeError(f"link {self.name}: latency_s must be a number >= 0, got {self.latency_s!r}")

    def joins(self, x: str, y: str) -> bool:
        return {x, y} == {self.a, self.b}

    def time_s(self, nbytes: float) -> float:
        """Seconds to move nbytes across (0 bytes: no transfer, no latency)."""
        return self.latency_s + nbytes / self.bandwidth if nbytes else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


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

# The lent H200: the project brief's measured numbers (DESIGN.md "Real parts": ~4.3 TB/s copy, ~790
# TFLOP/s bf16 matmul, 141 GB), not the data sheet's 4.8 TB/s and 989 TFLOP/s; float16 taken equal to
# bfloat16 (same tensor cores), tf32 / float32 the data-sheet peaks (the H100's: same SMs and clocks).
H200 = DeviceSpec(
    name="h200",
    peak_flops={"bfloat16": 790e12, "float16": 790e12, "tf32": 494e12, "float32": 67e12},
    mem_bandwidth=4.3e12,
    memory_bytes=141e9,
    notes="H200 SXM: bf16 790 TFLOP/s and 4.3 TB/s as measured on the lent machine (project brief); "
          "float16 = bf16; tf32 / float32 from the data sheet; 141 GB HBM3e.",
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
    kind="pim",
)

# A generic two-socket server host: 16 DDR5-4800 channels (~600 GB/s peak, ~300 GB/s achieved by a
# copy), ~100 cores with AVX-512 / AMX (order of 10 TFLOP/s bf16 at best, 3 TFLOP/s float32 taken).
# Nominal numbers only: `fxforge calibrate-device` measures the real host and replaces them.
HOST_CPU = DeviceSpec(
    name="host-cpu",
    peak_flops={"bfloat16": 3e12, "float16": 3e12, "float32": 3e12},
    mem_bandwidth=300e9,
    memory_bytes=1024e9,
    notes="generic 2-socket server (nominal, not measured): 300 GB/s, 3 TFLOP/s; use calibrate-device",
    kind="cpu",
)

DEVICES = {d.name: d for d in (H100, H200, LOGIC_PIM, HOST_CPU)}

# Link templates. PCIe 5.0 x16 is 64 GB/s per direction raw; pinned host<->device copies reach ~50
# GB/s (nominal: calibrate-device measures it). NVLink-C2C (Grace Hopper) is 900 GB/s total, 450
# each way (data sheet). Duplex's Logic-PIM sits in the xPU's HBM: no weight copy, and activations
# hand off through the HBM at the xPU's bandwidth plus a synchronisation (~2 us, our assumption).
LINK_TEMPLATES = {
    "pcie5-x16": dict(bandwidth=50e9, latency_s=10e-6, notes="PCIe 5.0 x16, ~50 GB/s pinned copies (nominal)"),
    "nvlink-c2c": dict(bandwidth=450e9, latency_s=2e-6, notes="NVLink-C2C, 450 GB/s each way (data sheet)"),
    "pim-internal": dict(bandwidth=None, latency_s=2e-6, shared_memory=True,
                         notes="shared HBM: activations at the xPU's HBM bandwidth, weights not copied"),
}
DEFAULT_LINKS = {frozenset({"xpu", "pim"}): "pim-internal", frozenset({"xpu", "cpu"}): "pcie5-x16",
                 frozenset({"pim", "cpu"}): "pcie5-x16"}


def link_from_template(template: str, a: DeviceSpec, b: DeviceSpec) -> LinkSpec:
    """A link of a named template between devices a and b (pim-internal: the xPU side's bandwidth)."""
    if template not in LINK_TEMPLATES:
        raise FxforgeError(f"link template {template!r} is unknown; templates: {sorted(LINK_TEMPLATES)}")
    values = dict(LINK_TEMPLATES[template])
    if values["bandwidth"] is None:
        values["bandwidth"] = min(d.mem_bandwidth for d in (a, b))
    return LinkSpec(name=template, a=a.name, b=b.name, **values)


@dataclass(frozen=True)
class System:
    """Devices by name and the links between them."""

    devices: dict[str, DeviceSpec] = field(hash=False)
    links: tuple[LinkSpec, ...] = ()

    def link(self, a: str, b: str) -> LinkSpec:
        for link in self.links:
            if link.joins(a, b):
                return link
        raise FxforgeError(f"no link between devices {a!r} and {b!r}; give one in a system file "
                           f"({{'links': [{{'name', 'a', 'b', 'bandwidth'}}]}}) or as 'a:b=TEMPLATE|GBps' "
                           f"(templates {sorted(LINK_TEMPLATES)})")

    def to_dict(self) -> dict:
        return {"version": DEVICE_VERSION, "devices": [d.to_dict() for d in self.devices.values()],
                "links": [link.to_dict() for link in self.links]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


_EXPECTED = f"expected a JSON object with keys {list(_REQUIRED_KEYS)} (optional {list(_OPTIONAL_KEYS)})"


def load_device_spec(name_or_path: str | Path) -> DeviceSpec:
    """A built-in device by name (h100, h200, logic-pim, host-cpu) or a DeviceSpec JSON file."""
    if isinstance(name_or_path, str) and name_or_path in DEVICES:
        return DEVICES[name_or_path]
    path, data = _read_json(name_or_path)
    if "devices" in data:
        raise FxforgeError(f"device file {path} is a system file (several devices and links); give it where a "
                           "set of devices is read (opb-placement devices), or one device's file here")
    return _device_from(data, f"device file {path}")


def load_system(entries, links=()) -> System:
    """The devices named by `entries` (built-in names, device or system files, their JSON text) and their links: a
    system file's own, then `links` entries 'a:b=TEMPLATE' or 'a:b=GBPS[/LATENCY_US]', then the default
    link of each remaining pair's kinds."""
    devices: dict[str, DeviceSpec] = {}
    found: list[LinkSpec] = []
    for entry in entries:
        if isinstance(entry, str) and entry in DEVICES:
            group = [DEVICES[entry]]
        else:
            path, data = _read_json(entry)
            group = (_system_devices(path, data, found) if "devices" in data
                     else [_device_from(data, f"device file {path}")])
        for device in group:
            if device.name in devices and devices[device.name] != device:
                raise FxforgeError(f"two different devices are named {device.name!r}; rename one")
            devices[device.name] = device
    if not devices:
        raise FxforgeError("no devices given; name at least one (built-ins: " + ", ".join(DEVICES) + ")")
    for text in links:
        found.insert(0, _parse_link(text, devices))
    chosen = []
    names = list(devices)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            given = next((link for link in found if link.joins(a, b)), None)
            template = DEFAULT_LINKS.get(frozenset({devices[a].kind, devices[b].kind}))
            if given is None and template is not None:
                given = link_from_template(template, devices[a], devices[b])
            if given is not None:
                chosen.append(given)
    return System(devices, tuple(chosen))


def _parse_link(text: str, devices: dict[str, DeviceSpec]) -> LinkSpec:
    pair, sep, value = str(text).partition("=")
    a, colon, b = pair.partition(":")
    if not sep or not colon or a not in devices or b not in devices:
        raise FxforgeError(f"link {text!r} must be 'A:B=TEMPLATE' or 'A:B=GBPS[/LATENCY_US]' with A and B among the "
                           f"devices {list(devices)}; templates {sorted(LINK_TEMPLATES)}")
    if value in LINK_TEMPLATES:
        return link_from_template(value, devices[a], devices[b])
    try:
        gbps, _, latency = value.partition("/")
        return LinkSpec(name=f"{a}:{b}", a=a, b=b, bandwidth=float(gbps) * 1e9,
                        latency_s=float(latency) * 1e-6 if latency else 0.0)
    except ValueError:
        raise FxforgeError(f"link {text!r}: {value!r} is neither a template ({sorted(LINK_TEMPLATES)}) nor "
                           "GB/s[/latency in us]") from None


def _read_json(name_or_path) -> tuple[Path | str, dict]:
    """(where, object) of a device / system file, or of inline JSON text (a resolved pass config's devices)."""
    if isinstance(name_or_path, str) and name_or_path.lstrip().startswith("{"):
        try:
            data = json.loads(name_or_path)
        except json.JSONDecodeError as exc:
            raise FxforgeError(f"inline device JSON is not valid ({exc}); {_EXPECTED}") from None
        return "(inline JSON)", data
    path = Path(name_or_path)
    if not path.is_file():
        raise FxforgeError(f"device {str(name_or_path)!r} is neither a built-in ({', '.join(DEVICES)}) "
                           f"nor a readable file; a device file is {_EXPECTED}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FxforgeError(f"device file {path} is not valid JSON ({exc}); {_EXPECTED}") from None
    if not isinstance(data, dict):
        raise FxforgeError(f"device file {path} holds a {type(data).__name__}; {_EXPECTED}")
    return path, data


def _device_from(data: dict, where: str) -> DeviceSpec:
    if not isinstance(data, dict):
        raise FxforgeError(f"{where} holds a {type(data).__name__}; {_EXPECTED}")
    data = dict(data)
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    unknown = sorted(set(data) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if missing or unknown:
        raise FxforgeError(f"{where}: missing keys {missing}, unknown keys {unknown}; {_EXPECTED}")
    version = data.pop("version", DEVICE_VERSION)
    if version != DEVICE_VERSION:
        raise FxforgeError(f"{where} has version {version!r}; this fxforge reads version {DEVICE_VERSION}")
    try:
        return DeviceSpec(**data)
    except FxforgeError as exc:
        raise FxforgeError(f"{where}: {exc}; {_EXPECTED}") from None


def _system_devices(path: Path | str, data: dict, links: list[LinkSpec]) -> list[DeviceSpec]:
    """A system file's devices; its links are appended to `links`."""
    unknown = sorted(set(data) - {"version", "devices", "links", "notes"})
    if unknown or not isinstance(data["devices"], list) or data.get("version", DEVICE_VERSION) != DEVICE_VERSION:
        raise FxforgeError(f"system file {path}: expected {{'version': {DEVICE_VERSION}, 'devices': [...], "
                           f"'links': [...]}}, got keys {sorted(data)} (unknown {unknown})")
    devices = [_device_from(d, f"system file {path}, devices[{i}]") for i, d in enumerate(data["devices"])]
    names = {d.name for d in devices}
    for i, entry in enumerate(data.get("links", [])):
        where = f"system file {path}, links[{i}]"
        if not isinstance(entry, dict):
            raise FxforgeError(f"{where} must be an object with keys {list(_LINK_REQUIRED)}")
        missing = [k for k in _LINK_REQUIRED if k not in entry]
        unknown = sorted(set(entry) - set(_LINK_REQUIRED) - set(_LINK_OPTIONAL))
        if missing or unknown:
            raise FxforgeError(f"{where}: missing keys {missing}, unknown keys {unknown}; a link has keys "
                               f"{list(_LINK_REQUIRED)} (optional {list(_LINK_OPTIONAL)})")
        if entry["a"] not in names or entry["b"] not in names:
            raise FxforgeError(f"{where} joins {entry['a']!r} and {entry['b']!r}; the file's devices are "
                               f"{sorted(names)}")
        try:
            links.append(LinkSpec(**entry))
        except FxforgeError as exc:
            raise FxforgeError(f"{where}: {exc}") from None
    return devices


__all__ = ["DeviceSpec", "LinkSpec", "System", "DEVICES", "H100", "H200", "LOGIC_PIM", "HOST_CPU",
           "LINK_TEMPLATES", "DEFAULT_LINKS", "load_device_spec", "load_system", "link_from_template",
           "DEVICE_VERSION", "KINDS"]
