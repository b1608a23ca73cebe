"""Run exported ONNX files with ONNX Runtime: predictions, parity vs torch, drift and latency."""

from __future__ import annotations

import math
import re
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def session(path: str | Path, threads: int = 2, fp16: bool = False, spinning: bool | None = None,
            stop_spinning: bool = False):
    """A CPU session. FP16 graphs get the EXTENDED optimization level: ORT 1.32's full level (layout
    transforms) segfaults on FP16 transformer graphs here. spinning: intra-op spin-waiting (None: ORT's
    default, on). stop_spinning: the workers stop spinning when a run returns (`session.force_spinning_stop`),
    for sessions timed side by side in one process."""
    import onnxruntime as ort

    from kdiqa_edge.runtime.backends import spin_options

    options = ort.SessionOptions()
    if fp16:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    spin_options(options, spinning, stop_spinning)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_reference(model, images: np.ndarray) -> np.ndarray:
    """The source model's own scores (its forward on normalized float pixels) for parity."""
    import torch

    from kdiqa_edge.preprocess import normalize

    with torch.no_grad():
        out = [model(torch.from_numpy(normalize(images[i:i + 16], model.preprocess))).reshape(-1)
               for i in range(0, len(images), 16)]
    return torch.cat(out).double().numpy()


def predict(sess, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """Scores [N] for model inputs (already in the artifact's input format)."""
    name = sess.get_inputs()[0].name
    out = [sess.run(["score"], {name: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)]
    return np.concatenate(out).astype(np.float64).reshape(-1)


def latency_ms(sess, one: np.ndarray, runs: int = 30, warmup: int = 5) -> dict[str, float]:
    """Batch-1 latency: warm-up runs, then `runs` timed runs with perf_counter; median and p90 in ms."""
    name = sess.get_inputs()[0].name
    feed = {name: one[:1]}
    for _ in range(warmup):
        sess.run(["score"], feed)
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        sess.run(["score"], feed)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3),
            "runs": len(times), "batch": 1}


def parity(reference: np.ndarray, scores: np.ndarray, tolerance: float | None) -> dict[str, Any]:
    diff = np.abs(np.asarray(reference, np.float64) - np.asarray(scores, np.float64))
    report: dict[str, Any] = {"images": len(diff), "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
                              "mean_abs_diff": float(diff.mean()) if len(diff) else 0.0}
    if tolerance is not None:
        report["tolerance"] = tolerance
        report["passed"] = bool(report["max_abs_diff"] <= tolerance)
    return report


def drift(reference: np.ndarray, scores: np.ndarray, mos: np.ndarray) -> dict[str, Any]:
    """Accuracy of the reduced-precision model vs the FP32 one on the same test images (SRCC/PLCC vs MOS)."""
    from scipy import stats

    from kdiqa_edge.metrics import evaluate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the logistic fit overflows on near-flat scores
        ref = evaluate(reference, mos)
        low = evaluate(scores, mos)
    return {
        "images": len(mos),
        "fp32": {"srcc": ref.srcc, "plcc": ref.plcc},
        "reduced": {"srcc": low.srcc, "plcc": low.plcc},
        "delta_srcc": low.srcc - ref.srcc,
        "delta_plcc": low.plcc - ref.plcc,
        "srcc_vs_fp32": float(stats.spearmanr(reference, scores)[0]),
        "max_abs_diff_vs_fp32": float(np.max(np.abs(np.asarray(reference) - np.asarray(scores)))),
        "mean_abs_diff_vs_fp32": float(np.mean(np.abs(np.asarray(reference) - np.asarray(scores)))),
    }


def drift_verdict(delta_srcc: float, max_drift: float) -> str:
    """The drift check's verdict: |ΔSRCC| against the --max-drift bound."""
    if math.isnan(delta_srcc):  # the scores are constant
        return "not measurable (constant scores)"
    if abs(delta_srcc) <= max_drift:
        return f"within the {max_drift:g} bound (--max-drift): ok"
    return f"over the {max_drift:g} bound (--max-drift): check it on your own images before shipping"


