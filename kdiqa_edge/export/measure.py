"""One artifact timed alone in a fresh process: the turn of cross-runtime `--precision auto` (export/isolated.py,
`rank_isolated`).

    python -m kdiqa_edge.export.measure ARTIFACT --pixels PIXELS.npy --batches 1,8 --seconds 2 --threads 2 \
        --json-out TIMES.json [--provider cpu] [--load '{"stop_spinning": true}']

loads ARTIFACT through `QualityModel.load` (the runtime its suffix names, nothing else), runs WARMUP untimed
runs per batch size, then times runs (`bench.latency.timed_run`) for SECONDS per batch size on the first
images of PIXELS (uint8 NHWC, repeated up to the batch), and writes the seconds of every timed run per batch
size to TIMES as JSON. Why a process per turn: ONNX Runtime's, OpenVINO's and ExecuTorch's thread pools,
loaded in one process, take the cores from each other (an idle pool spins, a shared one is resized), so
runtimes timed side by side there rank by who ran last, not by speed.

Torch-free except where the artifact's runtime needs it (a .pte: executorch's pybindings load libtorch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdiqa_edge.errors import ExportError, KdiqaError

WARMUP = 3  # untimed runs per batch size before timing (the first runs allocate and tune)
MIN_RUNS = 3  # timed runs per batch size, however long one takes
START_TIMEOUT = 300  # seconds a turn may take beyond its timing: the interpreter, the runtime and the load


def time_artifact(path: Path, pixels: np.ndarray, batches: tuple[int, ...], seconds: float, threads: int | None,
                  provider: str | None = None, load: dict[str, Any] | None = None) -> dict[int, list[float]]:
    """In this process: the seconds of each timed run per batch size (see the module docstring)."""
    from kdiqa_edge.bench.latency import timed_run
    from kdiqa_edge.runtime import QualityModel

    model = QualityModel.load(path, provider=provider, threads=threads, **(load or {}))
    times: dict[int, list[float]] = {}
    for batch in batches:
        x = model.prepare(np.ascontiguousarray(pixels[np.resize(np.arange(len(pixels)), batch)]))
        for _ in range(WARMUP):
            model.run(x)
        runs: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(runs) < MIN_RUNS or time.perf_counter() < deadline:
            runs.append(timed_run(model, x))
        times[batch] = runs
    return times


def in_own_process(path: Path, pixels_file: Path, batches: tuple[int, ...], seconds: float, threads: int | None,
                   provider: str | None = None, load: dict[str, Any] | None = None) -> dict[int, list[float]]:
    """`time_artifact` in a fresh Python process (this interpreter, `-m kdiqa_edge.export.measure`); its
    converters' and runtimes' output goes nowhere, a failure is an ExportError with the worker's last line."""
    with tempfile.TemporaryDirectory(prefix="kdiqa-measure-") as scratch:
        result = Path(scratch) / "times.json"
        command = [sys.executable, "-m", "kdiqa_edge.export.measure", str(path), "--pixels", str(pixels_file),
                   "--batches", ",".join(str(b) for b in batches), "--seconds", str(seconds),
                   "--json-out", str(result), "--load", json.dumps(load or {})]
        command += ["--threads", str(threads)] if threads else []
        command += ["--provider", provider] if provider else []
        timeout = START_TIMEOUT + 4 * seconds * len(batches)
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ExportError(f"{path.name}: its timing process ran past {timeout:.0f} s") from None
        if done.returncode != 0 or not result.is_file():
            said = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            raise ExportError(f"{path.name}: its timing process failed (exit {done.returncode}): "
                              f"{said[-1] if said else 'no output'}")
        return {int(batch): runs for batch, runs in json.loads(result.read_text(encoding="utf-8")).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdiqa_edge.export.measure", description=__doc__.split("\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--pixels", type=Path, required=True, help="uint8 NHWC images (.npy)")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per batch size")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--provider", default=None)
    parser.add_argument("--load", default="{}", help="QualityModel.load options, as JSON")
    parser.add_argument("--json-out", type=Path, required=True)
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    try:
        times = time_artifact(args.artifact, np.load(args.pixels), batches, args.seconds, args.threads,
                              args.provider, json.loads(args.load))
    except KdiqaError as exc:  # one line, which the coordinator reports
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.json_out.write_text(json.dumps({str(b): runs for b, runs in times.items()}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
