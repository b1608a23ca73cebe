"""distill --unlabeled: throughput, disk, and whether unlabeled images help when ratings are scarce.

    python benchmarks/bench_unlabeled.py [--images 256] [--feature-teacher ViT-B-32:random] [--student resnet18]
                                         [--rounds 2] [--seeds 3] [--epochs 20] [--hash-images 2000]
                                         [--skip-throughput] [--skip-hashing] [--skip-experiment]
                                         [--markdown benchmarks/results/unlabeled-<machine>.md]

Part 1, throughput (random-init weights: speed does not depend on them; nothing is downloaded):
- teacher feature extraction, images/s: `train.features.unlabeled_features` over a folder of 640x480 JPEGs
  (the synthetic set's photos, enlarged), decoded in 2 worker processes, on a fresh shard folder each round;
- the student's train step, unlabeled images streamed from their JPEGs (decoded in 2 workers) vs read from
  the decoded cache (--image-cache): `run_distill` with --variant soft --rated-fraction 0 (every image
  unlabeled), 2 epochs, the second epoch's train images/s (evaluation and the first epoch's start-up excluded). The two alternate round by round, the
  order reversed every other round; the fastest round of each is compared (the issue's bar: streaming >= 80%
  of cached at 2 workers);
- disk per 1,000 images: the feature shards (fp16 + their meta.json), the decoded cache, the JPEGs.

Part 1b, hashing (what every run does before any work: content hashes key the feature shards and the
test-split exclusion), over web-sized JPEGs (640x480) and camera-sized ones (4000x3000, with noise), written
first and back-dated an hour (a file younger than 2 s is never recorded in the index), so the page cache is
warm: this is the CPU side of hashing, not a cold disk's. Per round, order alternated:
- the library's hashing in threads (`unlabeled._hashed`, 8 threads) vs the same `_identify` in 2 forked
  worker processes (a multiprocessing pool, up to 64 entries a task, at least 4 tasks a worker): what decided threads;
- `build_pool` on a fresh hash index (hash + record) and again on the warm index (stat only: no image read).

Part 2, the label-scarce experiment, on the built-in synthetic set at the tiny teacher's 64 px (86x64 images,
24 references: 720 images, split by reference 80/20), per seed (split seed = init seed):
- rate only 20% of the train split (`--rated-fraction 0.2`'s seeded subset);
- fine-tune the tiny teacher on that 20% (the engine's Trainer with the fine-tune loss on that subset);
- distil test_resnet from it with the full variant, without and with the other 80% of the train split given
  as `--unlabeled` (a path list; their ratings never read), the same epochs, lr and batch;
- report the test split's SRCC/PLCC of each and their medians over the seeds.
The teacher and the students are random-init (not pretrained): this is the mechanism on a toy task, not a
KonIQ figure.

Every figure is printed with the CPU, its ISA flags, threads, versions and the load average; the machine is
shared, so read ratios and fastest rounds, not absolute rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Part 1: throughput and disk


def make_photos(folder: Path, count: int) -> Path:
    """`count` 640x480 JPEGs (quality 90): the synthetic set's photos enlarged, each a distinct crop."""
    import numpy as np
    from PIL import Image

    from kdiqa_edge.data.synthetic import default_root

    sources = sorted((default_root() / "images").glob("*.png"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        img = Image.open(sources[i % len(sources)]).convert("RGB")
        x, y = int(rng.integers(0, 40)), int(rng.integers(0, 30))
        img = img.crop((x, y, x + 280, y + 210)).resize((640, 480), Image.Resampling.BICUBIC)
        img.save(folder / f"photo{i:05d}.jpg", quality=90)
    return folder


def random_teacher(name: str, folder: Path) -> Path:
    import torch

    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.teacher import load_teacher

    torch.manual_seed(0)
    return save_checkpoint(load_teacher(name), folder / name.replace(":", "-"))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def feature_rate(teacher: Path, pool, work: Path, rounds: int, workers: int) -> dict:
    from kdiqa_edge.train.features import unlabeled_features, unlabeled_folder

    rates = []
    for r in range(rounds):
        root = work / f"features-{r}"
        start = time.perf_counter()
        unlabeled_features(teacher, pool, device="cpu", batch_size=32, progress=False, root=root,
                           shard_images=128, workers=workers)
        rates.append(len(pool) / (time.perf_counter() - start))
        log(f"  feature extraction round {r + 1}: {rates[-1]:.1f} images/s")
    disk = folder_bytes(unlabeled_folder(teacher, root))
    return {"images_per_s": rates, "fastest": max(rates), "disk_bytes": disk}


def train_rates(teacher: Path, photos: Path, data, work: Path, student: str, rounds: int, workers: int,
                batch: int) -> dict:
    from kdiqa_edge.train.distill import DistillConfig, run_distill

    rates: dict[str, list[float]] = {"streamed": [], "cached": []}
    for r in range(rounds):
        order = ["streamed", "cached"] if r % 2 == 0 else ["cached", "streamed"]
        for mode in order:
            cfg = DistillConfig(student=student, pretrained=False, teacher_checkpoint=str(teacher), variant="soft",
                                rated_fraction=0.0, unlabeled=[str(photos)], epochs=2, batch_size=batch,
                                augment="none", image_cache=mode == "cached", workers=workers, progress=False,
                                device="cpu")
            summary = run_distill(cfg, data, work / f"train-{mode}-{r}", log=lambda *_: None)
            rates[mode].append(float(summary["images_per_s"]))
            log(f"  train step round {r + 1} {mode}: {rates[mode][-1]:.1f} images/s")
    best = {mode: max(values) for mode, values in rates.items()}
    return {"images_per_s": rates, "fastest": best, "streamed_over_cached": best["streamed"] / best["cached"]}


def throughput(args, work: Path, env: dict) -> dict:
    from kdiqa_edge.data import DatasetSpec
    from kdiqa_edge.data.synthetic import default_root
    from kdiqa_edge.data.unlabeled import build_pool, decoded_images, pool_key
    from kdiqa_edge.models.checkpoint import read_meta
    from kdiqa_edge.preprocess import PreprocessSpec

    photos = make_photos(work / "photos", args.images)
    pool = build_pool([photos], progress=False)
    teacher = random_teacher(args.feature_teacher, work / "teachers")
    preprocess = PreprocessSpec.from_dict(read_meta(teacher)["preprocess"])
    log(f"feature extraction: {args.feature_teacher} (random init), {len(pool)} JPEGs 640x480 -> "
        f"{preprocess.size} px, {args.workers} decode workers")
    features = feature_rate(teacher, pool, work, args.rounds, args.workers)
    log(f"train step: {args.student} (random init) at {preprocess.size} px, batch {args.batch_size}, every image "
        f"unlabeled, streamed ({args.workers} workers) vs decoded cache")
    train = train_rates(teacher, photos, DatasetSpec(name="synthetic", root=default_root()), work, args.student,
                        args.rounds, args.workers, args.batch_size)
    decoded_root = work / "decoded"
    decoded_images(pool, preprocess, workers=args.workers, progress=False, root=decoded_root)
    per_thousand = 1000 / len(pool)
    disk = {"feature_shards": features["disk_bytes"] * per_thousand,
            "decoded_cache": folder_bytes(decoded_root / pool_key(pool, preprocess)) * per_thousand,
            "jpegs": folder_bytes(photos) * per_thousand}
    return {"teacher": args.feature_teacher, "student": args.student, "images": len(pool), "size": preprocess.size,
            "workers": args.workers, "batch_size": args.batch_size, "features": features, "train": train,
            "disk_per_1000_images": disk}


# ----------------------------------------------------------------------------------------------------------
# Part 1b: hashing, threads vs processes, and the hash index's second run


def hash_photos(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """`count` distinct JPEGs of `size` (one synthetic photo enlarged, with noise, a distinct trailer after
    its end marker each), back-dated an hour so that the hash index records them."""
    import numpy as np
    from PIL import Image

    from kdiqa_edge.data.synthetic import default_root

    source = min((default_root() / "images").glob("*.png"))
    pixels = np.asarray(Image.open(source).convert("RGB").resize(size, Image.Resampling.BICUBIC), np.float32)
    pixels += np.random.default_rng(0).normal(0, 6, pixels.shape)  # sensor noise: a camera JPEG's size
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    base = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    hour_ago = time.time() - 3600
    for i in range(count):
        path = folder / f"img{i:05d}.jpg"
        path.write_bytes(base + i.to_bytes(4, "little"))
        os.utime(path, (hour_ago, hour_ago))
    return folder


def _threads(entries: list, workers: int) -> list:
    from kdiqa_edge.data.unlabeled import _hashed

    return list(_hashed(entries))


def _processes(entries: list, workers: int) -> list:
    import multiprocessing

    from kdiqa_edge.data.unlabeled import _identify

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_identify, entries, chunksize=max(1, min(64, len(entries) // (4 * workers))))


def hashing(args, work: Path) -> dict:
    from kdiqa_edge.data.hashindex import HashIndex
    from kdiqa_edge.data.unlabeled import Entry, build_pool

    sets = {"web 640x480": (args.hash_images, (640, 480)), "camera 4000x3000": (max(args.hash_images // 20, 20),
                                                                               (4000, 3000))}
    out = {}
    for name, (count, size) in sets.items():
        folder = hash_photos(work / f"hash-{size[0]}", count, size)
        entries = [Entry(str(p), str(p)) for p in sorted(folder.iterdir())]
        mb = sum(os.path.getsize(e.path) for e in entries) / len(entries) / 1e6
        ways = {"threads (8)": _threads, "2 processes": _processes}
        rates: dict[str, list[float]] = {way: [] for way in [*ways, "index: first run", "index: second run"]}
        for r in range(args.rounds):
            for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                start = time.perf_counter()
                ways[way](entries, 2)
                rates[way].append(count / (time.perf_counter() - start))
            index_root = work / f"index-{size[0]}-{r}"
            for way in ("index: first run", "index: second run"):
                start = time.perf_counter()
                pool = build_pool([folder], progress=False, index=HashIndex(index_root))
                rates[way].append(count / (time.perf_counter() - start))
            assert len(pool) == count
            log(f"  hashing {name} round {r + 1}: " + ", ".join(f"{w} {v[-1]:.0f}" for w, v in rates.items())
                + " images/s")
        out[name] = {"images": count, "mb_per_image": mb, "images_per_s": rates,
                     "fastest": {w: max(v) for w, v in rates.items()}}
    return out


# ----------------------------------------------------------------------------------------------------------
# Part 2: the label-scarce experiment


def finetune_on_rated(data, seed: int, fraction: float, epochs: int, lr: float, batch: int, out: Path) -> Path:
    """The tiny teacher fine-tuned on the rated share of split `seed`'s train images only."""
    from kdiqa_edge.data import prepare
    from kdiqa_edge.models.teacher import load_teacher
    from kdiqa_edge.train.finetune import finetune_loss, freeze_all_but_image_encoder
    from kdiqa_edge.train.loop import TrainConfig, Trainer
    from kdiqa_edge.train.mixed import rated_subset

    teacher = load_teacher("tiny")
    cache, split = prepare(data, teacher.preprocess, seed=seed, progress=False)
    rated = dataclasses.replace(split, train=rated_subset(split.train, fraction, seed))
    freeze_all_but_image_encoder(teacher)
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, seed=seed, device="cpu", progress=False)
    meta = {"label": teacher.label, "dataset": data.to_dict(), "image_cache": cache.key, "stage": "teacher-finetune"}
    summary = Trainer(teacher, finetune_loss, cache, rated, cfg, out, extra_meta=meta, label="teacher train").fit()
    log(f"  teacher on {len(rated.train)} rated images: test SRCC {summary['test']['srcc']:.3f}")
    return out / "checkpoints" / "best"


def unrated_list(data, seed: int, fraction: float, out: Path) -> Path:
    """The train images whose ratings are hidden, as a path list for --unlabeled."""
    from kdiqa_edge.data import load_dataset, make_split
    from kdiqa_edge.train.mixed import rated_subset

    dataset = load_dataset(data)
    split = make_split(dataset, seed=seed)
    rated = set(rated_subset(split.train, fraction, seed))
    paths = [str(dataset.path(i)) for i in split.train if i not in rated]
    out.write_text("".join(p + "\n" for p in paths))
    return out


def experiment(args, work: Path) -> dict:
    from kdiqa_edge.cli import main as cli_main
    from kdiqa_edge.data import DatasetSpec
    from kdiqa_edge.train.distill import DistillConfig, run_distill

    root = work / "synthetic-64"
    try:
        cli_main(["data", "synth", str(root), "--refs", "24", "--size", "86x64"])
    except SystemExit as exit_info:
        if exit_info.code:
            raise
    data = DatasetSpec(name="synthetic", root=root)
    runs = []
    for seed in range(args.seeds):
        log(f"seed {seed}:")
        teacher = finetune_on_rated(data, seed, args.rated_fraction, args.epochs, args.teacher_lr, args.exp_batch,
                                    work / f"teacher-{seed}")
        teacher_summary = json.loads((teacher.parent.parent / "summary.json").read_text())
        unrated = unrated_list(data, seed, args.rated_fraction, work / f"unrated-{seed}.txt")
        row = {"seed": seed, "teacher_test": teacher_summary["test"]}
        for name, sources in (("rated only", []), ("+ unlabeled", [str(unrated)])):
            cfg = DistillConfig(student="test_resnet", pretrained=False, teacher_checkpoint=str(teacher),
                                rated_fraction=args.rated_fraction, unlabeled=sources, split_seed=seed, seed=seed,
                                epochs=args.epochs, batch_size=args.exp_batch, lr=args.student_lr, progress=False,
                                device="cpu", workers=args.workers, image_cache=True)
            start = time.perf_counter()
            summary = run_distill(cfg, data, work / f"student-{seed}-{'u' if sources else 'r'}", log=lambda *_: None)
            row[name] = {**summary["test"], "steps": summary["steps"], "seconds": time.perf_counter() - start,
                         "unlabeled": (summary.get("unlabeled") or {}).get("used", 0)}
            log(f"  {name}: test SRCC {summary['test']['srcc']:.3f} PLCC {summary['test']['plcc']:.3f} "
                f"({summary['steps']} steps)")
        runs.append(row)
    medians = {name: {metric: statistics.median(r[name][metric] for r in runs) for metric in ("srcc", "plcc")}
               for name in ("rated only", "+ unlabeled")}
    medians["teacher"] = {m: statistics.median(r["teacher_test"][m] for r in runs) for m in ("srcc", "plcc")}
    return {"runs": runs, "medians": medians, "rated_fraction": args.rated_fraction, "epochs": args.epochs,
            "batch_size": args.exp_batch, "student_lr": args.student_lr, "teacher_lr": args.teacher_lr,
            "images": 720, "unlabeled_fraction": 0.5}


# ----------------------------------------------------------------------------------------------------------
# Report


def markdown(env: dict, result: dict, command: str) -> str:
    lines = ["# distill --unlabeled: throughput, disk and the label-scarce experiment", "",
             f"`{command}`", "",
             f"Machine: {env['cpu']} ({', '.join(env.get('cpu_isa', []))}), {env['threads']} torch threads, "
             f"{env.get('cpu_count')} logical cores, load average before {env['load_before']}, after "
             f"{env['load_after']} (where other jobs share the machine, rates are noisy: read the ratio of the "
             "fastest rounds).", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())), ""]
    t = result.get("throughput")
    if t:
        f, tr, d = t["features"], t["train"], t["disk_per_1000_images"]
        lines += ["## Throughput (random-init weights)", "",
                  f"{t['images']} JPEGs 640x480 -> {t['size']} px, {t['workers']} decode worker processes.", "",
                  "| measure | rounds (images/s) | fastest |", "|---|---|---|",
                  f"| teacher features, {t['teacher']} | {', '.join(f'{x:.1f}' for x in f['images_per_s'])} | "
                  f"{f['fastest']:.1f} |",
                  f"| train step {t['student']} batch {t['batch_size']}, streamed | "
                  f"{', '.join(f'{x:.1f}' for x in tr['images_per_s']['streamed'])} | {tr['fastest']['streamed']:.1f} |",
                  f"| train step {t['student']} batch {t['batch_size']}, decoded cache | "
                  f"{', '.join(f'{x:.1f}' for x in tr['images_per_s']['cached'])} | {tr['fastest']['cached']:.1f} |",
                  "", f"Streamed / cached (fastest rounds): **{tr['streamed_over_cached']:.2f}** (bar: >= 0.80).", "",
                  "Disk per 1,000 images:", "",
                  f"- teacher feature shards (fp16 + meta.json): {d['feature_shards'] / 1e6:.2f} MB",
                  f"- decoded cache (--image-cache), {t['size']} px uint8: {d['decoded_cache'] / 1e6:.1f} MB",
                  f"- the JPEGs themselves: {d['jpegs'] / 1e6:.1f} MB", ""]
    h = result.get("hashing")
    if h:
        lines += ["## Hashing (what every run does first; warm page cache)", "",
                  "| images | way | rounds (images/s) | fastest |", "|---|---|---|---|"]
        for name, r in h.items():
            for way, values in r["images_per_s"].items():
                lines.append(f"| {r['images']} x {name} ({r['mb_per_image']:.2f} MB) | {way} | "
                             f"{', '.join(f'{x:.0f}' for x in values)} | {r['fastest'][way]:.0f} |")
        lines.append("")
    e = result.get("experiment")
    if e:
        m = e["medians"]
        lines += ["## Label-scarce experiment (synthetic set, random-init tiny teacher and test_resnet)", "",
                  f"{e['images']} images at 64 px, split by reference 80/20 per seed; {round(e['rated_fraction'] * 100)}% "
                  f"of the train split rated; the teacher fine-tuned on those ({e['epochs']} epochs, lr "
                  f"{e['teacher_lr']}); test_resnet distilled {e['epochs']} epochs (full variant, batch "
                  f"{e['batch_size']}, lr {e['student_lr']}) without and with the other train images as "
                  f"--unlabeled (half of each batch). Test split, per seed:", "",
                  "| seed | teacher SRCC | rated only SRCC / PLCC | + unlabeled SRCC / PLCC | unlabeled used |",
                  "|---|---|---|---|---|"]
        for r in e["runs"]:
            lines.append(f"| {r['seed']} | {r['teacher_test']['srcc']:.3f} | {r['rated only']['srcc']:.3f} / "
                         f"{r['rated only']['plcc']:.3f} | {r['+ unlabeled']['srcc']:.3f} / "
                         f"{r['+ unlabeled']['plcc']:.3f} | {r['+ unlabeled']['unlabeled']} |")
        lines += ["", f"Medians over {len(e['runs'])} seeds: teacher SRCC {m['teacher']['srcc']:.3f}; rated only "
                  f"SRCC {m['rated only']['srcc']:.3f} / PLCC {m['rated only']['plcc']:.3f}; with unlabeled SRCC "
                  f"{m['+ unlabeled']['srcc']:.3f} / PLCC {m['+ unlabeled']['plcc']:.3f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--feature-teacher", default="ViT-B-32:random")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rated-fraction", type=float, default=0.2)
    parser.add_argument("--exp-batch", type=int, default=32)
    parser.add_argument("--student-lr", type=float, default=3e-3)
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-experiment", action="store_true")
    parser.add_argument("--hash-images", type=int, default=2000)
    parser.add_argument("--skip-hashing", action="store_true")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from kdiqa_edge.bench.environment import environment

    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    env.update(cpu=env.get("cpu", env.get("cpu_model", "?")), threads=args.threads,
               load_before=" ".join(f"{x:.1f}" for x in os.getloadavg()))
    log(json.dumps({k: env[k] for k in ("cpu", "threads", "load_before")}))
    work = Path(tempfile.mkdtemp(prefix="bench-unlabeled-"))
    os.environ.setdefault("KDIQA_CACHE", str(work / "cache"))
    result: dict = {}
    try:
        if not args.skip_throughput:
            result["throughput"] = throughput(args, work, env)
        if not args.skip_hashing:
            result["hashing"] = hashing(args, work)
        if not args.skip_experiment:
            result["experiment"] = experiment(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    command = "python benchmarks/bench_unlabeled.py " + " ".join(sys.argv[1:])
    text = markdown(env, result, command)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, **result}, indent=1, default=str))


if __name__ == "__main__":
    main()
