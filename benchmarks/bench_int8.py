"""INT8 on ONNX Runtime, per architecture and per CPU: every recipe, auto's pick, and a plain export, side by side.

    python benchmarks/bench_int8.py [--models resnet18 efficientnet_b0 ...] [--threads 2] [--rounds 7]
                                    [--runs 6] [--max-drift 1.0] [--work DIR] [--out FILE.md]

For the paper's four students and the CLIP ViT-B/32 teacher's image tower (random init: no pretrained
weights on this offline machine), 224 px, batch 1:
- our FP32 score model, every INT8 recipe the graph calls for (kdiqa_edge/export/recipes.py) and auto's
  pick (kdiqa_edge/export/auto.py, the same code as `kdiqa-edge export --precision auto`);
- the plain export of the same backbone: torch.onnx.export of the bare timm model (the open_clip visual
  tower for the teacher), no projection or head, no graph clean-up, and quantize_static after
  quant_pre_process in the U8S8 per-channel QDQ form with every default op type and MinMax calibration;
- the teacher tower in torch eager too (the ratio the paper's distillation buys).
Every artifact of every model is loaded at once and timed in the same rounds, the order reversed every
other round; medians; ratios are the figures to read (other jobs share the machine: the load is printed).
ONNX Runtime's profiler says which kernels ran for FP32 and INT8, to explain an INT8 that does not pay.

Drift (ΔSRCC, |Δscore| vs FP32) is measured on the synthetic test split like auto does, but random-init
weights score images almost alike, so those figures say nothing about a trained model: auto's pick here is
ranked with the bound off by default (--max-drift 1.0), and the table shows which candidates would pass 0.01.

Writes benchmarks/results/int8-<machine>-<isa>.md (and a .json beside it); the tables are int8_report.py's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from int8_report import (  # benchmarks/ is on sys.path (above)
    BOUND,
    SPEEDUP,
    TEACHER,
    Row,
    done_when,
    environment_lines,
    model_section,
    summary,
)
from side_by_side import alternated  # benchmarks/ is on sys.path (above)

MODELS = ("resnet18", "efficientnet_b0", "mobilevit_s", "swin_tiny_patch4_window7_224", TEACHER)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", flush=True)


def build_model(name: str, teacher):
    import torch

    from kdiqa_edge.models.student import create_student

    if name == TEACHER:
        return teacher
    torch.manual_seed(0)
    return create_student(name, teacher.head, teacher.preprocess, pretrained=False).eval()


def plain_exports(name: str, model, calib: np.ndarray, work: Path) -> tuple[Path, Path]:
    """torch.onnx.export of the bare backbone, and quantize_static's U8S8 per-channel QDQ of it."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from kdiqa_edge.console import quiet_logger
    from kdiqa_edge.models.score import plain_attention

    backbone = model.visual if name == TEACHER else model.encoder
    fp32, pre, int8 = work / "plain.fp32.onnx", work / "plain.pre.onnx", work / "plain.int8.onnx"
    size = model.preprocess.size
    with warnings.catch_warnings(), torch.no_grad(), plain_attention():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone.eval(), (torch.randn(1, 3, size, size),), str(fp32), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["features"],
                          dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": calib[i:i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    with quiet_logger():  # onnxruntime.quantization warns per LayerNorm weight on the root logger
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return fp32, int8


