"""The stem block in float (`--int8-stem block`) vs qdq-all with the stem in int8 or float, per timm student.

    python benchmarks/bench_stem_block.py [--models efficientnet_b0 mobilenetv2_100 ...] [--threads 2]
                                          [--rounds 30] [--runs 3] [--out benchmarks/results/stem-block-<m>.md]

For each student (random init, 224 px, our FP32 score model as `export` writes it), kdiqa_edge's graph facts
say whether it has a stem block (recipes.stem_block: the stem and the convs after it at its resolution,
through the narrowest); where it does, qdq-all is built with the stem in int8, in float and with the stem
block in float. Every artifact of every student is timed in the same rounds (batch 1, spin-waiting stopped
when each run returns, the order reversed every other round); medians and the speed-up over FP32. Auto offers
the stem block as one more candidate and measures it; this says on which architectures it is likely to win on
this CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from side_by_side import alternated, emit  # benchmarks/ is on sys.path (above)
from students import int8_graph

MODELS = ("efficientnet_b0", "efficientnet_b1", "efficientnet_lite0", "mobilenetv2_100", "mobilenetv3_large_100")
STEMS = ("int8", "float", "block")
SIZE = 224


def build(arch: str, folder: Path, calib: np.ndarray) -> tuple[int, dict[str, Path]]:
    """(stem block nodes, artifact name -> path): FP32 and, where the graph has a stem block, the three stems."""
    from kdiqa_edge.export import recipes

    graph = int8_graph(arch, folder, calib, SIZE)
    paths = {"fp32": graph.fp32}
    if graph.facts.stem_block:
        for stem in STEMS:
            recipe = recipes.named("qdq-all", graph.facts, stem=stem)
            paths[recipe.name] = graph.build(recipe, folder / f"{recipe.name}.onnx")
    return len(graph.facts.stem_block), paths


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per artifact per round")
    parser.add_argument("--calib", type=int, default=16, help="random calibration images")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from kdiqa_edge.bench.environment import cpu_line, machine_slug
    from kdiqa_edge.console import quiet_logger
    from kdiqa_edge.export import evaluate

    rng = np.random.default_rng(0)
    calib = rng.standard_normal((args.calib, 3, SIZE, SIZE)).astype(np.float32)
    x = calib[:1]
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-stem-block-") as scratch, quiet_logger():
        blocks, sessions = {}, {}
        for arch in args.models:
            blocks[arch], paths = build(arch, Path(scratch) / arch, calib)
            for name, path in paths.items():
                sessions[(arch, name)] = evaluate.session(path, args.threads, stop_spinning=True)
            print(f"{arch}: stem block of {blocks[arch]} nodes, {len(paths)} artifacts", flush=True)
        calls = {key: (lambda s=session: s.run(None, {"image": x})) for key, session in sessions.items()}
        times, loads = alternated(calls, args.rounds, args.runs)
        load += loads
    p50 = {key: float(np.median(t)) * 1e3 for key, t in times.items()}
    command = " ".join(["python benchmarks/bench_stem_block.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"# The stem block in float vs qdq-all, per student ({machine_slug()})", "",
             f"`{command}`: random-init "
             f"students, {SIZE} px, batch 1, {args.threads} ONNX Runtime threads (spin-waiting stopped when a run "
             f"returns), every artifact in each of {args.rounds} alternated rounds x {args.runs} runs; medians.", "",
             f"{cpu_line()}; onnxruntime {ort.__version__}; load average {load[0]:.2f} before, "
             f"{min(load[1:]):.2f}-{max(load[1:]):.2f} over the rounds.", "",
             "| student | stem block nodes | FP32 ms | stem-int8 | stem-float | stem-block | block / best other |",
             "|---|---|---|---|---|---|---|"]
    for arch in args.models:
        fp32 = p50[(arch, "fp32")]
        if not blocks[arch]:
            lines.append(f"| {arch} | none (not offered) | {fp32:.2f} | | | | |")
            continue
        ms = {stem: p50[(arch, f"qdq-all+stem-{stem}")] for stem in STEMS}
        cells = [f"{ms[s]:.2f} ({fp32 / ms[s]:.2f}x)" for s in STEMS]
        versus = min(ms["int8"], ms["float"]) / ms["block"]
        lines.append(f"| {arch} | {blocks[arch]} | {fp32:.2f} | {' | '.join(cells)} | {versus:.2f}x |")
    lines += ["", "Speed-ups are over our FP32; 'block / best other' above 1 means the stem block is the faster "
              "qdq-all here. Auto measures the candidate on the deployment machine either way."]
    emit("\n".join(lines) + "\n", args.out)
    return p50


if __name__ == "__main__":
    main()
