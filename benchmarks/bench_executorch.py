"""ExecuTorch (XNNPACK) against ONNX Runtime on this CPU, FP32 and INT8, at the same thread count; writes
benchmarks/results/executorch-<machine>.md (and .json).

    python benchmarks/bench_executorch.py [--models resnet18 efficientnet_b0 ...] [--threads 2] [--rounds 7]

For each student (random init, 224 px, a run dir with checkpoints/best, as bench_suite.py makes them): export
ExecuTorch FP32 and INT8 and ONNX FP32 and INT8 through `export_checkpoint` (parity, drift, the undelegated
operators), bench the four against the run dir with `run_bench` (what `kdiqa-edge bench` runs: latency,
size, params, drift vs the torch checkpoint), then time batch-1 inference of the four through the runtime
backends in ALTERNATED rounds in this one process (the machine is shared: a slow spell hits every format of a
round alike), and report per-round medians and the ExecuTorch / ONNX Runtime ratios. A student that cannot
be exported gets its one-line reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STUDENTS = ("resnet18", "efficientnet_b0", "mobilevit_s", "swin_tiny_patch4_window7_224")
FORMATS = (("executorch", "fp32"), ("executorch", "int8"), ("onnx", "fp32"), ("onnx", "int8"))
ISA = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
       "avx512_fp16", "avx_vnni", "avx_vnni_int8", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd",
       "asimddp", "i8mm")


def isa_flags() -> list[str]:
    """The SIMD extensions the CPU reports that INT8 and FP32 kernels dispatch on."""
    from kdiqa_edge.bench.environment import cpu_flags

    flags = set(cpu_flags())
    return [flag for flag in ISA if flag in flags]


def environment(threads: int) -> dict:
    from importlib import metadata

    from kdiqa_edge.bench.environment import cpu_name, versions

    found = versions()
    for package in ("executorch", "torchao", "timm"):
        with contextlib.suppress(metadata.PackageNotFoundError):  # a missing package is simply not listed
            found[package] = metadata.version(package)
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "isa": isa_flags(), "threads": threads,
            "python": platform.python_version(), "versions": found,
            "load_average_start": [round(x, 2) for x in os.getloadavg()]}


def export_formats(run: Path, out: Path, data, threads: int, calib: int, log) -> tuple[dict, dict]:
    """{label: artifact path} for the formats that exported, {label: one-line reason} for those that did not."""
    from kdiqa_edge.errors import KdiqaError
    from kdiqa_edge.export import ExportConfig, export_checkpoint

    artifacts, failures = {}, {}
    for target, precision in FORMATS:
        label = f"{target}-{precision}"
        cfg = ExportConfig(target=target, precision=precision, calib=calib, parity_images=8, eval_images=64,
                           latency_runs=10, threads=threads)
        start = time.perf_counter()
        try:
            manifest = export_checkpoint(run, cfg, out, data=data, progress=False, log=lambda _: None)
        except KdiqaError as exc:
            failures[label] = str(exc)
            log(f"  {label}: FAILED: {exc}")
            continue
        entry = manifest["exports"][label]
        artifacts[label] = out / next(f["path"] for f in entry["files"] if f["path"].endswith((".pte", ".onnx")))
        log(f"  {label}: {artifacts[label].name} ({time.perf_counter() - start:.0f} s)")
        for note in entry.get("notes", []):
            if "operators" in note:
                log(f"    {note}")
    return artifacts, failures


def alternated_latency(paths: dict[str, Path], threads: int, rounds: int, runs: int) -> dict[str, list[float]]:
    """Per-round batch-1 median latency (ms) of each artifact, the formats alternating within every round."""
    from kdiqa_edge.bench.latency import time_inference
    from kdiqa_edge.runtime import QualityModel

    models = {label: QualityModel.load(path, threads=threads) for label, path in paths.items()}
    for model in models.values():  # warm every model before the first timed round
        time_inference(model, 1, warmup=5, runs=1)
    medians: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(rounds):
        for label, model in models.items():
            medians[label].append(time_inference(model, 1, warmup=2, runs=runs).p50_ms)
    return medians


def score_images(paths: dict[str, Path], data, threads: int, count: int = 4) -> dict[str, dict[str, float]]:
    """Each artifact scores the same few image files through QualityModel.score (what `kdiqa-edge score` runs)."""
    from kdiqa_edge.data import load_dataset
    from kdiqa_edge.runtime import QualityModel

    dataset = load_dataset(data)
    files = [dataset.root / record.image for record in dataset.records[:count]]
    return {label: {file.name: round(float(score), 4)
                    for file, score in zip(files, QualityModel.load(path, threads=threads).score(files))}
            for label, path in paths.items()}


def manifest_facts(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    facts = {}
    for label, entry in manifest["exports"].items():
        details = entry.get("details") or {}
        facts[label] = {"parity": entry.get("parity"), "drift": {k: v for k, v in (entry.get("drift") or {}).items()
                                                                  if k != "latency"},
                        "delegation": details.get("delegation"), "notes": entry.get("notes")}
    return facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(STUDENTS))
    parser.add_argument("--work", type=Path, default=None, help="Run dirs and exports (default: the cache dir).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib", type=int, default=128, help="INT8 calibration images (train split).")
    parser.add_argument("--rounds", type=int, default=7, help="Alternated latency rounds.")
    parser.add_argument("--runs", type=int, default=20, help="Timed runs per format per round.")
    parser.add_argument("--max-images", type=int, default=60, help="Eval images for the bench's drift.")
    parser.add_argument("--extra-threads", type=int, nargs="*", default=[],
                        help="More thread counts for the alternated rounds (e.g. 1: no thread-pool sync, which "
                             "other jobs on a shared machine disturb most).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from bench_suite import save_models

    from kdiqa_edge import paths
    from kdiqa_edge.bench import BenchConfig, run_bench
    from kdiqa_edge.bench.environment import machine_slug
    from kdiqa_edge.data.spec import DatasetSpec
    from kdiqa_edge.io import write_json, write_text

    def log(message: str) -> None:
        print(message, flush=True)

    env = environment(args.threads)
    log(f"{env['cpu']}, {env['cores']} cores, ISA {' '.join(env['isa'])}, threads {args.threads}, "
        f"load {env['load_average_start']}")
    work = args.work or paths.cache_dir() / "bench-executorch"
    data = DatasetSpec()  # the synthetic set: calibration, parity and drift images
    runs = save_models(work, args.models, pretrained=False)
    results: dict = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    out = args.out or ROOT / "benchmarks" / "results" / f"executorch-{machine_slug()}.md"
    started = time.perf_counter()
    for name in args.models:
        log(f"{name}: exporting")
        exports = work / name / "exports-et"
        artifacts, failures = export_formats(runs[name], exports, data, args.threads, args.calib, log)
        entry: dict = {"failures": failures}
        if artifacts:
            report = run_bench(list(artifacts.values()), reference=runs[name], data=data, progress=False,
                               cfg=BenchConfig(batch_sizes=(1,), threads=args.threads, warmup=3, runs=10,
                                               max_images=args.max_images))
            entry["bench"] = [r.to_dict() for r in report.results]
            entry["bench_notes"] = report.notes
            entry["scores"] = score_images(artifacts, data, args.threads)
            log(f"{name}: scores of {len(next(iter(entry['scores'].values())))} images: {entry['scores']}")
            entry["facts"] = manifest_facts(exports)
            log(f"{name}: alternated latency, {args.rounds} rounds x {args.runs} runs")
            entry["latency_rounds_ms"] = alternated_latency(artifacts, args.threads, args.rounds, args.runs)
            entry["extra_threads_rounds_ms"] = {str(t): alternated_latency(artifacts, t, args.rounds, args.runs)
                                                for t in args.extra_threads}
            by_threads = {str(args.threads): entry["latency_rounds_ms"], **entry["extra_threads_rounds_ms"]}
            for threads, table in by_threads.items():
                for label, rounds in table.items():
                    log(f"  {threads} thread(s) {label}: median {statistics.median(rounds):.2f} ms  "
                        f"rounds {[round(r, 2) for r in rounds]}")
        results["models"][name] = entry
        results["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        results["wall_min"] = round((time.perf_counter() - started) / 60, 1)
        write_json(out.with_suffix(".json"), results)
        write_text(out, document(results))
    log(f"wrote {out}")
    return 0


def _ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and range over rounds of a/b (same round, so a slow spell cancels)."""
    ratios = sorted(x / y for x, y in zip(a, b))
    return statistics.median(ratios), ratios[0], ratios[-1]


