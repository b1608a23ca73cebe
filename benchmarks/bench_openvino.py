"""OpenVINO against ONNX Runtime on this CPU, ours and the plain way, each artifact alone in a fresh process.

    python benchmarks/bench_openvino.py [--models resnet18 ...] [--threads 2] [--rounds 5] [--seconds 3]
                                        [--groups ort ov plain-ov plain-ort auto] [--work DIR] [--reuse]
                                        [--out FILE.md]

    # INT8 float regions in f32 (ours) vs bf16 (ours, where the CPU has BF16) vs plain nncf defaults:
    python benchmarks/bench_openvino.py --models resnet18 efficientnet_b0 mobilevit_s --groups ov-int8 plain-ov \
        --out benchmarks/results/openvino-int8-bf16-<machine>.md

For the paper's four students and the CLIP ViT-B/32 teacher's image tower (random init: no pretrained weights on
this offline machine; the synthetic set for calibration), 224 px, batch 1, `--threads` threads:
- ONNX Runtime, ours: FP32, and the best INT8 recipe of the ones our export makes (the fastest INT8 candidate
  in `--target onnx --precision auto`'s own measurement, rebuilt by the onnx target's `candidates`);
- OpenVINO, ours (kdiqa_edge.export.openvino.write_ir, what `--target openvino` writes): f32, bf16, and INT8
  with the stem in float (the default) and in int8, its float regions (head, projection, the float stem, and
  what NNCF leaves between quantized ops) in f32 (`--precision int8`, auto's `int8:stem-*`) and in bf16 (auto's
  `int8:bf16+stem-*`, the "OV INT8 bf16" rows; on a CPU without BF16 OpenVINO runs them in f32: 'runs in');
- the plain way beside them: `ov.convert_model(our FP32 ONNX)` compiled with defaults + INFERENCE_NUM_THREADS
  and PERFORMANCE_HINT LATENCY (bf16 on CPUs with AVX512-BF16 or AMX: the worker records what it ran in), the
  same after `nncf.quantize` with defaults on 64 random inputs, and ONNX Runtime's `quantize_static` with
  defaults (QDQ, int8 activations and weights, per tensor, MinMax) on the same 64 inputs;
- auto's pick: `--target onnx --precision auto` (measured at batch 1 only: it ranks at batch 1), and `--target cpu --precision auto` (across runtimes) where
  the export registry has a `cpu` target.

Each artifact is timed alone in a fresh process (this script's worker mode: load, warm up, time back to back for
`--seconds`, print JSON), in `--rounds` rounds over every artifact of every model, the order rotated and
reversed each round; the median of the rounds' p50s per artifact, and its fastest round. Ratios to our ORT FP32
are the figures to read: other jobs share this machine (the load average is printed per round and written with
the results). `--groups` builds and times only some rows (ov-int8: our OpenVINO INT8 rows alone).

Drift of random-init weights says nothing about a trained model, so auto ranks with the bound off
(`--max-drift 1.0`, as bench_int8.py); the shipped pick still needs `--min-speedup` over FP32.

Writes benchmarks/results/openvino-<machine>-<isa>.md and .json, after every round (a cut run keeps its rounds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TEACHER = "ViT-B-32"
MODELS = ("resnet18", "efficientnet_b0", "mobilevit_s", "swin_tiny_patch4_window7_224", TEACHER)
# the instruction sets OpenVINO's and ONNX Runtime's CPU kernels dispatch on, shown present or absent
ISA_SHOWN = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
PACKAGES = ("onnxruntime", "openvino", "nncf", "torch", "onnx", "numpy", "executorch")  # executorch: cpu auto
PLAIN_CALIB = 64  # random calibration inputs of the plain nncf.quantize / quantize_static
PLAIN_CONFIG = {"PERFORMANCE_HINT": "LATENCY"}  # + INFERENCE_NUM_THREADS: the plain compile_model config
SIZE = 224
BUILT = "built.json"  # per model folder: its artifacts and what was chosen, for --reuse
RUNTIMES = {".onnx": "ORT", ".xml": "OV", ".pte": "ExecuTorch"}  # by the artifact's suffix (auto's pick may be any)
# --groups: the rows built and timed. ov-int8: our OpenVINO INT8 IRs only (of the ov group)
GROUPS = ("ort", "ov", "ov-int8", "plain-ov", "plain-ort", "auto")
# our OpenVINO IRs: (precision, stem, float regions' precision, row, folder)
OV_ROWS = (("fp32", None, None, "OV f32", "openvino-fp32"), ("bf16", None, None, "OV bf16", "openvino-bf16"),
           ("int8", "float", None, "OV INT8 (stem float)", "openvino-int8"),
           ("int8", "int8", None, "OV INT8 (stem int8)", "openvino-int8-stem-int8"),
           ("int8", "float", "bf16", "OV INT8 bf16 (stem float)", "openvino-int8-bf16"),
           ("int8", "int8", "bf16", "OV INT8 bf16 (stem int8)", "openvino-int8-bf16-stem-int8"))


@dataclasses.dataclass
class Artifact:
    """One file to time and how to open it: `kdiqa` through QualityModel.load (what a user of ours gets), `ov`
    and `ort` the plain way (compile_model / InferenceSession with defaults and the threads)."""

    model: str
    name: str  # the row: "ORT FP32", "OV bf16", "plain OV default", ...
    group: str  # ort | ov | plain-ov | plain-ort | auto
    precision: str  # fp32 | bf16 | int8 | default (the plain compile: the CPU plugin's choice)
    path: str
    open_with: str  # kdiqa | ov | ort
    detail: str = ""  # the recipe, the NNCF settings
    bytes: int = 0
    rounds: list[float] = dataclasses.field(default_factory=list)  # p50 ms per round
    runs: list[int] = dataclasses.field(default_factory=list)
    runs_in: str | None = None  # OpenVINO's inference precision as compiled here
    load_s: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def runtime(self) -> str:
        return RUNTIMES.get(Path(self.path).suffix, Path(self.path).suffix)

    @property
    def p50(self) -> float:
        return float(np.median(self.rounds)) if self.rounds else float("nan")

    @property
    def spread(self) -> float:
        """max / min of the rounds' p50s: how much the machine moved this artifact's figure."""
        return max(self.rounds) / min(self.rounds) if len(self.rounds) > 1 else float("nan")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", flush=True)


# --- the worker: one artifact alone in this process ----------------------------------------------------


def open_call(path: str, open_with: str, threads: int, x: np.ndarray):
    """(one batch-1 call, the inference precision OpenVINO compiled it for or None)."""
    if open_with == "kdiqa":
        from kdiqa_edge.runtime import QualityModel

        model = QualityModel.load(path, threads=threads)
        return (lambda: model.run(x)), getattr(model.backend, "inference_precision", None)
    if open_with == "ov":
        import openvino as ov

        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, **PLAIN_CONFIG})
        request = compiled.create_infer_request()
        return (lambda: request.infer({0: x})), compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return (lambda: session.run(None, feed)), None


def worker(path: str, open_with: str, inputs: str, threads: int, seconds: float, warmup: float) -> None:
    """Load, warm up (at least 5 runs and `warmup` seconds), time back to back for `seconds`; one JSON line."""
    x = np.load(inputs)
    start = time.perf_counter()
    call, runs_in = open_call(path, open_with, threads, x)
    call()
    load_s = time.perf_counter() - start
    end, done = time.perf_counter() + warmup, 0
    while done < 5 or time.perf_counter() < end:
        call()
        done += 1
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 10:
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    ms = np.asarray(times) * 1e3
    print(json.dumps({"p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "runs": len(ms),
                      "load_s": round(load_s, 3), "runs_in": runs_in}))


def time_alone(artifact: Artifact, inputs: Path, args) -> None:
    """One turn: the artifact in a fresh process of this script; its p50 appended (or its one-line error)."""
    command = [sys.executable, __file__, "--worker", artifact.path, "--open-with", artifact.open_with,
               "--inputs", str(inputs), "--threads", str(args.threads), "--seconds", str(args.seconds),
               "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        artifact.error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300]
        return
    found = json.loads(done.stdout.strip().splitlines()[-1])
    artifact.rounds.append(found["p50_ms"])
    artifact.runs.append(found["runs"])
    artifact.load_s.append(found["load_s"])
    artifact.runs_in = found["runs_in"]


# --- building: ours through kdiqa_edge's export code, the plain way beside it ---------------------------


def build_model(name: str, teacher):
    import torch

    from kdiqa_edge.models.student import create_student

    if name == TEACHER:
        return teacher
    torch.manual_seed(0)
    return create_student(name, teacher.head, teacher.preprocess, pretrained=False).eval()


def run_auto(target_name: str, model, examples, cfg, meta: dict, out: Path):
    """`--target <name> --precision auto` as the export pipeline runs it (export_checkpoint's dispatch): the
    ExportResult, its pick in `out`."""
    from kdiqa_edge.export import TARGETS, auto

    target = TARGETS.get(target_name)
    cfg = dataclasses.replace(cfg, target=target_name, precision="auto")
    runner = auto.Auto(target, log=lambda m: log(f"  {m.strip()}")) if auto.supports_auto(target) else target
    out.mkdir(parents=True)
    return runner.export(model, examples, out, cfg, meta)


def ranked_p50(row: dict, stage: str = "latency") -> float:
    """A candidate's batch-1 p50 in auto's round-robin (`latency`) or its runoff; inf where it has none."""
    return float(((row.get(stage) or {}).get("1") or {}).get("p50_ms", np.inf))


def fastest_int8(rows: list[dict]) -> str | None:
    """The INT8 candidate auto measured fastest, ranked as auto ranks: by the runoff's figures among the INT8s
    that ran it (they are the close ones; its turns are timed differently from the round-robin's, so the two
    are not compared), else by the round-robin's."""
    int8 = [r for r in rows if r["precision"] == "int8" and r["status"] == "ok"]
    ran_off = [r for r in int8 if np.isfinite(ranked_p50(r, "runoff"))]
    if ran_off:
        return min(ran_off, key=lambda r: ranked_p50(r, "runoff"))["name"]
    return min(int8, key=ranked_p50)["name"] if int8 else None


def ort_ours(name: str, model, examples, cfg, meta: dict, folder: Path) -> tuple[list[Artifact], dict]:
    """ORT FP32, the best INT8 recipe (by onnx auto's measurement), and onnx auto's pick."""
    from kdiqa_edge.export import TARGETS

    result = run_auto("onnx", model, examples, cfg, meta, folder / "onnx-auto")
    found = result.extra["auto"]
    rows = found["candidates"]
    best = fastest_int8(rows)
    wanted = {"fp32", best} - {None}
    built = {}
    for candidate in TARGETS.get("onnx").candidates(model, examples, cfg, meta, folder / "ort-shared"):
        if candidate.name in wanted:
            target = folder / ("ort-" + candidate.name.replace(":", "-").replace("+", "-"))
            target.mkdir()
            built[candidate.name] = candidate.build(target)
    artifacts = [Artifact(name, "ORT FP32", "ort", "fp32", str(built["fp32"]), "kdiqa", "ours: fp32")]
    if best:
        artifacts.append(Artifact(name, "ORT INT8 (best recipe)", "ort", "int8", str(built[best]), "kdiqa",
                                  f"ours: {best}"))
    artifacts.append(Artifact(name, "auto (--target onnx)", "auto", result.precision, str(result.files[0]),
                              "kdiqa", f"pick: {found['pick']}"))
    return artifacts, {**auto_facts(result), "best_int8": best}


def auto_facts(result) -> dict:
    """What an auto export chose and why, and its candidates as it measured them (batch 1)."""
    found = result.extra.get("auto", {})
    return {"pick": found.get("pick", "?"), "why": found.get("why"), "declined": found.get("declined"),
            "candidates": [{k: r.get(k) for k in ("name", "precision", "status", "reason")}
                           | {"p50_ms": ranked_p50(r), "runoff_ms": ranked_p50(r, "runoff"), "drift": r.get("drift")}
                           for r in found.get("candidates", [])]}


def ov_ours(name: str, model, examples, cfg, meta: dict, folder: Path,
            int8_only: bool = False) -> tuple[list[Artifact], Path, dict]:
    """OpenVINO IRs as `--target openvino` (and its auto candidates) write them, from the target's own FP32 ONNX
    (returned: the plain way converts the same file); `int8_only`: the INT8 ones."""
    from kdiqa_edge.export import openvino

    source = folder / "ov-source"
    source.mkdir()
    onnx_path = openvino.fp32_onnx(model, cfg, source)
    ov_meta = {**meta, "target": "openvino"}
    artifacts, settings = [], {}
    for precision, stem, floats, label, subfolder in OV_ROWS:
        if int8_only and precision != "int8":
            continue
        out = folder / subfolder
        out.mkdir()
        path, int8, _ = openvino.write_ir(model, onnx_path, examples, out, cfg, ov_meta, precision, stem, floats)
        detail = "ours"
        if int8:
            settings[label] = {k: int8[k] for k in ("preset", "model_type", "stem", "activation_ranges",
                                                    "calibration_images", "inference_precision")} \
                | {"ignored": len(int8["ignored_scope"])}
            detail = (f"ours: NNCF {int8['preset']}, model type {int8['model_type']}, stem {stem}, float regions "
                      f"{int8['inference_precision']}")
        artifacts.append(Artifact(name, label, "ov", precision, str(path), "kdiqa", detail))
    return artifacts, onnx_path, settings


def plain(name: str, onnx_path: Path, folder: Path, groups: set[str] = frozenset(GROUPS)) -> list[Artifact]:
    """ov.convert_model of our FP32 ONNX as it is, the same through nncf.quantize with defaults (plain-ov), and
    quantize_static with defaults (plain-ort); 64 random NCHW inputs calibrate both."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    from kdiqa_edge.console import quiet_logger

    calib = np.random.default_rng(0).standard_normal((PLAIN_CALIB, 1, 3, SIZE, SIZE)).astype(np.float32)
    out = folder / "plain"
    out.mkdir()
    found = []
    if "plain-ov" in groups:
        found += plain_ov(name, onnx_path, out, calib)
    if "plain-ort" not in groups:
        return found

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": x} for x in calib])

        def get_next(self):
            return next(self.items, None)

    static = out / "model.quantize_static.onnx"
    with quiet_logger():  # onnxruntime.quantization warns on the root logger
        quantize_static(str(onnx_path), str(static), Reader())
    return [*found, Artifact(name, "plain ORT quantize_static", "plain-ort", "int8", str(static), "ort",
                             "quantize_static defaults (QDQ S8S8 per tensor, MinMax), 64 random inputs")]


def plain_ov(name: str, onnx_path: Path, out: Path, calib: np.ndarray) -> list[Artifact]:
    import nncf
    import openvino as ov

    from kdiqa_edge.export.openvino import quiet

    converted = out / "model.xml"
    # kept in FP32 (compress_to_fp16=False): the file is the model convert_model returns, as compiled in memory
    ov.save_model(ov.convert_model(str(onnx_path)), str(converted), compress_to_fp16=False)
    quantized = out / "model.nncf.xml"
    with quiet():
        ov.save_model(nncf.quantize(ov.convert_model(str(onnx_path)), nncf.Dataset(list(calib))), str(quantized),
                      compress_to_fp16=False)
    return [Artifact(name, "plain OV default", "plain-ov", "default", str(converted), "ov",
                     "ov.convert_model, compile_model defaults"),
            Artifact(name, "plain OV nncf INT8", "plain-ov", "int8", str(quantized), "ov",
                     f"nncf.quantize defaults, {PLAIN_CALIB} random inputs")]


def size(path: str) -> int:
    file = Path(path)
    return file.stat().st_size + (file.with_suffix(".bin").stat().st_size if file.suffix == ".xml" else 0)


def build_all(names: list[str], work: Path, args) -> tuple[list[Artifact], dict, dict[str, Path]]:
    """Every artifact of every model (and what auto and NNCF chose), into `work/<model>/`."""
    import shutil

    import torch

    torch.set_num_threads(args.threads)
    from bench_suite import build_teacher

    from kdiqa_edge.data.spec import DatasetSpec
    from kdiqa_edge.data.synthetic import generate
    from kdiqa_edge.export import TARGETS, ExportConfig
    from kdiqa_edge.export.base import model_input
    from kdiqa_edge.export.pipeline import artifact_meta, load_examples

    if not (work / "synthetic" / "scores.csv").is_file():
        generate(work / "synthetic", refs=4)
    data = DatasetSpec(name="synthetic", root=work / "synthetic")
    # max_batch 1: auto measures batch 1 only (it ranks at opt_batch 1 either way; batch 8 was only reported)
    cfg = ExportConfig(precision="auto", calib=args.calib, eval_images=args.eval_images, threads=args.threads,
                       max_drift=args.max_drift, min_speedup=args.min_speedup, max_batch=1)
    teacher = None  # built when a model is (a --reuse run that finds every model built times them at once)
    artifacts, facts, inputs = [], {}, {}
    for name in names:
        folder = work / name
        if args.reuse and (folder / BUILT).is_file():
            saved = json.loads((folder / BUILT).read_text())
            artifacts += [Artifact(**a) for a in saved["artifacts"]]
            facts[name], inputs[name] = saved["facts"], Path(saved["input"])
            log(f"{name}: reusing the {len(saved['artifacts'])} artifacts in {folder}")
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        start = time.perf_counter()
        log(f"{name}: building")
        if teacher is None:
            teacher = build_teacher(False)
        model = build_model(name, teacher)
        examples = load_examples(data, model.preprocess, cfg, progress=False, log=log)
        meta = artifact_meta(model)
        inputs[name] = folder / "input.npy"
        np.save(inputs[name], np.ascontiguousarray(
            model_input(examples.test[:1], {"dtype": "float32", "layout": "NCHW"}, model.preprocess)))
        groups, mine = set(args.groups), []
        facts[name] = {}
        if groups & {"ort", "auto"}:
            mine, facts[name]["auto_onnx"] = ort_ours(name, model, examples, cfg, meta, folder)
            mine = [a for a in mine if a.group in groups]
            log(f"{name}: onnx auto picks {facts[name]['auto_onnx']['pick']}; best ORT INT8 "
                f"{facts[name]['auto_onnx']['best_int8']}")
        ov_rows, onnx_path, facts[name]["ov_int8"] = ov_ours(name, model, examples, cfg, meta, folder,
                                                             int8_only="ov" not in groups)
        mine += ov_rows if groups & {"ov", "ov-int8"} else []
        if groups & {"plain-ov", "plain-ort"}:
            mine += plain(name, onnx_path, folder, groups)
        for target in [t for t in args.autos if t in TARGETS.names() and "auto" in groups]:  # cpu: across runtimes
            result = run_auto(target, model, examples, cfg, meta, folder / f"{target}-auto")
            facts[name][f"auto_{target}"] = auto_facts(result)
            mine.append(Artifact(name, f"auto (--target {target})", "auto", result.precision, str(result.files[0]),
                                 "kdiqa", f"pick: {facts[name][f'auto_{target}']['pick']}"))
        for artifact in mine:
            artifact.bytes = size(artifact.path)
        artifacts += mine
        facts[name]["build_s"] = round(time.perf_counter() - start, 1)
        (folder / BUILT).write_text(json.dumps({"artifacts": [dataclasses.asdict(a) for a in mine],
                                                "facts": facts[name], "input": str(inputs[name])}, default=str))
        log(f"{name}: {len(mine)} artifacts in {facts[name]['build_s']:.0f} s")
    return artifacts, facts, inputs


# --- the report --------------------------------------------------------------------------------------------


def isa_slug(isa: set[str]) -> str:
    """The instruction set that decides OpenVINO's and ORT's fast paths, for the results file's name."""
    if {"amx_int8", "amx_bf16"} & isa:
        return "amx"
    if "avx512_bf16" in isa:
        return "avx-512-bf16-without-amx"
    if "avx512f" in isa:
        return "avx-512-vnni" if "avx512_vnni" in isa else "avx-512-without-vnni"
    return "avx2-vnni" if "avx_vnni" in isa else "avx2-without-vnni"


def environment(args, loads: list[float]) -> dict:
    from importlib import metadata

    from kdiqa_edge.bench.environment import cpu_flags, cpu_name

    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    flags = set(cpu_flags())
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "isa": {flag: flag in flags for flag in ISA_SHOWN}, "openvino_cpu": openvino_cpu(),
            "threads": args.threads, "versions": found, "loads": loads}


