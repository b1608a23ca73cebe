"""What draft JPEG decoding costs in accuracy, on a student that learned (issue 27, part 2).

    python benchmarks/bench_draft_drift.py [--size 64|224] [--work /tmp/bench-draft] [--large 200] \\
        [--out benchmarks/results/draft-drift-<machine>[-224px].md]

`bench_score.py` measures the speed of draft vs exact decoding on a random-init resnet18, whose scores follow no
quality (its ΔSRCC against the pseudo-MOS is noise). Here the model learned: the tests' recipe (conftest's
`learned_run`: the synthetic set at the tiny teacher's 64 px, test_resnet, 20 epochs of the `hard` variant).
Its test images (never trained on) are upscaled to 4000x3000 (bicubic, JPEG quality 90: 12 MP, what a phone
writes) so each keeps its distortion and pseudo-MOS. Each is scored with `--decode exact` and `--decode draft`
(libjpeg DCT scaling to 1/8 before the exact resize: `preprocess.draft_scale`), through the runtime the user
runs (`QualityModel.score_files`) on the model's ONNX FP32 export. Reported: |Δscore|, the SRCC of each decode
against the pseudo-MOS and its change (the export drift bound is |ΔSRCC| <= 0.01), and the SRCC between the two.

With `--size 64` the model's input is 64 px, so draft's 1/8 decode (500x375) is still 7.8x oversampled for it.
`--size 224` is the paper students' input, which sees the same 500x375 decode only 2.2x oversampled: the
synthetic set is made at 320x240 and the teacher is the tiny CLIP config at 224 px (patch 32; random init: the
`hard` variant learns from the pseudo-MOS, the teacher gives only its frozen head), saved as a teacher
checkpoint for `distill --teacher-checkpoint`.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLI = [sys.executable, "-m", "kdiqa_edge"]


def learned_model(work: Path, size: int = 64) -> tuple[Path, Path]:
    """The tests' learned student (conftest.learned_run's recipe) at `size` px, exported to ONNX FP32;
    (onnx, run dir)."""
    run = work / "run"
    if not (run / "summary.json").is_file():
        subprocess.run([*CLI, "data", "synth", str(work / "set"), "--refs", "24", "--size",
                        "86x64" if size == 64 else "320x240"], check=True)
        teacher = ["--teacher", "tiny", "--teacher-epochs", "1"] if size == 64 else \
            ["--teacher-checkpoint", str(teacher_checkpoint(work / "teacher", size))]
        subprocess.run([*CLI, "distill", "--dataset", "synthetic", "--root", str(work / "set"), *teacher,
                        "--student", "test_resnet", "--no-pretrained", "--variant", "hard", "--augment", "hflip",
                        "--epochs", "20", "--batch-size", "32", "--lr", "3e-3", "--quiet", "--out", str(run)],
                       check=True)
    exports = work / "exports"
    if not (exports / "onnx-fp32" / "model.fp32.onnx").is_file():
        subprocess.run([*CLI, "export", str(run), "--target", "onnx", "--precision", "fp32", "--out", str(exports)],
                       check=True, stdout=subprocess.DEVNULL)
    return exports / "onnx-fp32" / "model.fp32.onnx", run


def teacher_checkpoint(folder: Path, size: int) -> Path:
    """The tiny CLIP teacher config at `size` px (patch 32), random init, saved as a teacher checkpoint."""
    import copy

    import open_clip
    import torch

    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.teacher import TEACHER_CONFIGS, ClipBuild, teacher_from_clip

    if not (folder / "model.json").is_file():
        cfg = copy.deepcopy(TEACHER_CONFIGS.get("tiny"))
        cfg["vision_cfg"].update(image_size=size, patch_size=32)
        torch.manual_seed(0)
        clip = open_clip.CLIP(**cfg).eval()
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
        teacher = teacher_from_clip(clip, tokenizer, ClipBuild("tiny", cfg, False, f"tiny at {size} px"))
        save_checkpoint(teacher.eval(), folder)
    return folder


def large_photos(work: Path, run: Path, count: int) -> dict[Path, float]:
    """The run's test images, upscaled to 4000x3000 JPEGs (quality 90); {file: pseudo-MOS}."""
    from PIL import Image

    from kdiqa_edge.data import DatasetSpec, load_dataset
    from kdiqa_edge.data.split import Split

    dataset = load_dataset(DatasetSpec(name="synthetic", root=work / "set"))
    split = Split.load(run / "split.json")
    folder = work / "large"
    folder.mkdir(parents=True, exist_ok=True)
    found = {}
    for index in list(split.test)[:count]:
        record = dataset.records[index]
        path = folder / (Path(record.image).stem + ".jpg")
        if not path.exists():
            with Image.open(Path(dataset.root) / record.image) as image:
                image.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(path, quality=90)
        found[path] = record.mos
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, choices=(64, 224), default=64, help="the student's input size")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-draft"))
    parser.add_argument("--large", type=int, default=200, help="12 MP JPEGs (test images of the learned run)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from scipy.stats import spearmanr

    from kdiqa_edge.bench.environment import environment, machine_slug
    from kdiqa_edge.preprocess import draft_scale
    from kdiqa_edge.runtime import QualityModel

    env = environment(2)
    suffix = "" if args.size == 64 else f"-{args.size}px"
    out = args.out or Path(__file__).parent / "results" / f"draft-drift-{machine_slug()}{suffix}.md"
    try:
        onnx, run = learned_model(args.work, args.size)
        photos = large_photos(args.work, run, args.large)
        model = QualityModel.load(onnx)
        files = sorted(photos)
        scores = {d: np.array([r.score for r in model.score_files(files, 16, decode=d)]) for d in ("exact", "draft")}
        mos = np.array([photos[f] for f in files])
        trained = json.loads((run / "summary.json").read_text())["test"]["srcc"]
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    delta = np.abs(scores["draft"] - scores["exact"])
    srcc = {d: float(spearmanr(s, mos).statistic) for d, s in scores.items()}
    change = srcc["draft"] - srcc["exact"]
    within = abs(change) <= 0.01
    rows = [("images", f"{len(files)} (4000x3000 JPEG q90, draft scale 1/{draft_scale(4000, 3000, args.size)})"),
            ("model", f"test_resnet at {args.size} px, learned (its run's test SRCC {trained:.3f}), ONNX FP32, not pretrained"),
            ("score std (exact)", f"{scores['exact'].std():.4f}"),
            ("mean abs Δscore", f"{delta.mean():.5f}"), ("max abs Δscore", f"{delta.max():.5f}"),
            ("SRCC vs pseudo-MOS, exact", f"{srcc['exact']:.4f}"), ("SRCC vs pseudo-MOS, draft", f"{srcc['draft']:.4f}"),
            ("ΔSRCC (draft - exact)", f"{change:+.4f} ({'within' if within else 'over'} the 0.01 bound)"),
            ("SRCC draft vs exact scores", f"{float(spearmanr(scores['draft'], scores['exact']).statistic):.4f}")]
    text = "\n".join([
        "# Draft vs exact JPEG decoding on a student that learned", "",
        "`benchmarks/bench_draft_drift.py` (see its docstring for the protocol and its limits).", "",
        f"- CPU: {env['cpu']}, {env['cpu_count']} logical cores, ISA {' '.join(env['cpu_isa'])}; load average "
        f"{env.get('load_average')}; versions: "
        f"{', '.join(f'{k} {v}' for k, v in sorted((env.get('versions') or {}).items()))}", "",
        "| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""])
    out.write_text(text)
    print(text)
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mos", "exact", "draft"])
        writer.writerows([f.name, f"{m:.4f}", f"{e:.5f}", f"{d:.5f}"]
                         for f, m, e, d in zip(files, mos, scores["exact"], scores["draft"]))


if __name__ == "__main__":
    main()
