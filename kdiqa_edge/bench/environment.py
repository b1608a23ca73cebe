"""The environment a benchmark ran in, printed above every table (no torch, no heavy imports)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("numpy", "pillow", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "coremltools", "executorch",
             "torch", "onnx")


def _read(path: str) -> str | None:
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
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], check=False, capture_output=True,
                                  text=True, timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


# The instruction-set flags ONNX Runtime's INT8 and FP32 kernels depend on, as /proc/cpuinfo names them:
# VNNI speeds up U8S8 GEMM/conv, AVX-VNNI-INT8 makes S8S8 fast, AMX runs INT8/BF16 tiles; ARM's dot product
# (asimddp), int8 matrix multiply (i8mm) and SVE play the same roles there. INT8 conclusions hold per ISA.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "avx512_bf16", "amx_tile",
             "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_flags() -> list[str]:
    """Every flag of the first CPU in /proc/cpuinfo ("flags" on x86, "Features" on ARM); empty elsewhere."""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.lower().startswith(("flags", "features")):
            return line.split(":", 1)[1].split()
    return []


def cpu_isa() -> list[str]:
    """The ISA flags of ISA_FLAGS this CPU has, in that order."""
    flags = set(cpu_flags())
    return [flag for flag in ISA_FLAGS if flag in flags]


def cpu_info() -> dict[str, Any]:
    """The CPU a measurement ran on: model, logical cores and the ISA flags that decide INT8 speed."""
    return {"model": cpu_name(), "cores": os.cpu_count(), "machine": platform.machine(), "isa": cpu_isa()}


def cpu_line(info: dict[str, Any] | None = None) -> str:
    """'AMD EPYC, 2 cores, avx2 avx512f avx512_vnni': the CPU in one line, for notes and tables."""
    info = info or cpu_info()
    return f"{info['model']}, {info['cores']} cores, ISA {' '.join(info['isa']) or 'unknown'}"


def gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=10)
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


def environment(threads: int | None = None) -> dict[str, Any]:
    import onnxruntime as ort

    env: dict[str, Any] = {
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_isa": cpu_isa(),
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