def openvino_cpu() -> str:
    """The CPU as OpenVINO's plugin names it and its capabilities: BF16 there (AVX512-BF16 or AMX; it does
    not name AMX itself) is what makes bf16 the plain compile's default precision, the 'runs in' column."""
    try:
        import openvino as ov

        core = ov.Core()
        return (f"{core.get_property('CPU', 'FULL_DEVICE_NAME')}; capabilities "
                f"{' '.join(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}")
    except Exception as exc:  # noqa: BLE001 - the report says why, the timing goes on
        return f"not available ({type(exc).__name__}: {exc})"


def _ms(value: float) -> str:
    return f"{value:.2f}" if np.isfinite(value) else "—"


def summary_lines(artifacts: list[Artifact], models: list[str]) -> list[str]:
    lines = ["| model | fastest here | best ORT (ours) | best OV (ours) | best plain OV | best OV (ours) / best ORT "
             "(ours) | best plain OV / best OV (ours) | best OV (any) / best ORT (ours) | auto's picks: ms (/ fastest, "
             "/ best plain OV) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        mine = [a for a in artifacts if a.model == model and a.rounds]
        if not mine:
            continue

        def best(groups: tuple[str, ...], rows=mine):
            return min((a for a in rows if a.group in groups), key=lambda a: a.p50, default=None)

        fastest = min(mine, key=lambda a: a.p50)
        ort, ov, plain_ov = best(("ort",)), best(("ov",)), best(("plain-ov",))
        any_ov = best(("ov", "plain-ov"))
        picked = [a for a in mine if a.group == "auto"]

        def cell(a):
            return f"{a.name} {_ms(a.p50)}" if a else "—"

        def ratio(a, b):
            return f"{a.p50 / b.p50:.2f}" if a and b else "—"

        lines.append(f"| {model} | **{cell(fastest)}** | {cell(ort)} | {cell(ov)} | {cell(plain_ov)} | "
                     f"{ratio(ov, ort)} | {ratio(plain_ov, ov)} | {ratio(any_ov, ort)} | "
                     + "; ".join(f"{a.name.removeprefix('auto (--target ').rstrip(')')} {a.detail.removeprefix('pick: ')}"
                                 f" {_ms(a.p50)} ({ratio(a, fastest)}, {ratio(a, plain_ov)})" for a in picked) + " |")
    return lines


def table_lines(artifacts: list[Artifact], models: list[str]) -> list[str]:
    lines = ["| model | artifact | runtime | runs in | p50 ms | vs ORT FP32 | fastest round | rounds' spread | MB | what |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        mine = [a for a in artifacts if a.model == model]
        fp32 = next((a for a in mine if a.name == "ORT FP32" and a.rounds), None)
        fastest = min((a for a in mine if a.rounds), key=lambda a: a.p50, default=None)
        for a in mine:
            if not a.rounds:
                lines.append(f"| {model} | {a.name} | {a.runtime} | | failed: {a.error or 'not timed'} | | | | | "
                             f"{a.detail} |")
                continue
            name = f"**{a.name}**" if a is fastest else a.name
            vs = f"{fp32.p50 / a.p50:.2f}x" if fp32 else "—"
            runs_in = a.runs_in or ("f32" if a.precision in ("int8", "fp32") else a.precision)
            runs_in = f"int8 + {runs_in}" if a.precision == "int8" else runs_in
            lines.append(f"| {model} | {name} | {a.runtime} | {runs_in} | {_ms(a.p50)} | {vs} | {_ms(min(a.rounds))} | {_ms(a.spread)} | "
                         f"{a.bytes / 1e6:.1f} | {a.detail} |")
    return lines


def float_region_lines(artifacts: list[Artifact], models: list[str]) -> list[str]:
    """Our INT8 IRs with their float regions in f32 against the same in bf16, and against plain nncf defaults:
    each artifact's median of the rounds' p50s (fastest round), and each ratio three ways: of the medians, of
    the fastest rounds, and paired (the median over rounds of the ratio within a round: two turns of one round
    are minutes closer in time than two rounds, so a load that comes and goes moves both alike)."""
    lines = ["| model | stem | INT8, f32 float regions (ours) | INT8, bf16 float regions (ours) | plain OV nncf INT8 | "
             "bf16 / f32 floats: medians, fastest, paired | bf16 floats / plain nncf: medians, fastest, paired |",
             "|---|---|---|---|---|---|---|"]

    def ms(a: Artifact) -> str:
        return f"{_ms(a.p50)} ({_ms(min(a.rounds))}), runs in {a.runs_in}"

    def ratio(a: Artifact, b: Artifact | None) -> str:
        if b is None:
            return "—"
        paired = [x / y for x, y in zip(a.rounds, b.rounds)]
        return f"{a.p50 / b.p50:.2f}, {min(a.rounds) / min(b.rounds):.2f}, **{np.median(paired):.2f}**"

    found = False
    for model in models:
        rows = {a.name: a for a in artifacts if a.model == model and a.rounds}
        nncf = rows.get("plain OV nncf INT8")
        for stem in ("float", "int8"):
            f32, bf16 = rows.get(f"OV INT8 (stem {stem})"), rows.get(f"OV INT8 bf16 (stem {stem})")
            if not (f32 and bf16):
                continue
            found = True
            lines.append(f"| {model} | {stem} | {ms(f32)} | {ms(bf16)} | {ms(nncf) if nncf else '—'} | "
                         f"{ratio(bf16, f32)} | {ratio(bf16, nncf)} |")
    return lines if found else []


def noise_line(artifacts: list[Artifact]) -> str:
    spreads = sorted(a.spread for a in artifacts if len(a.rounds) > 1)
    if not spreads:
        return "- Noise: one round only (no spread to show)"
    return (f"- Noise: each artifact's p50 moved between rounds by max/min {np.median(spreads):.2f} (median over "
            f"artifacts), {spreads[-1]:.2f} at worst; ratios closer to 1 than that are within the noise")


def report(args, env: dict, artifacts: list[Artifact], facts: dict, models: list[str], rounds_done: int,
           started: float, argv: list[str]) -> str:
    isa = env["isa"]
    have = " ".join(f for f, on in isa.items() if on)
    lacks = " ".join(f for f, on in isa.items() if not on)
    loads = env["loads"]
    lines = [f"# OpenVINO and ONNX Runtime, ours and the plain way — {env['cpu']} ({have or 'unknown ISA'})", "",
             ("Random-init weights, 224 px, batch 1 (no pretrained weights on this offline machine: latency and "
              "which kernels ran are real, drift is not). Each artifact timed alone in a fresh process, "
              f"{args.seconds:g} s back to back after {args.warmup:g} s of warm-up, {rounds_done} rounds over "
              "every artifact of every model (order rotated and reversed each round); the median of the rounds' "
              "p50s."), "",
             f"- CPU: {env['cpu']}, {env['cores']} logical cores, {env['os']}",
             f"- ISA: has **{have or 'none of them'}**; lacks {lacks or 'none'}",
             f"- OpenVINO CPU plugin: {env.get('openvino_cpu', '?')}",
             f"- Threads: {args.threads} (ORT intra-op through QualityModel.load for ours, "
             "SessionOptions.intra_op_num_threads for the plain quantize_static; OpenVINO INFERENCE_NUM_THREADS, "
             "PERFORMANCE_HINT LATENCY)",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             (f"- Load average (1 min): {loads[0]:.2f} at the start, {loads[-1]:.2f} at the end, "
              f"{min(loads):.2f}-{max(loads):.2f} over the run, on {env['cores']} logical cores (where other "
              "jobs share the CPU, read the ratios, not the milliseconds)"),
             noise_line(artifacts),
             f"- Command: `python benchmarks/bench_openvino.py {' '.join(argv)}`",
             f"- Wall time {(time.time() - started) / 60:.1f} min", "",
             "## Summary (p50 ms at batch 1)", "", *summary_lines(artifacts, models), "",
             *(["## INT8 float regions: f32 vs bf16 (p50 ms at batch 1: median of the rounds (fastest round))", "",
                *regions, ""] if (regions := float_region_lines(artifacts, models)) else []),
             "## Every artifact", "",
             ("'runs in': for OpenVINO, the inference precision the compiled model reports here "
              "(INFERENCE_PRECISION_HINT; an INT8 IR runs its quantized ops in int8 and the rest in that "
              "precision). 'rounds' spread': max/min of the artifact's per-round p50s. MB: the file (an IR's .xml "
              "and .bin; OpenVINO stores identical constants once, and random-init students have many all-zero "
              "weights, timm's zero-initialized last norm of each block folded into its conv)."), "",
             *table_lines(artifacts, models), "",
             "## What was built", "",
             ("- Ours, ONNX Runtime: `--target onnx --precision auto` (kdiqa_edge.export.auto, its own in-process measurement at batch 1, "
              f"--max-drift {args.max_drift:g}, --min-speedup {args.min_speedup:g}) ships its pick; "
              "the fastest INT8 candidate in that measurement is rebuilt by the onnx target's `candidates` and "
              "timed as 'ORT INT8 (best recipe)'."),
             ("- Ours, OpenVINO: kdiqa_edge.export.openvino.write_ir from the target's own FP32 ONNX (fp32_onnx): "
              f"f32 and bf16 are one FP32 IR with the hint recorded; INT8 by nncf.quantize on {args.calib} "
              "train images of the synthetic set, MINMAX ranges, the head and projection in float, the stem per "
              "the row, the float regions in the precision the IR records (f32, or bf16 in the 'OV INT8 bf16' "
              "rows: auto's int8:bf16+stem-* candidates)."),
             ("- Plain: `ov.convert_model(our FP32 ONNX)` saved as it is (FP32 weights); `nncf.quantize(model, "
              f"nncf.Dataset({PLAIN_CALIB} random inputs))` with every default; both compiled with "
              "{INFERENCE_NUM_THREADS, PERFORMANCE_HINT: LATENCY} and nothing else. `quantize_static(our FP32 "
              "ONNX, reader)` with every default, on the same inputs."), ""]
    for model in models:
        found = facts.get(model)
        if not found:
            continue
        lines += [f"### {model}", ""]
        for key in [k for k in found if k.startswith("auto_")]:
            target = key.removeprefix("auto_")
            lines += [f"- {target} auto: {found[key]['why']}",
                      f"  - its candidates (batch-1 p50 ms as {target} auto measured them; its runoff in brackets): "
                      + ", ".join(f"{c['name']} {_ms(c['p50_ms'])}" + (f" [{_ms(c['runoff_ms'])}]" if np.isfinite(
                          c.get("runoff_ms", np.inf)) else "") if c["status"] == "ok" else f"{c['name']} failed"
                          for c in found[key].get("candidates", []))]
        for label, settings in found["ov_int8"].items():
            stem = ", stem" if settings["stem"] == "float" else ""
            lines.append(f"- {label}: NNCF preset {settings['preset']}, model type {settings['model_type']}, "
                         f"{settings['ignored']} ops ignored (head, projection{stem}), float regions in "
                         f"{settings.get('inference_precision', 'f32')}")
        lines.append(f"- build time {found['build_s']:.0f} s")
        lines.append("")
    return "\n".join(lines)


def write_results(out: Path, text: str, env: dict, artifacts: list[Artifact], facts: dict, args) -> None:
    from kdiqa_edge.io import write_json, write_text

    write_text(out, text)
    write_json(out.with_suffix(".json"), {
        "environment": env, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "artifacts": [{**dataclasses.asdict(a), "p50_ms": a.p50, "spread": a.spread} for a in artifacts],
        "built": facts})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="rounds over every artifact")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed back-to-back runs per turn")
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds per turn after loading")
    parser.add_argument("--calib", type=int, default=64, help="train images that calibrate our INT8")
    parser.add_argument("--eval-images", type=int, default=64, help="test images for auto's drift")
    parser.add_argument("--max-drift", type=float, default=1.0,
                        help="auto's bound on |ΔSRCC| (default 1.0: off, random-init drift means nothing)")
    parser.add_argument("--min-speedup", type=float, default=1.25, help="auto's --min-speedup")
    parser.add_argument("--groups", nargs="+", default=[g for g in GROUPS if g != "ov-int8"], choices=GROUPS,
                        help="the rows to build and time (ov-int8: our OpenVINO INT8 IRs alone)")
    parser.add_argument("--autos", nargs="*", default=["cpu"],
                        help="auto targets timed beside onnx auto (where the export registry has them)")
    parser.add_argument("--work", type=Path, help="where the artifacts go (default a new /tmp folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="time the artifacts a previous run built in --work (models it did not finish are built)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--open-with", choices=("kdiqa", "ov", "ort"), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.open_with, args.inputs, args.threads, args.seconds, args.warmup)
        return 0
    import tempfile

    from kdiqa_edge.bench.environment import cpu_flags, machine_slug

    started, loads = time.time(), [os.getloadavg()[0]]
    argv = argv if argv is not None else sys.argv[1:]
    work = args.work or Path(tempfile.mkdtemp(prefix="kdiqa-bench-openvino-"))
    work.mkdir(parents=True, exist_ok=True)
    artifacts, facts, inputs = build_all(args.models, work, args)
    loads.append(os.getloadavg()[0])
    out = args.out or ROOT / "benchmarks" / "results" / \
        f"openvino-{machine_slug()}-{isa_slug(set(cpu_flags()))}.md"
    models = [m for m in args.models if any(a.model == m for a in artifacts)]
    for index in range(args.rounds):
        shift = index % len(artifacts)
        order = artifacts[shift:] + artifacts[:shift]
        for artifact in order[::-1] if index % 2 else order:
            time_alone(artifact, inputs[artifact.model], args)
        loads.append(os.getloadavg()[0])
        env = environment(args, loads)
        write_results(out, report(args, env, artifacts, facts, models, index + 1, started, argv), env, artifacts,
                      facts, args)
        log(f"round {index + 1}/{args.rounds} done ({len(artifacts)} artifacts); wrote {out}")
    print("\n".join(summary_lines(artifacts, models)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