def ours(name: str, model, examples, cfg, work: Path, max_drift: float) -> tuple[list[Row], dict]:
    """Every candidate of `--precision auto`, built and measured by auto's own code; returns the rows and the pick."""
    from kdiqa_edge.export import TARGETS, auto
    from kdiqa_edge.export.pipeline import artifact_meta

    target = TARGETS.get("onnx")
    candidates = target.candidates(model, examples, cfg, {**artifact_meta(model), "target": "onnx"}, work / "shared")
    items = auto.build_all(candidates, work, log=lambda m: log(f"{name}: {m.strip()}"))
    models = auto.load_models(items, cfg.threads)
    auto.measure_drift(items, models, examples)
    choice = auto.rank(items, models, examples.test, cfg, max_drift, log=lambda m: log(f"{name}: {m.strip()}"))
    models.clear()
    shipped = work / "pick" / "model.onnx"  # what export ships: the pick, with its spin-waiting measured
    shipped.parent.mkdir()
    shutil.copyfile(choice.pick.path, shipped)
    tuned = target.tune(choice.pick, shipped, examples.test, cfg, auto.wall_clock,
                        log=lambda m: log(f"{name}: {m.strip()}"))
    for item in items:  # which would pass the issue's bound (drift of random weights: informative only)
        item.within_issue_bound = item.candidate.reference or (
            item.status == "ok" and abs(item.drift.get("delta_srcc", np.nan)) <= BOUND)
    rows = [Row(name, item.name, "ours", item.path, item.candidate.precision, item.bytes, item.drift,
                {str(b): v for b, v in item.latency.items()}, item.status, item.reason) for item in items]
    return rows, {"pick": choice.pick.name, "why": choice.why, "declined": choice.declined,
                  "table": auto.table(items, choice.pick),
                  "within_0.01": [i.name for i in items if i.within_issue_bound],
                  "recipes": {i.name: i.candidate.recipe for i in items}, "tuned": tuned}


def sessions(rows: list[Row], threads: int) -> dict[int, object]:
    from kdiqa_edge.errors import first_line
    from kdiqa_edge.export import evaluate

    found = {}
    for index, row in enumerate(rows):
        if row.status != "ok" or row.kind == "torch":
            continue
        try:
            # spin-waiting on (ORT's default) but stopped when each run returns, for every session (ours and
            # plain alike): with ~50 sessions in one process, the idle ones' workers would otherwise spin into
            # the next one's turn and take the cores (auto measures the same way)
            found[index] = evaluate.session(row.path, threads, stop_spinning=True)
        except Exception as exc:  # noqa: BLE001 - a row that cannot load is reported, the others still run
            row.status, row.reason = "failed", first_line(exc, limit=500, typed=True)
    return found


def make_calls(rows: list[Row], inputs: dict[str, np.ndarray], torch_models: dict[str, object],
               threads: int) -> dict[int, object]:
    """One batch-1 call per row that loads (index -> callable)."""
    import torch

    live = sessions(rows, threads)
    calls = {}
    for index, row in enumerate(rows):
        x = inputs[row.model]
        if row.kind == "torch":
            tensor = torch.from_numpy(x)
            calls[index] = lambda m=torch_models[row.model], t=tensor: m(t)
        elif index in live:
            feed = {live[index].get_inputs()[0].name: x}
            calls[index] = lambda s=live[index], f=feed: s.run(None, f)
    return calls


def time_side_by_side(rows: list[Row], calls: dict[int, object], rounds: int, runs: int) -> list[float]:
    """Every row, `runs` batch-1 runs per round, the order reversed every other round; the load per round."""
    import torch

    with torch.inference_mode():
        times, loads = alternated(calls, rounds, runs, after_round=lambda i: log(f"round {i + 1}/{rounds} done"))
    for index, seconds in times.items():
        rows[index].times.extend(seconds)
    return loads


def paired_ratio(call_a, call_b, rounds: int = 30, runs: int = 3) -> float:
    """median(a) / median(b), the two alternated every `runs` runs: a load that drifts over the minutes the
    round-robin takes hits both alike here, so the ratio of two close candidates is resolved."""
    times, _ = alternated({"a": call_a, "b": call_b}, rounds, runs, warmup=0)
    return float(np.median(times["a"]) / np.median(times["b"]))


