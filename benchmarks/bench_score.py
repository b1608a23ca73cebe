"""End-to-end `score` speed on 512 px and 12 MP JPEGs, decode draft vs exact, threads vs processes, Pillow vs
simplejpeg; the drift draft decoding costs; RSS over 20,000 images.

    python benchmarks/bench_score.py [--work /tmp/bench-score] [--large 200] [--rounds 3] \\
        [--out benchmarks/results/score-<machine>.md]

Folders (generated under --work, deleted at the end unless --keep):
- `small`: 512x384 JPEGs (quality 90), the default synthetic set's images upscaled (its pseudo-MOS kept);
- `large`: --large 4000x3000 JPEGs (quality 90), the same images upscaled (bicubic) to 12 MP with sensor-like
  grain added (`phone_photo`), so that a file is about 3 MB and decodes like a phone's photo: a smooth upscale
  compresses to 0.6 MB and decodes 2.5x faster than a real photo would.
Models: a random-init resnet18 student (the tiny CLIP teacher's head, 224 px preprocessing) exported with
`kdiqa-edge export --precision int8` to ONNX (ONNX Runtime) and OpenVINO IRs: the speed is real, the
scores are not image quality (so ΔSRCC against the pseudo-MOS is reported with that label).

Every timing runs in a fresh process (`--one`), rounds alternate the order of the configurations, and the
fastest round of each is kept (the machine is shared: other jobs take cores at random). Per folder and model:
- end to end: the pipeline as `score` runs it (threads; batch 16), workers 1 and all cores, draft and exact;
  processes in place of threads; simplejpeg in place of Pillow's decoder;
- inference alone: the model on pixels decoded beforehand, the same batch;
- decode + resize alone, with the same workers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 16
# optional: its rows (and the same-pixels check) are left out where it is not installed (not a dependency)
SIMPLEJPEG = importlib.util.find_spec("simplejpeg") is not None


# --- one measurement, in its own process ---------------------------------------------------------------


def simplejpeg_loader(spec):
    """simplejpeg (libjpeg-turbo, DCT scaling by min_width/min_height) then our resize_crop: the same pixels
    as Pillow where both decode at the same scale (checked by `same_pixels`)."""
    import simplejpeg
    from PIL import Image

    from kdiqa_edge.preprocess import draft_scale, load_preprocessed, resize_crop

    def load(path: str) -> np.ndarray:
        if not path.lower().endswith((".jpg", ".jpeg")):
            return load_preprocessed(path, spec)
        data = Path(path).read_bytes()
        width, height, _, _ = simplejpeg.decode_jpeg_header(data)
        scale = draft_scale(width, height, spec.size) if spec.draft else 1
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-width // scale),
                                        min_height=-(-height // scale))
        return resize_crop(Image.fromarray(pixels), spec)

    return load


def one(config: dict) -> dict:
    """images/s and CPU ms per image (the process's user + system time) of one configuration: kind e2e |
    inference | decode. End to end opens the model as `kdiqa-edge score` does (ONNX Runtime without
    spin-waiting) unless the config says `spinning`."""
    from kdiqa_edge.runtime import QualityModel
    from kdiqa_edge.runtime.pipeline import decode_files, preprocessed, score_paths, walk

    files = sorted(str(p) for p in Path(config["folder"]).iterdir())[: config.get("limit")]
    model = QualityModel.load(config["model"], spinning=config.get("spinning", config["kind"] != "e2e"))
    spec = model.preprocess.with_decode(config["decode"])
    load = simplejpeg_loader(spec) if config.get("decoder") == "simplejpeg" else preprocessed(spec)
    model.predict(np.zeros((BATCH, spec.size, spec.size, 3), np.uint8), BATCH)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    if config["kind"] == "e2e":
        if config.get("decoder") == "simplejpeg":
            from kdiqa_edge.runtime.pipeline import score_decoded

            done = sum(1 for _ in score_decoded(model, decode_files(walk(files), load, config["workers"],
                                                                    max(2 * BATCH, 4 * config["workers"])), BATCH))
        else:
            done = sum(1 for _ in score_paths(model, walk(files), BATCH, config["workers"], config["decode"],
                                              executor=config.get("executor", "thread")))
    elif config["kind"] == "decode":
        done = sum(1 for _ in decode_files(walk(files), load, config["workers"], executor=config.get("executor",
                                                                                                    "thread")))
    else:
        pixels = np.stack([item.pixels for item in decode_files(walk(files[:2 * BATCH]), load, 2)])
        pixels = np.concatenate([pixels] * -(-2 * BATCH // len(pixels)))[:2 * BATCH]  # two full batches
        runs = max(20, len(files) // BATCH)  # 48 photos are 3 batches: too short a timing alone
        start, cpu = time.perf_counter(), time.process_time()
        for index in range(runs):
            model.predict(pixels[(index % 2) * BATCH:(index % 2 + 1) * BATCH], BATCH)
        done = runs * BATCH
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"images": done, "seconds": seconds, "rate": done / seconds, "cpu_ms": 1000 * cpu / done}


def run_one(config: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    if out.returncode != 0:
        raise RuntimeError(f"{config}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- set-up ----------------------------------------------------------------------------------------------


def make_folders(work: Path, large: int) -> tuple[Path, Path, dict[str, float]]:
    """512 px and 12 MP JPEGs from the synthetic set's images; {file name: pseudo-MOS}."""
    import csv

    from PIL import Image

    from kdiqa_edge.data.synthetic import default_root

    root = default_root()
    with open(root / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    small, big = work / "small", work / "large"
    small.mkdir(parents=True, exist_ok=True)
    big.mkdir(exist_ok=True)
    mos = {}
    for index, row in enumerate(rows):
        name = f"{index:04d}.jpg"
        mos[name] = float(row["mos"])
        image = Image.open(root / row["image"]).convert("RGB")
        if not (small / name).exists():
            image.resize((512, 384), Image.Resampling.BICUBIC).save(small / name, quality=90)
        if index < large and not (big / name).exists():
            phone_photo(image, seed=index).save(big / name, quality=90)
    return small, big, mos


def phone_photo(image, seed: int, grain: float = 5.0):
    """`image` upscaled to 4000x3000 with a phone sensor's grain (luma sigma `grain`, chroma half of it): the
    entropy of a real 12 MP photo (about 3 MB at JPEG quality 90), which sets its decode time."""
    from PIL import Image

    pixels = np.asarray(image.resize((4000, 3000), Image.Resampling.BICUBIC), np.float32)
    rng = np.random.default_rng(seed)
    pixels += rng.normal(0, grain, pixels.shape[:2] + (1,)).astype(np.float32)
    pixels += rng.normal(0, grain / 2, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def build_models(work: Path) -> dict[str, Path]:
    """A random-init resnet18 under the tiny teacher's head at 224 px, exported to ONNX INT8 and OpenVINO INT8."""
    import torch

    from kdiqa_edge.models import save_checkpoint
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.models.teacher import load_teacher
    from kdiqa_edge.preprocess import PreprocessSpec

    checkpoint = work / "resnet18"
    if not (checkpoint / "model.json").exists():
        teacher = load_teacher("tiny")
        torch.manual_seed(0)
        save_checkpoint(create_student("resnet18", teacher.head, PreprocessSpec(), pretrained=False), checkpoint)
    models = {}
    for target in ("onnx", "openvino") if importlib.util.find_spec("openvino") else ("onnx",):
        out = work / "exports"
        found = sorted(out.glob(f"{target}-int8/*.{'onnx' if target == 'onnx' else 'xml'}"))
        if not found:
            subprocess.run([sys.executable, "-m", "kdiqa_edge", "export", str(checkpoint), "--target", target,
                            "--precision", "int8", "--out", str(out), "--threads", "2"], check=True)
            found = sorted(out.glob(f"{target}-int8/*.{'onnx' if target == 'onnx' else 'xml'}"))
        models[f"{'ONNX Runtime' if target == 'onnx' else 'OpenVINO'} INT8"] = found[0]
    return models


# --- figures ----------------------------------------------------------------------------------------------


def timings(configs: dict[str, dict], rounds: int) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {name: [] for name in configs}
    names = list(configs)
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            found[name].append(run_one(configs[name]))
            print(f"  round {round_index + 1} {name}: {found[name][-1]['rate']:.1f} images/s, "
                  f"{found[name][-1]['cpu_ms']:.1f} CPU ms an image", flush=True)
    return found


def drift(model_path: Path, folder: Path, mos: dict[str, float]) -> dict:
    """Scores with draft and exact decoding of every file in `folder`: |Δscore|, and SRCC vs pseudo-MOS."""
    from scipy.stats import spearmanr

    def srcc(a, b):
        return spearmanr(a, b).statistic
    from kdiqa_edge.runtime import QualityModel

    model = QualityModel.load(model_path)
    files = sorted(folder.iterdir())
    scores = {d: np.array([r.score for r in model.score_files(files, BATCH, decode=d)]) for d in ("draft", "exact")}
    target = np.array([mos[f.name] for f in files])
    delta = np.abs(scores["draft"] - scores["exact"])
    return {"images": len(files), "mean_abs": float(delta.mean()), "max_abs": float(delta.max()),
            "score_std": float(scores["exact"].std()),
            "srcc_exact": float(srcc(scores["exact"], target)), "srcc_draft": float(srcc(scores["draft"], target)),
            "srcc_draft_vs_exact": float(srcc(scores["draft"], scores["exact"]))}


def pixel_drift(folder: Path, count: int = 50) -> dict:
    from kdiqa_edge.preprocess import PreprocessSpec, load_preprocessed

    diffs = [np.abs(load_preprocessed(f, PreprocessSpec(draft=True)).astype(int)
                    - load_preprocessed(f, PreprocessSpec(draft=False)).astype(int))
             for f in sorted(folder.iterdir())[:count]]
    return {"mean": float(np.mean([d.mean() for d in diffs])), "max": int(max(d.max() for d in diffs))}


def same_pixels(folder: Path, count: int = 20) -> dict:
    from kdiqa_edge.preprocess import PreprocessSpec, load_preprocessed

    result = {}
    for decode in ("draft", "exact"):
        spec = PreprocessSpec().with_decode(decode)
        load = simplejpeg_loader(spec)
        files = sorted(folder.iterdir())[:count]
        result[decode] = all(np.array_equal(load(str(f)), load_preprocessed(f, spec)) for f in files)
    return result


def rss_flat(work: Path, model_path: Path, total: int = 20_000) -> dict:
    """VmRSS after 1,000 and after `total` images of `score --out` (CSV): 64 distinct 512 px JPEGs, linked."""
    folder = work / "many"
    folder.mkdir(exist_ok=True)
    sources = sorted((work / "small").iterdir())[:64]
    for index in range(total):
        link = folder / f"{index:06d}.jpg"
        if not link.exists():
            os.link(sources[index % len(sources)], link)
    code = f"""
import sys, json
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from kdiqa_edge.runtime import QualityModel
from kdiqa_edge.runtime.files import ImageFiles
from kdiqa_edge.runtime.output import Row, ScoresOutput, model_sha256
from kdiqa_edge.runtime.pipeline import score_paths
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
model = QualityModel.load({str(model_path)!r})
marks = {{}}
with ScoresOutput({str(work / 'many.csv')!r}, {{'sha256': model_sha256({str(model_path)!r})}}, 'draft',
                  overwrite=True) as out:
    for count, (decoded, result) in enumerate(score_paths(model, ImageFiles([{str(folder)!r}]), {BATCH}), 1):
        out.add(Row(result.path, result.score, result.error, decoded.stamp))
        if count in (1000, 5000, 10000, {total}):
            marks[count] = rss()
print(json.dumps(marks))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def environment_lines(threads: int) -> list[str]:
    from kdiqa_edge.bench.environment import environment

    env = environment(threads)
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())
                         if k in ("onnxruntime", "openvino", "pillow", "numpy", "simplejpeg"))
    if SIMPLEJPEG:
        import simplejpeg

        versions += f", simplejpeg {simplejpeg.__version__}"
    else:
        versions += ", simplejpeg not installed (its rows left out)"
    return [f"- CPU: {env['cpu']}, {env['cpu_count']} logical cores, ISA {' '.join(env['cpu_isa'])}",
            f"- threads: inference at its runtime's default (ONNX Runtime / OpenVINO: all cores), decode workers as "
            f"in each row ({threads} usable cores: this process's CPU affinity); load average at start "
            f"{env.get('load_average')}",
            f"- versions: python {env['python']}, {versions}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-score"))
    parser.add_argument("--large", type=int, default=200, help="12 MP JPEGs to make (all used for the drift)")
    parser.add_argument("--timed-large", type=int, default=48, help="of them, how many each timing run scores")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss", type=int, default=20_000, help="images of the RSS run (0: skip it)")
    parser.add_argument("--keep", action="store_true", help="keep --work (the generated folders and models)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if 0 < args.rss < 1000:
        parser.error("--rss takes 0 (no RSS run) or at least 1000 images (the first mark is at 1000)")
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    from kdiqa_edge.bench.environment import machine_slug
    from kdiqa_edge.runtime.pipeline import usable_cores

    out = args.out or Path(__file__).parent / "results" / f"score-{machine_slug()}.md"
    started = time.perf_counter()
    cores = usable_cores()
    env = environment_lines(cores)
    print("\n".join(env), flush=True)
    try:
        small, big, mos = make_folders(args.work, args.large)
        models = build_models(args.work)
        lines = report(args, small, big, mos, models, cores)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    text = "\n".join([f"# `score` end to end on {env[0][7:]}", "",
                      f"Measured by `benchmarks/bench_score.py --rounds {args.rounds}`: each figure is the fastest of "
                      "its rounds, every run a fresh process, the configurations alternated round by round; load "
                      f"average at the end {[round(x, 2) for x in os.getloadavg()]}. Random-init resnet18 (224 px) "
                      "exported to INT8: real speed, no image quality.", "", *env,
                      f"- command: `python benchmarks/bench_score.py {' '.join(sys.argv[1:])}`; wall time "
                      f"{(time.perf_counter() - started) / 60:.1f} min", "", *lines, ""])
    out.write_text(text)
    print(text)


def verdicts(decode: str, best: dict[str, float], cpu: dict[str, float], cores: int) -> list[str]:
    """The issue's two bounds for one decode, and the CPU ceiling that caps both: on `cores` cores no pipeline
    scores faster than cores / (CPU time of one image's inference + its decode), each measured alone."""
    e2e, decode_rate = best[f"e2e {decode} workers {cores}"], best[f"decode {decode} workers {cores}"]
    inference = best["inference alone"]
    work = min(ms for name, ms in cpu.items() if name.startswith("inference alone"))
    ceiling = 1000 * cores / (work + cpu[f"decode {decode} workers 1"])
    one_worker = best[f"e2e {decode} workers 1"]
    return [f"- {decode}: end to end with the default workers ({cores}) {e2e:.1f} images/s = "
            f"{100 * e2e / min(inference, decode_rate):.0f}% of min(inference alone {inference:.1f}, decode with "
            f"{cores} workers {decode_rate:.1f}) (bound: 85%); {e2e / one_worker:.2f}x `--workers 1` (bound on "
            f"12 MP: 1.6x)",
            f"  - CPU ceiling: {cores} cores / ({work:.1f} ms inference + "
            f"{cpu[f'decode {decode} workers 1']:.1f} ms decode of CPU an image) = {ceiling:.1f} images/s; end to "
            f"end reaches {100 * e2e / ceiling:.0f}% of it, and no pipeline can be more than {ceiling / one_worker:.2f}x "
            "`--workers 1` here"]


def report(args, small: Path, big: Path, mos: dict, models: dict[str, Path], cores: int) -> list[str]:
    lines: list[str] = []
    workers = sorted({1, cores})
    for folder_name, folder, limit, decodes in (("512 px", small, 320, ("draft",)),
                                                 ("12 MP", big, args.timed_large, ("draft", "exact"))):
        for model_name, model_path in models.items():
            base = {"folder": str(folder), "model": str(model_path), "limit": limit}
            configs = {}
            for decode in decodes:
                for w in workers:
                    configs[f"e2e {decode} workers {w}"] = {**base, "kind": "e2e", "decode": decode, "workers": w}
                    configs[f"decode {decode} workers {w}"] = {**base, "kind": "decode", "decode": decode, "workers": w}
                if model_name.startswith("ONNX"):  # the runtime alternatives, on ONNX Runtime only
                    configs[f"e2e {decode} workers {cores} spin-waiting"] = {**base, "kind": "e2e", "decode": decode,
                                                                             "workers": cores, "spinning": True}
                    configs[f"e2e {decode} workers {cores} processes"] = {**base, "kind": "e2e", "decode": decode,
                                                                          "workers": cores, "executor": "process"}
                if model_name.startswith("ONNX") and SIMPLEJPEG:
                    configs[f"e2e {decode} workers {cores} simplejpeg"] = {**base, "kind": "e2e", "decode": decode,
                                                                           "workers": cores, "decoder": "simplejpeg"}
                    configs[f"decode {decode} workers 1 simplejpeg"] = {**base, "kind": "decode", "decode": decode,
                                                                        "workers": 1, "decoder": "simplejpeg"}
            configs["inference alone"] = {**base, "kind": "inference", "decode": "draft", "workers": 1}
            if model_name.startswith("ONNX"):  # the CPU an image costs without time burnt spin-waiting
                configs["inference alone without spin-waiting"] = {**configs["inference alone"], "spinning": False}
            print(f"{folder_name}, {model_name}:", flush=True)
            found = timings(configs, args.rounds)
            best = {name: max(run["rate"] for run in runs) for name, runs in found.items()}
            cpu = {name: min(run["cpu_ms"] for run in runs) for name, runs in found.items()}
            lines += [f"## {folder_name} JPEGs, {model_name} ({limit} images a run, batch {BATCH})", "",
                      "| configuration | images/s (fastest) | median | CPU ms an image | rounds |", "|---|---|---|---|---|"]
            lines += [f"| {name} | {best[name]:.1f} | {statistics.median(run['rate'] for run in runs):.1f} | "
                      f"{cpu[name]:.1f} | {len(runs)} |" for name, runs in found.items()]
            lines += [""]
            for decode in decodes:
                lines += verdicts(decode, best, cpu, cores)
            lines.append("")
    lines += ["## Draft vs exact decoding", ""]
    model_path = next(iter(models.values()))
    pixels = pixel_drift(big)
    lines += [f"- pixels at 224 px, 12 MP JPEGs (first 50): mean |Δ| {pixels['mean']:.3f} grey levels, max "
              f"{pixels['max']}; the 512 px JPEGs and the synthetic set's 320x240 images decode exactly either way "
              "(draft_scale 1: a side under twice 224 px), so their drift is 0 by construction", ""]
    for folder_name, folder in (("512 px", small), ("12 MP", big)):
        found = drift(model_path, folder, mos)
        lines.append(f"- {folder_name} ({found['images']} JPEGs, {next(iter(models))}): mean |Δscore| "
                     f"{found['mean_abs']:.5f}, max {found['max_abs']:.5f} (the model's score std "
                     f"{found['score_std']:.4f}); SRCC vs pseudo-MOS exact {found['srcc_exact']:.4f}, draft "
                     f"{found['srcc_draft']:.4f}, ΔSRCC {found['srcc_draft'] - found['srcc_exact']:+.4f} (random "
                     f"init); SRCC draft vs exact scores {found['srcc_draft_vs_exact']:.4f}")
    if SIMPLEJPEG:
        same = same_pixels(big)
        lines += ["", f"- simplejpeg gives Pillow's pixels: draft {same['draft']}, exact {same['exact']} "
                  "(20 files)", ""]
    else:
        lines += ["", "- simplejpeg is not installed here: its rows and the same-pixels check are left out",
                  ""]
    if args.rss:
        marks = rss_flat(args.work, model_path, args.rss)
        last = marks[max(marks)]
        lines += ["## Memory", "", f"- VmRSS of `score --out many.csv` over {args.rss} images (512 px, "
                  f"{next(iter(models))}): " + ", ".join(f"{k}: {v} MB" for k, v in sorted(marks.items()))
                  + f"; after {max(marks)} vs after 1000: {100 * (last - marks[1000]) / marks[1000]:+.1f}% "
                  "(bound: within 10%)", ""]
    return lines


if __name__ == "__main__":
    main()