def _ms(medians: dict[str, float], label: str) -> str:
    return f"{medians[label]:.2f}" if label in medians else "—"


def _pair_ratio(rounds: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float] | None:
    return _ratio(rounds[a], rounds[b]) if a in rounds and b in rounds else None


_TABLE_HEAD = (("| student | ET FP32 ms | ORT FP32 ms | FP32 ratio | ET INT8 ms | ORT INT8 ms | INT8 ratio (range) | "
                "faster in INT8 | ET INT8/FP32 | ORT INT8/FP32 |"), "|---|---|---|---|---|---|---|---|---|---|")


def _faster(ratio: tuple[float, float, float] | None) -> str:
    """Who won every round: the whole range of per-round ratios on one side of 1, else a draw."""
    if ratio is None:
        return "—"
    if ratio[2] < 1:
        return "ExecuTorch (every round)"
    if ratio[1] > 1:
        return "ONNX Runtime (every round)"
    return f"{'ExecuTorch' if ratio[0] < 1 else 'ONNX Runtime'} (not every round)"


def _summary_row(name: str, rounds: dict[str, list[float]]) -> str:
    medians = {label: statistics.median(v) for label, v in rounds.items()}
    fp32 = _pair_ratio(rounds, "executorch-fp32", "onnx-fp32")
    int8 = _pair_ratio(rounds, "executorch-int8", "onnx-int8")
    faster = _faster(int8)
    own = [_pair_ratio(rounds, f"{target}-int8", f"{target}-fp32") for target in ("executorch", "onnx")]
    cells = [name, _ms(medians, "executorch-fp32"), _ms(medians, "onnx-fp32"),
             "—" if fp32 is None else f"{fp32[0]:.2f}", _ms(medians, "executorch-int8"), _ms(medians, "onnx-int8"),
             "—" if int8 is None else f"{int8[0]:.2f} ({int8[1]:.2f}-{int8[2]:.2f})", faster,
             *("—" if r is None else f"{r[0]:.2f}" for r in own)]
    return "| " + " | ".join(cells) + " |"


