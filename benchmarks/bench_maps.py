"""Do the quality maps point at the damage? AUC of map values, distorted against clean positions.

    python benchmarks/bench_maps.py [--run RUN] [--work DIR] [--refs 16] [--threads 2]
                                    [--out benchmarks/results/maps.md] [--picture docs/images/quality-map.png]

The model is the tests' student that learned (tests/conftest.py `learned_run`: the synthetic set at the tiny
teacher's 64 px, 86x64 images, 24 references; test_resnet, random init, 20 epochs of the `hard` variant),
trained here unless `--run` names one, and exported with `export --target onnx --with-map`. The maps come from
the torch-free runtime (kdiqa_edge/runtime/maps.py): `fast` (the artifact's score_map, 2x2 at 64 px) and
`patches` (a 4x4 grid of crops half the region wide).

`--picture PATH` also writes the README's picture: scikit-image's astronaut (512x512) with its right half
blurred (Gaussian, radius 24: 3 px at the 64 px the model sees), through `kdiqa-edge score MODEL PHOTO --map
DIR`, the overlay exactly as users get it; the map's values are printed.

Images: `--refs` fresh views of the synthetic set's photos (synthetic._references with another seed, the whole
frames skipped: crops the model never saw as such), 86x64. In each, one region carries a distortion of the
synthetic set (at its levels 3 and 5) and the rest is the clean reference: a half (left, right, top, bottom),
a quadrant (each of four) or a disc (radius 0.3 of the region's side, centred in each quadrant). Regions are
laid out on the square the model sees (its centre crop).

A map cell is distorted when at least 75 % of it lies in the distorted region, clean when at most 25 % does,
and left out otherwise. AUC = P(a clean cell's value > a distorted cell's value) (ties count half; 0.5 is
chance, 1 perfect): pooled over every cell of every image of a (distortion, level, region) group, and within
each image (mean over images, which takes the photo's content out). `Δ fast` is the AUC of the fast map minus
the clean reference's own fast map (a diagnostic with the reference at hand, not something a user has).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 101  # the references' views: not the seed the training set was generated with (0)
LEVELS = (3, 5)
REGIONS = ("half", "quadrant", "disc")
DISTORTED, CLEAN = 0.75, 0.25  # a cell's share of the distorted region that labels it
FINDINGS = "## Findings"  # the results file's hand-written part from this heading on, kept by a re-run


def train(work: Path) -> Path:
    """The tests' learned student (tests/conftest.py learned_run), in its own processes."""
    cli = [sys.executable, "-m", "kdiqa_edge"]
    subprocess.run([*cli, "data", "synth", str(work / "set"), "--refs", "24", "--size", "86x64"], check=True)
    subprocess.run([*cli, "distill", "--dataset", "synthetic", "--root", str(work / "set"), "--teacher", "tiny",
                    "--teacher-epochs", "1", "--student", "test_resnet", "--no-pretrained", "--variant", "hard",
                    "--augment", "hflip", "--epochs", "20", "--batch-size", "32", "--lr", "3e-3", "--quiet",
                    "--out", str(work / "run")],
                   check=True)
    return work / "run"


def export(run: Path, work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "kdiqa_edge", "export", str(run), "--target", "onnx", "--with-map",
                    "--out", str(work / "exports")], check=True)
    return work / "exports" / "onnx-fp32" / "model.fp32.onnx"


