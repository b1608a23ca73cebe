"""The environment a benchmark ran in, printed above every table (no torch, no heavy imports)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

_PACKAGES = ("numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "tensorrt", "coremltools", "executorch", "torch",
             "onnx")


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def cpu_name() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith(("model name", "hardware")):
            return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def versions() -> dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def environment(threads: Optional[int] = None) -> dict[str, Any]:
    import onnxruntime as ort

    env: dict[str, Any] = {
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads or "default",
        "python": platform.python_version(),
        "versions": versions(),
        "onnxruntime_providers": ort.get_available_providers(),
        "gpus": gpus(),
    }
    try:  # other jobs on the machine make latencies noisy: record how busy it was
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    if board := _read("/proc/device-tree/model"):
        env["board"] = board
    if l4t := _read("/etc/nv_tegra_release"):  # Jetson: L4T release, from which JetPack follows
        env["l4t"] = l4t.splitlines()[0]
    return env


def machine_slug() -> str:
    """A file-name-safe name for this machine's results (benchmarks/results/<machine>.md)."""
    import re

    name = cpu_name().lower()
    name = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$", " ", name)
    gpu = gpus()
    if gpu:
        name = gpu[0].split(",")[0].lower() + " " + name
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"{slug}-{os.cpu_count()}c" if slug else f"{platform.machine()}-{os.cpu_count()}c"