def _bench_rows(rows: list[dict]) -> list[str]:
    lines = [("| artifact | format | precision | status | size MB | params | p50 ms @1 (bench) | "
              "ΔSRCC vs torch | max \\|Δscore\\| vs torch |"), "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lat = row["latency"][0]["p50_ms"] if row.get("latency") else None
        drift = row.get("drift") or {}
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('reason')}"
        delta = "ref" if row["reference"] else format(drift.get("delta_srcc", float("nan")), "+.4f")
        worst = "ref" if row["reference"] else format(drift.get("max_abs_diff", float("nan")), ".4f")
        lines.append(f"| {row['name']} | {row['format']} | {row['precision']} | {status} | {row['size_mb'] or 0:.2f} "
                     f"| {(row['params'] or 0) / 1e6:.2f}M | {'—' if lat is None else f'{lat:.2f}'} | {delta} | "
                     f"{worst} |")
    return lines


def _fact_lines(label: str, fact: dict) -> list[str]:
    lines = []
    drift = fact.get("drift") or {}
    if drift:
        lines.append(f"- {label}: INT8 vs FP32 on {drift['images']} test images: rank agreement "
                     f"{drift['srcc_vs_fp32']:.4f}, mean \\|Δscore\\| {drift['mean_abs_diff_vs_fp32']:.4f}")
    delegation = fact.get("delegation")
    if delegation:
        ops = ", ".join(f"{op} x{n}" for op, n in delegation["undelegated_by_op"].items())
        total = delegation["delegated_ops"] + delegation["undelegated_ops"]
        lines.append(f"- {label}: {delegation['subgraphs']} XNNPACK subgraphs, {delegation['undelegated_ops']} of "
                     f"{total} operators outside ({delegation['undelegated_fraction']:.0%}): {ops or 'none'}")
    return lines


