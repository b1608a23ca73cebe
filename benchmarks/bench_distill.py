"""Distillation epoch wall time vs the bare student train step on the same batches.

    python benchmarks/bench_distill.py [--student resnet18] [--teacher tiny] [--images 256] [--batch-size 32]
                                       [--repeats 4] [--threads 2] [--device auto]
                                       [--markdown benchmarks/results/distill.md]

1. Bare student train step: the epoch's batches already normalized and resident on the device; per step
   forward + MSE(score, mos) + backward + AdamW step. What the student can do at best.
2. Distillation epoch: the same student (same initial weights) through the real recipe, the engine's
   Trainer with the full-variant DistillLoss: uint8 batches gathered from the memory-mapped image cache in
   a background thread, cached teacher features riding along by index, on-device normalization and flips,
   the soft + hard loss with lambda(t), the scheduler. Same batch order (the engine's epoch permutation).
   Target (issue 4): distillation epoch <= 1.2x the bare epoch: data and teacher cost amortized by the caches.

The two alternate epoch by epoch (after one warm-up epoch each; which goes first alternates too), so
each distillation epoch is compared with the bare epoch run beside it under the same machine load. The
geometric mean of these paired ratios is reported (both orders equally often, so a cost that falls on
whichever runs second cancels out), for wall time (the target's measure) and for CPU time (this process,
all its threads). The engine's per-epoch evaluation is excluded from both. The one-off cost of the
teacher feature cache is reported separately. Weights are random (speed does not depend on them):
nothing is downloaded. The environment, with the load average, is printed with the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _MemmapCache:
    """What the engine and the feature cache read from an ImageCache: uint8 images, MOS, a key."""

    def __init__(self, images: np.ndarray, mos: np.ndarray, key: str):
        self.images, self.mos, self.key = images, mos, key

    def __len__(self) -> int:
        return len(self.images)


def make_cache(folder: Path, count: int, size: int, seed: int = 0) -> _MemmapCache:
    rng = np.random.default_rng(seed)
    path = folder / "images.u8"
    images = np.memmap(path, dtype=np.uint8, mode="w+", shape=(count, size, size, 3))
    images[:] = rng.integers(0, 256, images.shape, dtype=np.uint8)
    images.flush()
    # reopened read-only, as the real cache is read
    images = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, size, size, 3))
    mos = rng.uniform(1, 5, count).astype(np.float32)
    return _MemmapCache(images, mos, key=f"bench-{count}-{size}-{seed}")


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareStep:
    """forward + MSE + backward + AdamW on batches prepared ahead (normalized, on the device)."""

    def __init__(self, student, cfg, device):
        import torch

        from kdiqa_edge.train.step import autocast_for, build_optimizer

        self.model = student
        self.device = device
        cuda = device.type == "cuda"
        params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg, fused=cuda)
        self.autocast, _ = autocast_for(device, cfg.amp)
        self.channels_last = cuda and cfg.channels_last
        if self.channels_last:
            student.to(memory_format=torch.channels_last)

    def prepare(self, cache, batches) -> list[dict]:
        import torch

        from kdiqa_edge.train.loader import DeviceTransform

        transform = DeviceTransform(self.model.preprocess, self.device, channels_last=self.channels_last)
        prepared = []
        for idx in batches:
            batch = {"image": torch.from_numpy(np.ascontiguousarray(cache.images[idx])),
                     "mos": torch.from_numpy(cache.mos[idx])}
            prepared.append(transform(batch))
        synchronize(self.device)
        return prepared

    def epoch(self, prepared: list[dict]) -> list[float]:
        """Seconds per step."""
        import torch.nn.functional as F

        self.model.train()
        times = []
        for batch in prepared:
            start = time.perf_counter()
            with self.autocast():
                loss = F.mse_loss(self.model(batch["image"]).float(), batch["mos"])
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        return times


def environment(device) -> dict:
    import timm
    import torch

    from kdiqa_edge.bench.environment import cpu_isa, cpu_name

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "device": str(device), "cpu": cpu_name(), "cpu_isa": cpu_isa(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run(args) -> dict:
    import torch

    from kdiqa_edge.console import Progress
    from kdiqa_edge.data import Split
    from kdiqa_edge.models.checkpoint import save_checkpoint
    from kdiqa_edge.models.student import create_student
    from kdiqa_edge.models.teacher import load_teacher
    from kdiqa_edge.train.distributed import resolve_device
    from kdiqa_edge.train.features import teacher_features
    from kdiqa_edge.train.loader import epoch_order
    from kdiqa_edge.train.loop import TrainConfig, Trainer
    from kdiqa_edge.train.losses import DistillLoss
    from kdiqa_edge.train.schedules import parse_variant

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    env = environment(device)
    print(json.dumps(env))
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    os.environ.setdefault("KDIQA_CACHE", str(work / "cache"))

    teacher = load_teacher(args.teacher)  # random init: speed does not depend on the weights
    teacher_dir = save_checkpoint(teacher, work / "teacher")
    size = teacher.preprocess.size
    test_count = max(3, args.batch_size)
    cache = make_cache(work, args.images + test_count, size)
    split = Split(train=list(range(args.images)), val=[],
                  test=list(range(args.images, args.images + test_count)))

    started = time.perf_counter()
    features = teacher_features(teacher_dir, cache, device=str(device), batch_size=128, progress=False)
    feature_seconds = time.perf_counter() - started

    torch.manual_seed(0)
    student = create_student(args.student, teacher.head, teacher.preprocess, pretrained=False)
    bare_student = copy.deepcopy(student).to(device)
    epochs = 1 + args.repeats
    variant = parse_variant("full")
    cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=1e-4, device=str(device), progress=False,
                      eval_batch_size=128)
    trainer = Trainer(student, DistillLoss(variant), cache, split, cfg, work / "run",
                      extras={"teacher_features": features},
                      scalars_fn=lambda step, total: {"lambda": variant.lam(step, total)})
    trainer.setup()
    bare = BareStep(bare_student, cfg, device)

    # CPU time of the evaluation that follows each engine epoch, to take it out of the epoch's CPU time
    eval_cpu: list[float] = []
    evaluate = trainer._evaluate

    def timed_evaluate(indices):
        started_cpu = time.process_time()
        try:
            return evaluate(indices)
        finally:
            eval_cpu.append(time.process_time() - started_cpu)

    trainer._evaluate = timed_evaluate

    pairs, step_times = [], []
    progress = Progress("bench", trainer.total_steps, enabled=False)
    for epoch in range(epochs):
        # the engine's own batch order for this epoch, prepared ahead for the bare loop
        order = epoch_order(split.train, cfg.seed, epoch)
        prepared = bare.prepare(cache, [order[i:i + args.batch_size]
                                        for i in range(0, len(order), args.batch_size)])
        def run_bare(prepared=prepared):
            cpu = time.process_time()
            return bare.epoch(prepared), time.process_time() - cpu

        def run_distill():
            cpu = time.process_time()
            row = trainer._train_epoch(progress).row  # one epoch of the real recipe, wall-timed inside
            return row, time.process_time() - cpu - eval_cpu[-1]

        # the order alternates, so neither side always runs on the caches the other left behind
        if epoch % 2 == 0:
            times, bare_cpu = run_bare()
            row, distill_cpu = run_distill()
        else:
            row, distill_cpu = run_distill()
            times, bare_cpu = run_bare()
        trainer.history.append(row)
        if epoch == 0:
            continue  # warm-up (allocator, thread pools, first touch of the memmaps)
        pair = {"bare_s": sum(times), "distill_s": row["train_seconds"], "bare_cpu_s": bare_cpu,
                "distill_cpu_s": distill_cpu}
        pairs.append(pair)
        step_times += times
        print(f"epoch {epoch}: wall bare {pair['bare_s']:.2f} s, distill {pair['distill_s']:.2f} s "
              f"({pair['distill_s'] / pair['bare_s']:.3f}x); CPU bare {bare_cpu:.2f} s, distill "
              f"{distill_cpu:.2f} s ({distill_cpu / bare_cpu:.3f}x)")
    trainer.cleanup()

    def median(key):
        return statistics.median(p[key] for p in pairs)

    p50, p90 = np.percentile(step_times, [50, 90])
    env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "student": args.student, "teacher": teacher.label, "input": size, "images": args.images,
        "batch_size": args.batch_size, "steps_per_epoch": trainer.steps_per_epoch, "repeats": args.repeats,
        "pairs": pairs,
        "bare_epoch_s": median("bare_s"), "distill_epoch_s": median("distill_s"),
        "bare_epoch_cpu_s": median("bare_cpu_s"), "distill_epoch_cpu_s": median("distill_cpu_s"),
        # paired ratios: each distillation epoch against the bare epoch run just before it (same load)
        "wall_ratio": statistics.geometric_mean(p["distill_s"] / p["bare_s"] for p in pairs),
        "wall_ratio_median": statistics.median(p["distill_s"] / p["bare_s"] for p in pairs),
        "wall_ratio_of_minima": (min(p["distill_s"] for p in pairs)
                                 / min(p["bare_s"] for p in pairs)),
        "cpu_ratio": statistics.geometric_mean(p["distill_cpu_s"] / p["bare_cpu_s"] for p in pairs),
        "bare_images_per_s": args.images / median("bare_s"),
        "distill_images_per_s": args.images / median("distill_s"),
        "bare_step_ms_p50": 1000 * float(p50), "bare_step_ms_p90": 1000 * float(p90),
        "feature_cache_s": feature_seconds, "feature_cache_images": len(cache), "environment": env,
    }


def markdown(result: dict) -> str:
    env = result["environment"]
    wall, cpu = result["wall_ratio"], result["cpu_ratio"]
    lines = [
        (f"## {result['student']} student, {result['teacher']} teacher, {result['input']} px, batch "
         f"{result['batch_size']}, {result['images']} images/epoch ({env['device']})"),
        "",
        (f"CPU: {env['cpu']} ({env['cpu_count']} logical cores, torch threads {env['torch_threads']}); "
         f"torch {env['torch']}, timm {env['timm']}, Python {env['python']}; load average before "
         f"{env['load_average']}, after {env['load_average_after']}."),
        "",
        "| epoch | bare wall (s) | distill wall (s) | ratio | bare CPU (s) | distill CPU (s) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(result["pairs"], 1):
        lines.append(f"| {i} | {p['bare_s']:.2f} | {p['distill_s']:.2f} | "
                     f"{p['distill_s'] / p['bare_s']:.3f} | {p['bare_cpu_s']:.2f} | "
                     f"{p['distill_cpu_s']:.2f} | "
                     f"{p['distill_cpu_s'] / p['bare_cpu_s']:.3f} |")
    verdict = "met" if max(wall, cpu) <= 1.2 else "met on CPU time only" if cpu <= 1.2 else "NOT met"
    lines += [
        (f"| median epoch; geometric mean ratio | {result['bare_epoch_s']:.2f} "
         f"| {result['distill_epoch_s']:.2f} | **{wall:.3f}** | {result['bare_epoch_cpu_s']:.2f} "
         f"| {result['distill_epoch_cpu_s']:.2f} | **{cpu:.3f}** |"),
        "",
        (f"Distillation epoch / bare student epoch, geometric mean of the paired ratios: "
         f"wall **{wall:.3f}x**, CPU time **{cpu:.3f}x** (median of the paired wall ratios "
         f"{result['wall_ratio_median']:.3f}x; ratio of the fastest epochs, wall: "
         f"{result['wall_ratio_of_minima']:.3f}x); target <= 1.2x: {verdict}. "
         f"Images/s (median wall): bare {result['bare_images_per_s']:.1f}, distill "
         f"{result['distill_images_per_s']:.1f}. Bare step p50 {result['bare_step_ms_p50']:.1f} ms, "
         f"p90 {result['bare_step_ms_p90']:.1f} ms ({result['steps_per_epoch']} steps x "
         f"{result['repeats']} epochs). "
         f"One-off teacher feature cache: {result['feature_cache_s']:.2f} s for "
         f"{result['feature_cache_images']} images."),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="resnet18", help="timm model name (random init)")
    parser.add_argument("--teacher", default="tiny", help="random-init teacher: tiny (64 px) or NAME:random")
    parser.add_argument("--images", type=int, default=256, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4,
                        help="measured epochs (after one warm-up epoch); even, so both orders count equally")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--markdown", type=Path, default=None, help="append the result table to this file")
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 2 or args.repeats % 2:
        parser.error("--repeats must be even (and at least 2): each order of the pair runs equally often")
    from kdiqa_edge.models.teacher import RANDOM_TAG

    if args.teacher != "tiny" and not args.teacher.endswith(f":{RANDOM_TAG}"):
        parser.error("the teacher is random init, built without a download: tiny (64 px) or NAME:random "
                     "(an open_clip architecture, e.g. ViT-B-32:random at 224 px)")
    result = run(args)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        header = "" if args.markdown.exists() else (
            "# Distillation epoch vs bare student train step\n\n"
            "`python benchmarks/bench_distill.py --markdown benchmarks/results/distill.md` "
            "(see the script's docstring for what each row measures).\n\n")
        with open(args.markdown, "a") as handle:
            handle.write(header + markdown(result) + "\n")
    return result


if __name__ == "__main__":
    main()
