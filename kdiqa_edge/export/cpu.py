"""The `cpu` target: `--precision auto` across every CPU runtime installed here (the issue's "auto across
runtimes"): ONNX Runtime (the onnx target's recipes), OpenVINO (f32, bf16, NNCF INT8 with its float regions in
f32 and, on a CPU with BF16 kernels, in bf16) and ExecuTorch/XNNPACK, measured on this machine, the fastest
within --max-drift shipped to `OUT/cpu-auto/` under its runtime's own name (model.onnx, model.xml + model.bin,
model.pte).

It builds nothing itself: its candidates are the runtime targets' own (`candidates()` of each, found in the
target registry), renamed `<runtime>:<name>` (onnx:fp32, openvino:int8:bf16+stem-float, executorch:fp32) and
restricted to the CPU (no accelerator execution provider). The contract's choices across runtimes:

- Drift reference: ONNX Runtime's FP32 (`onnx:fp32`), the graph every other runtime's artifact is made from.
- `--min-speedup`: a reduced-precision pick is measured against the FASTEST FP32 candidate of any runtime
  (the others are `lossless`), not the reference. The user's question is whether the lossy model is worth
  its drift against the best lossless one here: OpenVINO's f32 may well beat ONNX Runtime's FP32, and an INT8
  model only 1.1x faster than that buys too little.
- Timing: each turn in a fresh process (its `rank`: export/isolated.py, export/measure.py), since
  the runtimes' thread pools disturb each other in one process; an injected timer (tests) times in process.
- After the pick, the pick's own runtime tunes it where that runtime does (ONNX Runtime: spin-waiting).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge.export.base import TARGETS, Examples, ExportConfig, ExportResult, Supports, register_target
from kdiqa_edge.export.isolated import rank_isolated

RUNTIMES = ("onnx", "openvino", "executorch")  # the CPU runtimes' export targets; onnx (the reference) first
EXTRAS = {"openvino": "openvino", "executorch": "android"}


def runtime_missing(name: str) -> str | None:
    """None when this runtime's export and runtime import here, else why not (one line)."""
    if name == "openvino":
        from kdiqa_edge.export.openvino import openvino_missing

        return openvino_missing("fp32")
    if name == "executorch":
        from kdiqa_edge.export.executorch import executorch_missing

        missing = executorch_missing()
        return None if missing is None else f"executorch does not import ({missing}); install it with: " \
                                            f"pip install 'kdiqa-edge[{EXTRAS[name]}]'"
    return None


@register_target
class CpuTarget:
    """The fastest faithful artifact for this CPU, whichever runtime makes it: --precision auto only."""

    name = "cpu"
    supports = Supports(precisions=("auto",), dynamic_batch=False, tolerance={})
    auto_file = None  # each candidate ships under its runtime's name (Candidate.file)
    rank = staticmethod(rank_isolated)  # candidates of several runtimes: each timed in processes of its own

    def runtimes(self) -> list[str]:
        return [name for name in RUNTIMES if name in TARGETS and runtime_missing(name) is None]

    def export(self, model, examples: Examples, out: Path, cfg: ExportConfig, meta: dict[str, Any]) -> ExportResult:
        from kdiqa_edge.errors import ConfigError

        raise ConfigError("--target cpu is --precision auto: it measures every CPU runtime's candidates here")

    def candidates(self, model, examples: Examples, cfg: ExportConfig, meta: dict[str, Any], work: Path) -> list:
        """Every installed CPU runtime's candidates, renamed `<runtime>:<name>`; ONNX Runtime's FP32 the
        reference, the other runtimes' FP32 lossless."""
        found = []
        for name in self.runtimes():
            target = TARGETS.get(name)
            own = dataclasses.replace(cfg, target=name, candidates=None)
            for candidate in target.candidates(model, examples, own, meta, work / name):
                if candidate.provider != "cpu":
                    continue
                found.append(dataclasses.replace(
                    candidate, name=f"{name}:{candidate.name}", runtime=name,
                    file=candidate.file or target.auto_file, reference=candidate.reference and name == "onnx",
                    lossless=candidate.reference and name != "onnx"))
        return found

    def left_out(self, cfg: ExportConfig | None = None) -> list[str]:
        """Runtimes not installed here, and what the installed ones cannot offer on this CPU."""
        lines = []
        for name in RUNTIMES:
            missing = runtime_missing(name)
            if missing is not None:
                lines.append(f"{name}: {missing}: no {name} candidates")
            elif name != "onnx" and callable(getattr(TARGETS.get(name), "left_out", None)):
                lines += TARGETS.get(name).left_out(cfg)
        return lines

    def tune(self, pick, final: Path, pixels: np.ndarray, cfg: ExportConfig, timer, log) -> dict[str, Any] | None:
        """The pick's runtime's own setting, measured for the pick (ONNX Runtime: spin-waiting)."""
        tune = getattr(TARGETS.get(pick.candidate.runtime), "tune", None)
        return tune(pick, final, pixels, cfg, timer, log) if callable(tune) else None

    def beside(self, pick, final: Path, cfg: ExportConfig) -> tuple[list[Path], list[str]]:
        """What the pick's runtime writes beside its artifact (ExecuTorch: benchmark_on_device.sh)."""
        beside = getattr(TARGETS.get(pick.candidate.runtime), "beside", None)
        return beside(pick, final, cfg) if callable(beside) else ([], [])
