"""`fxforge calibrate-device`: measure this machine and write a system file (devices + links) for the cost model.

    system = calibrate(settings, progress)      # -> fxforge.ir.devices.System
    system.save("dev.json")

Measured, each as the median of `reps` timed runs after `warmup` untimed ones:
  CPU   copy bandwidth (bytes read + written by a tensor copy), matmul FLOP/s in float32 and bfloat16
        (torch.mm on the threads torch uses), memory size (physical pages)
  GPU   copy bandwidth (device to device), matmul FLOP/s in bfloat16 / float16 / float32 (tf32 off),
        memory size, and the host link: pinned host-to-device and device-to-host copies (the link's
        bandwidth is the slower direction; its latency the time of a 4-byte copy)
On a machine without CUDA the GPU parts are skipped, and the file says so in its notes. The devices
are named `<prefix>-gpu` and `<prefix>-cpu`; the opb-placement pass reads the file as one entry of
its `devices`.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fxforge.ir.devices import DeviceSpec, LinkSpec, System
from fxforge.ir.errors import FxforgeError


@dataclass(frozen=True)
class CalibrationSettings:
    """Sizes and repetitions; `quick` shrinks every buffer (a smoke run: numbers are not meaningful)."""

    reps: int = 5
    warmup: int = 2
    quick: bool = False
    prefix: str = "local"
    gpu: bool = True  # measure the GPU when CUDA is available

    def __post_init__(self):
        if isinstance(self.reps, bool) or not isinstance(self.reps, int) or self.reps < 1:
            raise FxforgeError(f"--reps must be an integer >= 1, got {self.reps!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise FxforgeError(f"--warmup must be an integer >= 0, got {self.warmup!r}")
        if not self.prefix or not all(c.isalnum() or c in "-_" for c in self.prefix):
            raise FxforgeError(f"--prefix {self.prefix!r} must be letters, digits, '-' or '_'")

    @property
    def copy_bytes(self) -> int:
        return (8 << 20) if self.quick else (512 << 20)

    @property
    def matmul_size(self) -> int:
        return 256 if self.quick else 4096


def median_seconds(fn: Callable[[], None], reps: int, warmup: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of fn() over reps runs after warmup runs (sync() after each, e.g. a CUDA sync)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _copy_bandwidth(device: str, nbytes: int, settings: CalibrationSettings, sync) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), settings.reps, settings.warmup, sync)
    return 2 * src.numel() * 4 / seconds  # read + write


def _matmul_flops(device: str, dtype: torch.dtype, n: int, settings: CalibrationSettings, sync) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), settings.reps, settings.warmup, sync)
    return 2 * n ** 3 / seconds


def _host_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16e9  # sysconf missing (not Linux): a placeholder, stated in the notes


def calibration_steps(settings: CalibrationSettings) -> list[tuple[str, str]]:
    """(where, what) of every measurement calibrate makes with these settings on this machine."""
    gpu = settings.gpu and torch.cuda.is_available()
    steps = [("cpu", "copy"), ("cpu", "float32"), ("cpu", "bfloat16")]
    if gpu:
        steps += [("gpu", "copy"), ("gpu", "bfloat16"), ("gpu", "float16"), ("gpu", "float32"),
                  ("link", "h2d"), ("link", "d2h"), ("link", "latency")]
    return steps


def calibrate(settings: CalibrationSettings = CalibrationSettings(),
              progress: Callable[[str], None] | None = None) -> System:
    """Measure the CPU (and the GPU and its host link when CUDA is available and settings.gpu);
    progress(step name) after each measurement."""
    gpu = settings.gpu and torch.cuda.is_available()
    results: dict[tuple[str, str], float] = {}
    for where, what in calibration_steps(settings):
        results[(where, what)] = _measure(where, what, settings)
        if progress is not None:
            progress(f"{where} {what}")
    cpu = DeviceSpec(
        name=f"{settings.prefix}-cpu", kind="cpu",
        peak_flops={"float32": results[("cpu", "float32")], "bfloat16": results[("cpu", "bfloat16")],
                    "float16": results[("cpu", "bfloat16")]},
        mem_bandwidth=results[("cpu", "copy")], memory_bytes=_host_memory_bytes(),
        notes=f"measured by fxforge calibrate-device on {torch.get_num_threads()} threads (median of {settings.reps}"
              f"{', quick sizes: not meaningful' if settings.quick else ''}); float16 taken = bfloat16"
              + ("" if gpu else "; GPU parts skipped: " + ("no CUDA device" if settings.gpu else "--no-gpu")))
    devices, links = [cpu], []
    if gpu:
        name = torch.cuda.get_device_name()
        device = DeviceSpec(
            name=f"{settings.prefix}-gpu", kind="xpu",
            peak_flops={d: results[("gpu", d)] for d in ("bfloat16", "float16", "float32")},
            mem_bandwidth=results[("gpu", "copy")],
            memory_bytes=float(torch.cuda.get_device_properties(0).total_memory),
            notes=f"{name}, measured by fxforge calibrate-device (median of {settings.reps}); float32 with TF32 off")
        devices.insert(0, device)
        links.append(LinkSpec(name="host-link", a=device.name, b=cpu.name,
                              bandwidth=min(results[("link", "h2d")], results[("link", "d2h")]),
                              latency_s=results[("link", "latency")],
                              notes=f"pinned copies: h2d {results[('link', 'h2d')] / 1e9:.1f} GB/s, "
                                    f"d2h {results[('link', 'd2h')] / 1e9:.1f} GB/s"))
    return System({d.name: d for d in devices}, tuple(links))


def _measure(where: str, what: str, settings: CalibrationSettings) -> float:
    if where == "cpu":
        if what == "copy":
            return _copy_bandwidth("cpu", settings.copy_bytes, settings, lambda: None)
        return _matmul_flops("cpu", getattr(torch, what), settings.matmul_size // 2 if what == "bfloat16"
                             else settings.matmul_size, settings, lambda: None)
    sync = torch.cuda.synchronize
    if where == "gpu":
        if what == "copy":
            return _copy_bandwidth("cuda", 4 * settings.copy_bytes, settings, sync)
        torch.backends.cuda.matmul.allow_tf32 = False
        return _matmul_flops("cuda", getattr(torch, what), 2 * settings.matmul_size, settings, sync)
    host = torch.empty(settings.copy_bytes // 4 if what != "latency" else 1, dtype=torch.float32).pin_memory()
    dev = torch.empty(host.numel(), dtype=torch.float32, device="cuda")
    src, dst = (dev, host) if what == "d2h" else (host, dev)
    seconds = median_seconds(lambda: dst.copy_(src, non_blocking=True), settings.reps, settings.warmup, sync)
    return seconds if what == "latency" else host.numel() * 4 / seconds


__all__ = ["CalibrationSettings", "calibrate", "calibration_steps", "median_seconds"]