def confirm(rows: list[Row], calls: dict[int, object], picks: dict[str, dict]) -> dict[str, dict]:
    """The issue's figures, each re-timed as a pair: auto's pick against the fastest candidate (by the
    round-robin) and against the faster of the two plain exports, and our FP32 against the fastest INT8."""
    index = {(r.model, r.name): i for i, r in enumerate(rows)}
    found = {}
    for model, pick in picks.items():
        mine = [i for i, r in enumerate(rows) if r.model == model and r.status == "ok" and i in calls]
        ours = [i for i in mine if rows[i].kind == "ours"]
        plain = [i for i in mine if rows[i].kind == "plain"]
        shipped = index[(model, pick["pick"])]
        fastest = min(ours, key=lambda i: rows[i].p50)
        faster_plain = min(plain, key=lambda i: rows[i].p50) if plain else None
        int8 = [i for i in ours if rows[i].precision == "int8"]
        best = min(int8, key=lambda i: rows[i].p50) if int8 else None
        fp32 = index[(model, "fp32")]
        found[model] = {
            "best_int8": rows[best].name if best is not None else None,
            "best_int8_speedup": paired_ratio(calls[fp32], calls[best]) if best is not None else None,
            "fastest": rows[fastest].name,
            "pick_vs_fastest": 1.0 if fastest == shipped else paired_ratio(calls[shipped], calls[fastest]),
            "faster_plain": rows[faster_plain].name if faster_plain is not None else None,
            "pick_vs_faster_plain": paired_ratio(calls[shipped], calls[faster_plain])
            if faster_plain is not None else None}
        log(f"{model}: paired pick/fastest {found[model]['pick_vs_fastest']:.3f}, pick/faster plain "
            f"{found[model]['pick_vs_faster_plain'] or float('nan'):.3f}, FP32/best INT8 "
            f"{found[model]['best_int8_speedup'] or float('nan'):.2f}x")
    return found