# a verdict drift_verdict wrote, whatever its bound: what a reused export's notes are judged again by
_VERDICT = re.compile(r"(within|over) the \S+ bound \(--max-drift\)(: ok|: check it on your own images before shipping)")


def rejudged(notes: list[str], delta_srcc: float, max_drift: float) -> list[str]:
    """`notes` with each drift verdict judged against `max_drift` (a reused export was judged under the bound
    of the run that built it: its |ΔSRCC| is the same, the bound may not be)."""
    verdict = drift_verdict(delta_srcc, max_drift)
    return [_VERDICT.sub(verdict, note) for note in notes]


def kernel_profile(path: str | Path, x: np.ndarray, threads: int = 2, runs: int = 10,
                   provider: str = "CPUExecutionProvider") -> dict[str, Any]:
    """Which kernels ran and where the time went: ONNX Runtime's profiler (SessionOptions.enable_profiling)
    over `runs` runs of `x`, summed by operator (the kernel's op type, e.g. QLinearConv, DequantizeLinear).

    Returns {"ops": [{"op", "ms", "share", "count"}] by time, "nodes": how many nodes ran, "runs"}: the
    evidence for why an INT8 model is slower than FP32 (float ops between Q/DQ pairs, Quantize/Dequantize
    passes, unfused depthwise convs)."""
    import json
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="kdiqa-profile-") as scratch:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "profile")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(path), options, providers=[provider])
        feed = {sess.get_inputs()[0].name: x}
        sess.run(None, feed)  # the first run allocates; it is profiled too, and dropped below
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    node_events = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run: dict[str, list[float]] = {}
    nodes = set()
    for event in node_events:
        op = event.get("args", {}).get("op_name", "?")
        per_run.setdefault(op, []).append(float(event.get("dur", 0)) / 1e3)
        nodes.add(event["name"])
    calls = max(runs + 1, 1)
    total = sum(sum(v) for v in per_run.values()) or 1.0
    ops = sorted(({"op": op, "ms": round(sum(v) / calls, 3), "share": round(sum(v) / total, 3),
                   "count": len(v) // calls} for op, v in per_run.items()), key=lambda r: -r["ms"])
    return {"ops": ops, "nodes": len(nodes), "runs": runs, "total_ms": round(total / calls, 3)}


def profile_line(profile: dict[str, Any], top: int = 5) -> str:
    """'QLinearConv 45% (52), DequantizeLinear 18% (60), ...': the top kernels of a kernel_profile."""
    return ", ".join(f"{r['op']} {r['share']:.0%} ({r['count']})" for r in profile["ops"][:top])


# --- score maps (export --with-map) ---------------------------------------------------------------------


def torch_maps(model, images: np.ndarray) -> np.ndarray:
    """The source model's fast maps [N, h, w] (kdiqa_edge/models/maps.py) for uint8 NHWC images."""
    import torch

    from kdiqa_edge.models.maps import fast_map
    from kdiqa_edge.preprocess import normalize

    out = [fast_map(model, torch.from_numpy(normalize(images[i:i + 16], model.preprocess)))
           for i in range(0, len(images), 16)]
    return torch.cat(out).double().numpy()


def map_report(model, path: Path, images: np.ndarray, tolerance: float | None, threads: int,
               without_map: Path | None = None, runs: int = 30) -> dict[str, Any]:
    """The `score_map` output of the artifact at `path`, through the runtime, checked like the score: parity vs
    the torch model's map on `images` (an ExportError beyond `tolerance`). With `without_map` (the same export
    without the map), whether the `score` output is bit-identical to that export's, and the latency the map
    adds at batch 1 (both artifacts timed in alternate runs, medians)."""
    from kdiqa_edge.errors import ExportError
    from kdiqa_edge.runtime import QualityModel
    from kdiqa_edge.runtime.maps import MAP_OUTPUT, predict_maps

    quality_model = QualityModel.load(path, threads=threads)
    scores, maps = predict_maps(quality_model, images)
    reference = torch_maps(model, images)
    report: dict[str, Any] = {
        "output": MAP_OUTPUT, "kind": "fast", "shape": list(maps.shape[1:]),
        "range": [float(maps.min()), float(maps.max())],
        "parity": parity(reference.reshape(-1), maps.reshape(-1).astype(np.float64), tolerance)}
    report["parity"].update(images=len(images), values=int(maps.size))
    if report["parity"].get("passed") is False:
        raise ExportError(f"{path.name}: {MAP_OUTPUT} parity check failed, max |map - torch map| = "
                          f"{report['parity']['max_abs_diff']:.2e} > {tolerance:.0e}")
    if without_map is not None:
        plain = QualityModel.load(without_map, threads=threads)
        plain_scores = plain.predict(images)
        report["score_vs_without_map"] = {"images": len(images), "identical": bool(np.array_equal(plain_scores, scores)),
                                          "max_abs_diff": float(np.max(np.abs(plain_scores - scores)))}
        report["latency"] = map_latency(plain, quality_model, images[:1], runs)
    return report


def map_latency(plain, mapped, one: np.ndarray, runs: int = 30, warmup: int = 3) -> dict[str, Any]:
    """Batch-1 latency of the export without the map (its score) and with it (score and score_map), in
    alternate runs on the same image: medians in ms, and what the map adds."""
    from kdiqa_edge.runtime.maps import map_outputs

    x_plain, x_mapped = plain.prepare(one), mapped.prepare(one)
    calls = (lambda: plain.run(x_plain), lambda: map_outputs(mapped, x_mapped))
    for call in calls:
        for _ in range(warmup):
            call()
    times: tuple[list[float], list[float]] = ([], [])
    for turn in range(max(runs, 1)):
        for index in ((0, 1) if turn % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            calls[index]()
            times[index].append((time.perf_counter() - start) * 1e3)
    without, with_map = (statistics.median(t) for t in times)
    return {"batch": 1, "runs": len(times[0]), "without_map_p50_ms": round(without, 3),
            "with_map_p50_ms": round(with_map, 3), "added_ms": round(with_map - without, 3),
            "ratio": round(with_map / without, 3) if without else None, "protocol": "alternate runs, medians"}


def map_notes(report: dict[str, Any], name: str) -> list[str]:
    """What the export says about its map: shape and parity, the score against the export without the map, and
    the latency the map adds."""
    parity_report = report["parity"]
    h, w = report["shape"]
    line = (f"{name}: {report['output']} [N, {h}, {w}] (fast map), parity vs torch: max |diff| "
            f"{parity_report['max_abs_diff']:.1e} over {parity_report['values']} values")
    notes = [line + (f", within the {parity_report['tolerance']:.0e} tolerance: ok" if parity_report.get("passed")
                     else ", reported only (no tolerance for this precision)")]
    same = report.get("score_vs_without_map")
    if same is not None:
        notes.append(f"{name}: score output vs the export without the map: "
                     + ("bit-identical" if same["identical"] else
                        f"NOT bit-identical (max |diff| {same['max_abs_diff']:.1e})")
                     + f" on {same['images']} images")
        latency = report["latency"]
        added = (f"adds {latency['added_ms']:.2f} ms" if latency["added_ms"] > 0 else
                 "adds nothing measurable")  # a tiny model's map is within the run-to-run noise of a loaded machine
        notes.append(f"{name}: the map {added} at batch 1 here: {latency['with_map_p50_ms']:.2f} ms with it, "
                     f"{latency['without_map_p50_ms']:.2f} ms without (alternate runs, medians)")
    return notes
