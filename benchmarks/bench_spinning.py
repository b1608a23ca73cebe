"""How to time ONNX Runtime sessions side by side in one process: spin-waiting off, on, or on and stopped
when each run returns, against each artifact timed alone in its own process.

    python benchmarks/bench_spinning.py [--models resnet18 efficientnet_b0 mobilevit_s] [--threads 2]
                                        [--rounds 15] [--alone-rounds 4] [--out benchmarks/results/spinning-<m>.md]

For each student (random init, 224 px): our FP32 score model and the INT8 recipe auto picks for it on an AVX2
CPU (kdiqa_edge/export/recipes.py). The truth is each artifact alone in a fresh process, timed back to back
for a few seconds, with spin-waiting on (ORT's default, what ships) and off; the processes alternate over
`--alone-rounds` rounds. Then every artifact of every student is opened in one process, the way `--precision
auto`, `kdiqa-edge bench` and the benchmarks here time them, under three session settings in turn: spinning
off; on; on with `session.force_spinning_stop` (the workers spin between the ops of a run, not after it). Each
turn is one untimed run and `--runs` timed ones, the order reversed every other round; medians. The table says how
far each in-process figure is from the artifact alone, and which FP32/INT8 ratio each protocol would report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from side_by_side import alternated, emit  # benchmarks/ is on sys.path (above)
from students import int8_graph

# the INT8 recipe auto ships for each on a 2-vCPU AVX2 EPYC (results/int8-amd-epyc-2c-avx2-without-vnni.md)
RECIPES = {"resnet18": ("qdq-all", "int8"), "efficientnet_b0": ("qdq-all", "block"),
           "mobilevit_s": ("attn-float", "float")}
SETTINGS = {"off": {"spinning": False}, "on": {"spinning": True},
            "on, stopped after each run": {"spinning": True, "stop_spinning": True}}
SIZE = 224


def build(arch: str, folder: Path, calib: np.ndarray) -> dict[str, Path]:
    """Our FP32 score model and the INT8 recipe of RECIPES, built the way export builds them."""
    from kdiqa_edge.export import recipes

    graph = int8_graph(arch, folder, calib, SIZE)
    name, stem = RECIPES[arch]
    return {"fp32": graph.fp32, "int8": graph.build(recipes.named(name, graph.facts, stem=stem), folder / "int8.onnx")}


def time_alone(path: Path, spinning: bool, threads: int, seconds: float) -> float:
    """Median ms of back-to-back runs of one artifact, alone in a fresh process (this script, --alone)."""
    out = subprocess.run([sys.executable, __file__, "--alone", str(path), "--threads", str(threads),
                          "--spin", "on" if spinning else "off", "--seconds", str(seconds)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def alone_main(path: str, spin: str, threads: int, seconds: float) -> None:
    from kdiqa_edge.export import evaluate

    session = evaluate.session(path, threads, spinning=spin == "on")
    feed = {session.get_inputs()[0].name: np.zeros((1, 3, SIZE, SIZE), np.float32)}
    for _ in range(5):
        session.run(None, feed)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    print(f"{np.median(times) * 1e3:.4f}")


def side_by_side(paths: dict, setting: dict, threads: int, rounds: int, runs: int) -> dict:
    """Every artifact in one process under one session setting (side_by_side.alternated: each turn one untimed
    run and `runs` timed ones); median ms per artifact."""
    from kdiqa_edge.export import evaluate

    sessions = {key: evaluate.session(path, threads, **setting) for key, path in paths.items()}
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    feeds = {key: {session.get_inputs()[0].name: x} for key, session in sessions.items()}
    calls = {key: (lambda s=session, f=feeds[key]: s.run(None, f)) for key, session in sessions.items()}
    times, _ = alternated(calls, rounds, runs)
    return {key: float(np.median(t)) * 1e3 for key, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="rounds per in-process setting")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per artifact per turn")
    parser.add_argument("--alone-rounds", type=int, default=4, help="rounds of one process per artifact")
    parser.add_argument("--seconds", type=float, default=2.0, help="back-to-back timing per alone process")
    parser.add_argument("--calib", type=int, default=16, help="random calibration images")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--alone", help=argparse.SUPPRESS)
    parser.add_argument("--spin", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.alone:
        return alone_main(args.alone, args.spin, args.threads, args.seconds)

    import onnxruntime as ort

    from kdiqa_edge.bench.environment import cpu_line, machine_slug
    from kdiqa_edge.console import quiet_logger

    calib = np.random.default_rng(0).standard_normal((args.calib, 3, SIZE, SIZE)).astype(np.float32)
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-spinning-") as scratch:
        with quiet_logger():
            paths = {(arch, kind): path for arch in args.models
                     for kind, path in build(arch, Path(scratch) / arch, calib).items()}
        alone = {(key, spin): [] for key in paths for spin in ("on", "off")}
        for round_index in range(args.alone_rounds):
            for key, path in paths.items():
                for spin in ("on", "off"):
                    alone[(key, spin)].append(time_alone(path, spin == "on", args.threads, args.seconds))
            loads.append(os.getloadavg()[0])
            print(f"alone: round {round_index + 1}/{args.alone_rounds} done", flush=True)
        truth = {key: float(np.median(v)) for key, v in alone.items()}
        inside = {}
        for name, setting in SETTINGS.items():
            inside[name] = side_by_side(paths, setting, args.threads, args.rounds, args.runs)
            loads.append(os.getloadavg()[0])
            print(f"side by side, spinning {name}: done", flush=True)
    command = " ".join(["python benchmarks/bench_spinning.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"# Timing ONNX Runtime sessions side by side: spin-waiting ({machine_slug()})", "",
             f"`{command}`: random-init "
             f"students, {SIZE} px, batch 1, {args.threads} intra-op threads. Alone: each artifact in a fresh "
             f"process, {args.seconds:g} s back to back, {args.alone_rounds} alternated rounds (median of the "
             f"rounds' medians). Side by side: all {len(paths)} artifacts in one process, {args.rounds} alternated "
             f"rounds x (1 untimed + {args.runs} timed runs) per setting.", "",
             f"{cpu_line()}; onnxruntime {ort.__version__}; load average {min(loads):.2f}-{max(loads):.2f}.", "",
             "| student | artifact | alone, on | alone, off | " + " | ".join(f"side by side, {n}" for n in SETTINGS)
             + " |", "|---|---|---|---|" + "---|" * len(SETTINGS)]
    for (arch, kind) in paths:
        on, off = truth[((arch, kind), "on")], truth[((arch, kind), "off")]
        cells = [f"{inside[n][(arch, kind)]:.2f} ({inside[n][(arch, kind)] / on:.2f}x alone-on)" for n in SETTINGS]
        lines.append(f"| {arch} | {kind} | {on:.2f} | {off:.2f} | {' | '.join(cells)} |")
    lines += ["", "FP32/INT8 speed-up each way of timing would report (alone, on: what a served model gets):", "",
              "| student | alone, on | alone, off | " + " | ".join(f"side by side, {n}" for n in SETTINGS) + " |",
              "|---|---|---|" + "---|" * len(SETTINGS)]
    for arch in args.models:
        ratio = [truth[((arch, "fp32"), s)] / truth[((arch, "int8"), s)] for s in ("on", "off")]
        ratio += [inside[n][(arch, "fp32")] / inside[n][(arch, "int8")] for n in SETTINGS]
        lines.append(f"| {arch} | " + " | ".join(f"{r:.2f}x" for r in ratio) + " |")
    lines += ["", "Side by side with spinning on, an idle session's workers spin on after its run (ORT spins up to "
              "2^20 pauses, tens of ms) into the next session's turn; with it off, every op's wake-up is paid. "
              "Stopped after each run, a session spins within its runs as a served one does, and leaves the cores "
              "free when its turn ends."]
    emit("\n".join(lines) + "\n", args.out)
    return {"alone": truth, "side_by_side": inside}


if __name__ == "__main__":
    main()
