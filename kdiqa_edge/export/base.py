"""The one small protocol every export target follows, its config, and the target registry.

A target declares what it supports and its parity tolerance, and implements
`export(model, examples, out, cfg) -> ExportResult`, writing only inside `out`. Heavy imports (torch,
onnx, onnxruntime, coremltools, tensorrt) stay inside the target modules' functions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kdiqa_edge.errors import ConfigError
from kdiqa_edge.registry import Registry

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")  # auto: every candidate measured here, the fastest within bound
CALIB_METHODS = ("minmax", "entropy", "percentile")
MAX_THREADS = 256  # CPU threads the checks may use: far beyond the cores, a session takes minutes to open


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    target: str = "onnx"  # onnx | tensorrt | coreml | executorch | openvino | cpu (auto across runtimes) | all
    precision: str = "fp32"  # fp32 | fp16 | int8 | auto
    input: str = "float"  # float (normalized NCHW float32) | uint8 (raw pixels, normalization in the graph)
    layout: str = "NCHW"  # NCHW | NHWC (uint8 input only)
    with_probs: bool = False  # add a second output `probs` [N, 5]
    with_map: bool = False  # add the output `score_map` [N, h, w]: the head at each position of the last feature map
    opset: int = 17  # ONNX opset, 17..20 (TensorRT 10.x parses 9..20)
    max_batch: int = 8  # dynamic batch 1..max_batch (TensorRT profile max, CoreML range)
    opt_batch: int = 1  # TensorRT profile opt batch
    calib: int = 256  # INT8 calibration images from the TRAIN split
    calib_method: str = "minmax"  # minmax | entropy | percentile
    # float | int8: the first conv/patch embedding in INT8 models (float: pixel-exact input); block (ONNX Runtime
    # only): the stem and the convs after it at its resolution, through the narrowest, in float
    int8_stem: str = "float"
    int8_recipe: str = "qdq-all"  # the ONNX Runtime INT8 recipe (export/recipes.py) for --precision int8
    max_drift: float = 0.01  # auto: the largest |ΔSRCC| vs FP32 on the test split a shipped candidate may have
    min_speedup: float = 1.25  # auto: a reduced-precision pick must be this many times as fast as FP32, else FP32
    candidates: str | None = None  # auto: comma-separated candidate names to try (None: every applicable one)
    # the release gate on auto's pick (bench/gate.py; with max_drift): exit 1 with one line per broken bound
    fail_under: str | None = None  # floors on the pick's test-split correlations: "srcc=0.85,plcc=0.85"
    max_latency_ms: float | None = None  # ceiling on the pick's p50 at batch 1
    max_size_mb: float | None = None  # ceiling on the pick's file size
    parity_images: int = 32  # real test-split images for the parity check vs PyTorch
    eval_images: int = 512  # at most this many test-split images for the INT8/FP16 drift report
    latency_runs: int = 30  # timed ONNX Runtime runs (batch 1, after warm-up) per model
    threads: int = 2  # CPU threads (ONNX Runtime intra-op, ExecuTorch's pool) for parity, drift and latency
    tensorrt_version: str = "10.3"  # TensorRT the engine/ONNX targets (JetPack 6 ships 10.3)
    workspace_mib: int = 1024  # TensorRT builder workspace limit
    timing_cache: str | None = None  # TensorRT timing cache file (default: in the kdiqa-edge cache dir)
    coreml_target: str = "iOS16"  # coremltools minimum deployment target
    seed: int = 0  # split seed when the checkpoint has no saved split

    def validate(self) -> ExportConfig:
        if self.target != "all" and self.target not in TARGETS:
            raise ConfigError(f"unknown export target {self.target!r}; choose one of: "
                              f"{', '.join([*TARGETS.names(), 'all'])}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.input not in ("float", "uint8"):
            raise ConfigError(f"unknown input kind {self.input!r}; choose float or uint8")
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"unknown layout {self.layout!r}; choose NCHW or NHWC")
        if self.layout == "NHWC" and self.input != "uint8":
            raise ConfigError("--layout NHWC needs --input uint8 (float inputs are normalized NCHW)")
        if not 17 <= self.opset <= 20:
            raise ConfigError(f"opset must be 17..20, got {self.opset}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"need 1 <= opt_batch ({self.opt_batch}) <= max_batch ({self.max_batch})")
        from kdiqa_edge.export.recipes import RECIPES, STEMS

        if self.int8_stem not in STEMS:
            raise ConfigError(f"unknown --int8-stem {self.int8_stem!r}; choose one of: {', '.join(STEMS)}")
        if self.int8_stem == "block" and self.target != "onnx":
            raise ConfigError(f"--int8-stem block is an ONNX Runtime recipe choice (--target onnx); "
                              f"--target {self.target} takes float or int8")
        if self.calib_method not in CALIB_METHODS:
            raise ConfigError(f"unknown calibration method {self.calib_method!r}; "
                              f"choose one of: {', '.join(CALIB_METHODS)}")
        if self.precision in ("int8", "auto") and self.calib < 1:
            raise ConfigError(f"{self.precision} needs calibration images: --calib must be at least 1")
        if self.int8_recipe not in RECIPES:
            raise ConfigError(f"unknown --int8-recipe {self.int8_recipe!r}; choose one of: {', '.join(RECIPES)}")
        if self.int8_recipe != ExportConfig.int8_recipe and self.target not in ("onnx", "all"):
            raise ConfigError(f"--int8-recipe chooses ONNX Runtime's INT8 (--target onnx); "
                              f"--target {self.target} quantizes its own way")
        if self.int8_recipe != ExportConfig.int8_recipe and self.precision == "auto":
            raise ConfigError("--int8-recipe chooses a --precision int8 export's recipe; auto measures "
                              "every one that applies (narrow them with --candidates, e.g. "
                              "int8:dw-float+stem-float)")
        if self.with_map and self.precision == "auto":
            raise ConfigError("--with-map with --precision auto: auto does not check the map of its candidates; "
                              "export the map at a named precision (fp32, int8...)")
        if not 0 <= self.max_drift <= 2:
            raise ConfigError(f"--max-drift is a bound on |ΔSRCC|, 0..2; got {self.max_drift}")
        if self.candidates and self.precision != "auto":  # it was ignored: the export was not what was asked
            raise ConfigError(f"--candidates narrows --precision auto's candidates; --precision {self.precision} "
                              "builds one artifact (--int8-recipe and --int8-stem choose an INT8 one)")
        if self.gated() and self.precision != "auto":
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in self.gated())
            raise ConfigError(f"{flags} gate --precision auto's pick; for --precision {self.precision}, run "
                              "`kdiqa-edge bench` on it with the same options")
        if self.min_speedup != ExportConfig.min_speedup and self.precision != "auto":  # read by auto alone
            raise ConfigError(f"--min-speedup is what --precision auto asks of a lossy pick; "
                              f"--precision {self.precision} ships what it was asked (its notes give its speed "
                              "against FP32)")
        if not self.min_speedup >= 1:
            raise ConfigError(f"--min-speedup is a speed ratio to FP32, at least 1 (1: the fastest ships); "
                              f"got {self.min_speedup}")
        for name in ("threads", "parity_images", "eval_images", "latency_runs", "workspace_mib"):
            if getattr(self, name) < 1:  # a profile's value: the flags' own ranges never saw it
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads > MAX_THREADS:  # ONNX Runtime takes 40 s to open a session at 1024 threads on 2 cores
            raise ConfigError(f"threads is at most {MAX_THREADS} (the CPU threads of the checks here), got "
                              f"{self.threads}")
        return self

    def gated(self) -> list[str]:
        """The release-gate bounds set (GATE_FIELDS' names), empty without a gate."""
        return [name for name in GATE_FIELDS if getattr(self, name) is not None]

    def targets(self) -> list[str]:
        """The named target, or for `all` every target that makes this precision (executorch has no fp16)."""
        if self.target != "all":
            return [self.target]
        return [name for name in TARGETS.names() if self.precision in TARGETS.get(name).supports.precisions]


GATE_FIELDS = ("fail_under", "max_latency_ms", "max_size_mb")  # they check the pick; they do not make it


@dataclasses.dataclass
class Examples:
    """Real images the export is calibrated and checked on: uint8 NHWC, as the image cache holds them."""

    parity: np.ndarray  # [P, S, S, 3] test-split images for the parity check
    calib: np.ndarray  # [C, S, S, 3] train-split images for INT8 calibration (may be empty)
    test: np.ndarray  # [T, S, S, 3] test-split images for the drift report
    test_mos: np.ndarray  # [T] their MOS
    source: str = "dataset"  # where the images came from, for the manifest


@dataclasses.dataclass(frozen=True)
class Supports:
    precisions: tuple[str, ...]
    dynamic_batch: bool
    tolerance: dict[str, float]  # precision -> max |score - torch score| allowed (missing: reported only)


@dataclasses.dataclass
class ExportResult:
    target: str
    precision: str
    files: list[Path]  # inside the target's out dir
    parity: dict[str, Any] = dataclasses.field(default_factory=dict)
    drift: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user must know (plainly)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # target-specific facts for the manifest
    unavailable: str | None = None  # set when a runtime was missing and only the inputs were written


class Target(Protocol):
    name: str
    supports: Supports
    # optional: `preflight(cfg)` raises before any export work (a missing runtime, say)

    def export(self, model, examples: Examples, out: Path, cfg: ExportConfig, meta: dict[str, Any]) -> ExportResult:
        """Write the artifact(s) for `model` (an IQA model) into the directory `out`."""


TARGETS: Registry[Target] = Registry("export target")


def register_target(cls):
    """Class decorator: register one instance under `cls.name`."""
    TARGETS.register(cls.name)(cls())
    return cls


def model_input(images: np.ndarray, input_spec: dict[str, Any], preprocess) -> np.ndarray:
    """uint8 NHWC cache images -> what the artifact's `image` input takes."""
    from kdiqa_edge.preprocess import normalize

    if input_spec["dtype"] == "uint8":
        images = np.ascontiguousarray(images, dtype=np.uint8)
        return images if input_spec["layout"] == "NHWC" else np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return normalize(images, preprocess)