def picture(artifact: Path, work: Path, path: Path) -> None:
    """The README's overlay: the astronaut, right half blurred, through `score --map` (the CLI users run)."""
    import shutil

    from PIL import Image, ImageFilter
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    half = photo.width // 2
    photo.paste(photo.crop((half, 0, photo.width, photo.height)).filter(ImageFilter.GaussianBlur(24)), (half, 0))
    folder, maps = work / "picture", work / "picture-maps"
    shutil.rmtree(maps, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    photo.save(folder / "astronaut-right-half-blurred.png")
    subprocess.run([sys.executable, "-m", "kdiqa_edge", "score", str(artifact), str(folder), "--map", str(maps)],
                   check=True)
    stem = "astronaut-right-half-blurred"
    print(f"{path}: fast map (rows top to bottom)\n{np.load(maps / f'{stem}.map.npy').round(2)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(maps / f"{stem}.map.png", path)


def references(count: int, size: tuple[int, int]) -> list[np.ndarray]:
    from kdiqa_edge.data import synthetic

    views = synthetic._references(len(synthetic.PHOTOS) + count, np.random.default_rng(SEED), size)
    return views[len(synthetic.PHOTOS):]  # the first ones are the photos' whole frames, as in the training set


def region_masks(shape: tuple[int, int], box: tuple[float, float, float, float]) -> dict[str, list[np.ndarray]]:
    """Boolean masks [H, W] of the distorted region, per region kind, laid out on the model's square `box`."""
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    left, top, right, bottom = box
    u, v = (xs - left) / (right - left), (ys - top) / (bottom - top)  # 0..1 across the square
    halves = [u < 0.5, u >= 0.5, v < 0.5, v >= 0.5]
    quadrants = [((u < 0.5) == a) & ((v < 0.5) == b) for a in (True, False) for b in (True, False)]
    discs = [(u - cu) ** 2 + (v - cv) ** 2 < 0.3 ** 2 for cu in (0.25, 0.75) for cv in (0.25, 0.75)]
    return {"half": halves, "quadrant": quadrants, "disc": discs}


def cell_labels(mask: np.ndarray, box: tuple[float, float, float, float], grid: int) -> np.ndarray:
    """[grid, grid]: 1 distorted, 0 clean, -1 mixed (left out), from the mask's share of each cell of the square."""
    left, top, right, bottom = box
    labels = np.full((grid, grid), -1, np.int8)
    for i in range(grid):
        for j in range(grid):
            y0, y1 = top + i * (bottom - top) / grid, top + (i + 1) * (bottom - top) / grid
            x0, x1 = left + j * (right - left) / grid, left + (j + 1) * (right - left) / grid
            share = mask[round(y0):round(y1), round(x0):round(x1)].mean()
            labels[i, j] = 1 if share >= DISTORTED else 0 if share <= CLEAN else -1
    return labels


def auc(clean: np.ndarray, distorted: np.ndarray) -> float:
    """P(clean > distorted), ties half: the Mann-Whitney U of scipy over the two samples."""
    from scipy.stats import mannwhitneyu

    if len(clean) == 0 or len(distorted) == 0:
        return float("nan")
    return float(mannwhitneyu(clean, distorted, alternative="two-sided").statistic / (len(clean) * len(distorted)))


def measure(model, refs: list[np.ndarray]) -> list[dict]:
    """One record per (reference, distortion, level, region kind, placement): the maps, labels and scores."""
    from kdiqa_edge.data import synthetic
    from kdiqa_edge.preprocess import crop_box
    from kdiqa_edge.runtime import maps

    height, width = refs[0].shape[:2]
    box, _ = crop_box(width, height, model.preprocess.size)
    masks = region_masks((height, width), box)
    records = []
    for index, ref in enumerate(refs):
        clean = {"fast": maps.quality_map(model, ref, "fast"), "patches": maps.quality_map(model, ref, "patches")}
        for distortion, params in synthetic.DISTORTIONS.items():
            for level in LEVELS:
                whole = synthetic.distort(ref, distortion, params[level - 1], (SEED, index, level))
                for region, placements in masks.items():
                    for placement, mask in enumerate(placements):
                        image = np.where(mask[..., None], whole, ref)
                        found = {kind: maps.quality_map(model, image, kind) for kind in maps.MAP_KINDS}
                        records.append({
                            "distortion": distortion, "level": level, "region": region, "placement": placement,
                            "score": found["fast"].score, "clean_score": clean["fast"].score,
                            **{kind: found[kind].values for kind in maps.MAP_KINDS},
                            "fast_delta": found["fast"].values - clean["fast"].values,
                            **{f"{kind}_labels": cell_labels(mask, box, found[kind].values.shape[0])
                               for kind in maps.MAP_KINDS}})
    return records


def group_aucs(group: list[dict], values: str, labels: str) -> tuple[float, float]:
    """(pooled AUC, mean within-image AUC) of one group of records."""
    clean = np.concatenate([r[values][r[labels] == 0] for r in group])
    distorted = np.concatenate([r[values][r[labels] == 1] for r in group])
    within = [auc(r[values][r[labels] == 0], r[values][r[labels] == 1]) for r in group]
    within = [a for a in within if not np.isnan(a)]
    return auc(clean, distorted), float(np.mean(within)) if within else float("nan")


def table(records: list[dict]) -> list[dict]:
    from kdiqa_edge.data import synthetic

    rows = []
    for distortion in synthetic.DISTORTIONS:
        for level in LEVELS:
            for region in REGIONS:
                group = [r for r in records if (r["distortion"], r["level"], r["region"]) == (distortion, level, region)]
                fast, fast_within = group_aucs(group, "fast", "fast_labels")
                patches, patches_within = group_aucs(group, "patches", "patches_labels")
                delta, _ = group_aucs(group, "fast_delta", "fast_labels")
                drop = float(np.mean([r["clean_score"] - r["score"] for r in group]))
                rows.append({"distortion": distortion, "level": level, "param": synthetic.DISTORTIONS[distortion][level - 1],
                             "region": region, "images": len(group), "fast": fast, "fast_within": fast_within,
                             "patches": patches, "patches_within": patches_within, "fast_delta": delta,
                             "score_drop": drop})
    return rows


def latency(model, image: np.ndarray, rounds: int = 40) -> dict[str, float]:
    """ms per image for each map kind (decode-free: from an array), alternate rounds, fastest and median."""
    from kdiqa_edge.runtime import maps

    times: dict[str, list[float]] = {kind: [] for kind in maps.MAP_KINDS}
    for kind in maps.MAP_KINDS:
        maps.quality_map(model, image, kind)  # warm-up
    for turn in range(rounds):
        for kind in (maps.MAP_KINDS if turn % 2 == 0 else maps.MAP_KINDS[::-1]):
            start = time.perf_counter()
            maps.quality_map(model, image, kind)
            times[kind].append((time.perf_counter() - start) * 1e3)
    return {kind: {"min": min(t), "median": statistics.median(t)} for kind, t in times.items()}


def report(rows: list[dict], speed: dict, env: dict, run: Path, refs: int, srcc: str) -> str:
    def f(x: float) -> str:
        return "n/a" if np.isnan(x) else f"{x:.2f}"

    lines = ["# Do the quality maps point at the damage? (issue 29)", "",
             f"Model: the tests' student that learned ({run.name}: test_resnet, random init, 20 epochs of `hard` "
             f"distillation from the tiny random-init teacher on the synthetic set at 64 px; {srcc}), exported "
             "with `kdiqa-edge export --target onnx --with-map`; maps through the torch-free runtime "
             "(`kdiqa_edge/runtime/maps.py`). `fast`: 2x2 cells (test_resnet's final feature map at 64 px); "
             f"`patches`: 4x4 cells, crops half the region wide. {refs} unseen views (86x64) of the synthetic "
             "set's photos, each with one distorted region and the rest clean: 4 halves, 4 quadrants, 4 discs "
             "per distortion and level.", "",
             "AUC = P(clean cell's map value > distorted cell's value); 0.5 is chance. `pooled`: every cell of "
             "every image of the row; `within`: per image, averaged (the photo's content taken out). `Δ fast`: "
             "the fast map minus the clean reference's fast map (a diagnostic that needs the reference). "
             "`score drop`: clean reference's global score minus the locally distorted image's.", "",
             "| distortion | level (param) | region | images | fast pooled | fast within | patches pooled | "
             "patches within | Δ fast pooled | score drop |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['distortion']} | {r['level']} ({r['param']}) | {r['region']} | {r['images']} | "
                     f"{f(r['fast'])} | {f(r['fast_within'])} | {f(r['patches'])} | {f(r['patches_within'])} | "
                     f"{f(r['fast_delta'])} | {r['score_drop']:+.3f} |")
    strong = [r for r in rows if r["distortion"] in ("blur", "noise") and r["level"] == LEVELS[-1]]
    lines += ["", "Strong local blur and noise (level 5), fast map, pooled AUC: "
              + ", ".join(f"{r['distortion']} {r['region']} {f(r['fast'])}" for r in strong)
              + f" (the issue's bar: >= 0.8; {sum(r['fast'] >= 0.8 for r in strong)} of {len(strong)} reach it).", ""]
    lines += ["Time per image (from an array, preprocessing included; fastest / median of "
              f"{speed['rounds']} alternate rounds, ONNX Runtime CPU, {env['threads']} threads): "
              + ", ".join(f"{kind} {t['min']:.2f} / {t['median']:.2f} ms" for kind, t in speed["ms"].items()) + ".", "",
              f"Machine (load average {env.get('load_average')} while this ran): {env['cpu']}, {env['cpu_count']} vCPUs, ISA {' '.join(env['cpu_isa'])}; "
              f"python {env['python']}, " + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="the learned run (default: train it in --work)")
    # under /tmp, as the other benchmarks' work folders: a relative default left a trained run in the checkout
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-maps-work"))
    parser.add_argument("--refs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "maps.md")
    parser.add_argument("--picture", type=Path, help="also write the README's overlay picture here")
    args = parser.parse_args()

    from kdiqa_edge.bench.environment import environment
    from kdiqa_edge.io import read_json, write_text
    from kdiqa_edge.runtime import QualityModel

    args.work.mkdir(parents=True, exist_ok=True)
    run = args.run or train(args.work)
    artifact = export(run, args.work)
    if args.picture:
        picture(artifact, args.work, args.picture)
    model = QualityModel.load(artifact, threads=args.threads)
    refs = references(args.refs, (86, 64))
    rows = table(measure(model, refs))
    summary = read_json(run / "summary.json")
    test = (summary.get("test") or summary.get("metrics", {}).get("test") or {})
    srcc = f"test SRCC {test['srcc']:.3f}" if isinstance(test, dict) and "srcc" in test else "test SRCC in its summary.json"
    speed = {"rounds": 40, "ms": latency(model, refs[0])}
    text = report(rows, speed, environment(args.threads), run, args.refs, srcc)
    if args.out.is_file() and FINDINGS in (kept := args.out.read_text()):  # the written reading of the figures
        text += "\n" + kept[kept.index(FINDINGS):]
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
