"""Run exported ONNX files with ONNX Runtime: predictions, parity vs torch, drift and latency."""

from __future__ import annotations

import math
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