def document(results: dict) -> str:
    env = results["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items()))
    lines = [
        f"# ExecuTorch (XNNPACK) vs ONNX Runtime: {env['cpu']}", "",
        ("Random-init students at 224 px (no pretrained weights on this offline machine): latency, size, "
         "parameters and the drift each format costs are real; accuracy is an untrained model's and only "
         "anchors the drift. Reference = the PyTorch checkpoint (the run dir)."), "",
        f"- CPU: {env['cpu']}, {env['cores']} logical cores; ISA: {' '.join(env['isa']) or '?'}",
        f"- Threads: {env['threads']} for both runtimes (ONNX Runtime intra-op, ExecuTorch's pool); batch 1",
        f"- Versions: {versions}; Python {env['python']}",
        (f"- Load average: {env['load_average_start']} at the start, {env.get('load_average_end')} at the end "
         f"on {env['cores']} logical cores (where other jobs share the CPU, read the ratios, from alternated "
         "rounds in one process)"),
        f"- Command: `python benchmarks/bench_executorch.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Wall time: {results.get('wall_min')} min", "",
        ("## Head to head (batch 1, median of per-round medians; ratio = ExecuTorch / ONNX Runtime in the same "
         "round, median and range; < 1: ExecuTorch faster)"), "",
        *_TABLE_HEAD,
    ]
    details = []
    for name, entry in results["models"].items():
        lines.append(_summary_row(name, entry.get("latency_rounds_ms") or {}))
    extra = sorted({t for entry in results["models"].values() for t in entry.get("extra_threads_rounds_ms") or {}})
    for threads in extra:
        lines += ["", f"At {threads} thread(s), same rounds scheme:", "", *_TABLE_HEAD]
        lines += [_summary_row(name, (entry.get("extra_threads_rounds_ms") or {}).get(threads) or {})
                  for name, entry in results["models"].items()]
    for name, entry in results["models"].items():
        rounds = entry.get("latency_rounds_ms") or {}
        details.append(f"\n### {name}\n")
        details += [f"- **{label} failed**: {reason}" for label, reason in entry.get("failures", {}).items()]
        if entry.get("bench"):
            details += ["", *_bench_rows(entry["bench"]), ""]
            details += [f"- bench: {note}" for note in entry.get("bench_notes", [])]
        for label, scores in (entry.get("scores") or {}).items():
            details.append(f"- {label} scores: " + ", ".join(f"{file} {score:.4f}" for file, score in scores.items()))
        for label, fact in (entry.get("facts") or {}).items():
            details += _fact_lines(label, fact)
        by_threads = {results["environment"]["threads"]: rounds, **(entry.get("extra_threads_rounds_ms") or {})}
        for threads, table in by_threads.items():
            if table:
                details.append(f"- per-round medians at {threads} thread(s), ms: " + "; ".join(
                    f"{label} {[round(x, 2) for x in v]}" for label, v in table.items()))
    return "\n".join(lines + [""] + details + [""])


if __name__ == "__main__":
    sys.exit(main())
