"""Score every image in a folder from Python, with any kdiqa-edge artifact. No torch needed.

    python examples/score_folder.py exports/mvit/onnx-int8/model.int8.onnx photos/ --out scores.csv

Prints the best and worst images; unreadable files are listed with their reason, never fatal (the exit
status is 1 only when no image was scored).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from kdiqa_edge import QualityModel
from kdiqa_edge.runtime import ScoreResult
from kdiqa_edge.runtime.files import ImageFiles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=".onnx, .engine, .mlpackage, or a run dir")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, help="write image,score,error rows here")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    model = QualityModel.load(args.model)
    found = list(ImageFiles([args.folder]))  # image files, and what cannot be read (dangling links...) with why
    results = list(model.score_files([path for path, problem in found if problem is None], batch_size=args.batch_size))
    results += [ScoreResult(str(path), None, problem) for path, problem in found if problem is not None]
    scored = sorted((r for r in results if r.score is not None), key=lambda r: r.score)
    failed = [r for r in results if r.score is None]

    print(f"{model}: {len(scored)} images scored, {len(failed)} unreadable")
    for label, rows in (("worst", scored[:3]), ("best", scored[-3:][::-1])):
        for r in rows:
            print(f"  {label}: {r.score:.3f}  {r.path}")
    for r in failed:
        print(f"  skipped: {r.path}: {r.error}", file=sys.stderr)
    if args.out:
        with open(args.out, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "score", "error"])
            for r in results:
                writer.writerow([r.path, "" if r.score is None else f"{r.score:.6f}", r.error or ""])
    return 0 if scored else 1  # as `kdiqa-edge score`: nothing scored is a failure


if __name__ == "__main__":
    sys.exit(main())