def profile(rows: list[Row], inputs: dict[str, np.ndarray], threads: int) -> None:
    """Kernels of FP32 and INT8: every INT8 of a model where none reaches SPEEDUP, else FP32 and the fastest."""
    from kdiqa_edge.export.evaluate import kernel_profile

    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model and r.kind != "torch" and r.status == "ok"]
        fp32 = next(r for r in mine if r.name == "fp32")
        int8 = [r for r in mine if r.precision == "int8" and r.kind == "ours"]
        best = min(int8, key=lambda r: r.p50, default=None)
        chosen = [fp32, *(int8 if best is None or fp32.p50 / best.p50 < SPEEDUP else [best]),
                  *[r for r in mine if r.kind == "plain" and r.precision == "int8"]]
        for row in chosen:
            row.profile = kernel_profile(row.path, inputs[model], threads=threads, runs=5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=6, help="timed batch-1 runs per artifact per round")
    parser.add_argument("--min-speedup", type=float, default=SPEEDUP,
                        help="auto's --min-speedup: an INT8 pick must be this many times as fast as FP32")
    parser.add_argument("--max-drift", type=float, default=1.0,
                        help="auto's bound on |ΔSRCC| (default 1.0: off, random-init drift means nothing)")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from bench_suite import build_teacher

    from kdiqa_edge.bench.environment import cpu_info, machine_slug
    from kdiqa_edge.data.spec import DatasetSpec
    from kdiqa_edge.data.synthetic import generate
    from kdiqa_edge.errors import first_line
    from kdiqa_edge.export import ExportConfig
    from kdiqa_edge.export.base import model_input
    from kdiqa_edge.export.pipeline import load_examples
    from kdiqa_edge.export.recipes import Isa
    from kdiqa_edge.io import write_json, write_text

    start, loads_before = time.time(), os.getloadavg()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="kdiqa-bench-int8-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "synthetic" / "scores.csv").is_file():
        generate(work / "synthetic", refs=4)
    data = DatasetSpec(name="synthetic", root=work / "synthetic")
    # auto's own timing: its defaults (30 runs at batch 1, 7 rounds)
    cfg = ExportConfig(precision="auto", calib=args.calib, eval_images=args.eval_images, threads=args.threads,
                       max_drift=args.max_drift, min_speedup=args.min_speedup)
    teacher = build_teacher(False)
    rows, picks, inputs, torch_models = [], {}, {}, {}
    for name in args.models:
        log(f"{name}: building candidates")
        model = build_model(name, teacher)
        examples = load_examples(data, model.preprocess, cfg, progress=False, log=log)
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)  # a fresh build per run (the synthetic set is kept)
        folder.mkdir()
        mine, picks[name] = ours(name, model, examples, cfg, folder, args.max_drift)
        rows += mine
        calib = model_input(examples.calib, {"dtype": "float32", "layout": "NCHW"}, model.preprocess)
        inputs[name] = np.ascontiguousarray(calib[:1])
        try:
            plain = plain_exports(name, model, calib, folder)
            rows += [Row(name, f"plain {p}", "plain", path, p, path.stat().st_size)
                     for p, path in zip(("fp32", "int8"), plain)]
        except Exception as exc:  # noqa: BLE001 - a plain export that fails is a row, not the end of the bench
            rows.append(Row(name, "plain", "plain", None, "?", status="failed",
                            reason=first_line(exc, limit=500, typed=True)))
        if name == TEACHER:
            torch_models[name] = model.visual.eval()
            rows.append(Row(name, "torch eager fp32 (tower)", "torch", None, "fp32"))
        log(f"{name}: auto picks {picks[name]['pick']}")
    log("timing every artifact side by side")
    calls = make_calls(rows, inputs, torch_models, args.threads)
    loads = time_side_by_side(rows, calls, args.rounds, args.runs)
    log("re-timing the issue's pairs")
    paired = confirm(rows, calls, picks)
    log("profiling kernels")
    profile(rows, inputs, args.threads)

    eager = next((r for r in rows if r.kind == "torch" and r.times), None)
    isa = Isa.here()
    # Isa.describe() names the VNNI level only; ONNX Runtime's MLAS runs U8S8 GEMMs on AMX tiles where the CPU
    # has them, so an AMX Xeon says so in the title and the file name (not "avx-512-vnni", as a VNNI EPYC's)
    isa_name = isa.describe() + (" AMX" if "amx_int8" in isa.flags else "")
    lines = [f"# INT8 on ONNX Runtime: recipes, auto's pick, plain export — {cpu_info()['model']} "
             f"({isa_name})",
             "", ("Random-init weights (no pretrained weights on this offline machine): latency, size and which kernels "
             "ran are real; drift figures are of untrained weights (their scores are nearly constant, so INT8 "
             "rounding reorders near-ties) and say nothing about a trained model. These INT8 conclusions hold for "
             f"this CPU's instruction set ({isa_name}) only."), "",
             *environment_lines(args, loads_before, loads),
             (f"- Auto ranked with --max-drift {args.max_drift:g} (the 'within 0.01' column shows the issue's bound); "
             f"calibration {args.calib} train images, drift on up to {args.eval_images} test images (synthetic set)"),
             f"- Command: `python benchmarks/bench_int8.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             ("- Plain export: `torch.onnx.export` of the bare backbone (timm model / open_clip visual tower, no "
             "projection or head, no onnxslim), then `quant_pre_process` + `quantize_static(QDQ, per_channel=True, "
             "U8 activations, S8 weights, default op types, MinMax)` on the same calibration images"), ""]
    table, checks = summary(rows, picks, eager)
    for model, pair in paired.items():
        checks[model].update({f"paired_{k}": v for k, v in pair.items()})
    lines += table + done_when(checks, isa_name)
    for name, pick in picks.items():
        lines += model_section(name, rows, pick, eager if name == TEACHER else None)
    lines += [f"Wall time {(time.time() - start) / 60:.1f} min.", ""]
    out = args.out or ROOT / "benchmarks" / "results" / \
        f"int8-{machine_slug()}-{isa_name.lower().replace(' ', '-')}.md"
    write_text(out, "\n".join(lines))
    write_json(out.with_suffix(".json"), {
        "environment": {"cpu": cpu_info(), "threads": args.threads, "loads": loads, "load_before": loads_before},
        "checks": checks, "picks": picks,
        "rows": [{"model": r.model, "name": r.name, "kind": r.kind, "precision": r.precision, "p50_ms": r.p50,
                  "path": str(r.path) if r.path else None,
                  "bytes": r.bytes, "drift": r.drift, "auto_latency": r.auto_latency, "status": r.status,
                  "reason": r.reason, "profile": r.profile} for r in rows]})
    log(f"wrote {out}")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
