"""Teacher fine-tune throughput: the engine's images/s vs the bare train step, and where the rest goes.

    python benchmarks/bench_finetune.py [--arch tiny|ViT-B-32] [--batch-size 64] [--steps 20] [--device auto]
                                        [--compile] [--markdown benchmarks/results/finetune.md]

1. Bare train step: one normalized batch already on the device, forward + MSE + backward + AdamW step in a
   loop (what the image tower can do at best; H200 reference for ViT-B/32: 3118 images/s at batch 64).
2. Engine: the same model through `kdiqa_edge.train.loop.Trainer` for one epoch over a uint8 image
   cache of `steps x batch` random images: batch gathering from the memmap, host->device copy, on-device
   normalization and flips, AMP, scheduler, logging. Reported: train-phase images/s, the share of time
   outside forward/backward/step (1 - engine / bare), and the per-epoch cost of evaluation + checkpoints.
   Target on a GPU: engine >= 80% of the bare step.

Weights are random (throughput does not depend on them), so nothing is downloaded. Warm-up steps, device
synchronization, perf_counter and the environment are printed with the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_teacher(arch: str):
    """A random-init teacher of the given open_clip architecture (or the registered `tiny`)."""
    import open_clip

    from kdiqa_edge.models.teacher import ClipBuild, create_clip, teacher_from_clip

    if arch == "tiny":
        clip_model, tokenizer, build = create_clip("tiny")
    else:
        clip_model = open_clip.create_model(arch, pretrained=None)
        tokenizer = open_clip.get_tokenizer(arch)
        build = ClipBuild(arch, open_clip.get_model_config(arch), False, f"{arch} (random init)")
    return teacher_from_clip(clip_model, tokenizer, build)


def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step_throughput(model, device, batch_size: int, steps: int, warmup: int, amp: bool, compile_: bool) -> float:
    """images/s of forward + loss + backward + optimizer step on a resident, normalized batch."""
    import torch

    from kdiqa_edge.train.finetune import finetune_loss, freeze_all_but_image_encoder
    from kdiqa_edge.train.loop import TrainConfig
    from kdiqa_edge.train.step import LossStep, autocast_for, build_optimizer

    model = copy.deepcopy(model).to(device)
    freeze_all_but_image_encoder(model)
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    size = model.preprocess.size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    batch = {"image": x, "mos": (torch.rand(batch_size, generator=generator) * 4 + 1).to(device)}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(params, TrainConfig(lr=5e-6), fused=cuda)
    autocast, _ = autocast_for(device, amp)
    step_module = LossStep(model, finetune_loss)
    step_module = torch.compile(step_module) if compile_ else step_module
    model.train()

    def one_step():
        with autocast():
            loss = sum(step_module(batch, 0, 1).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronize(device)
    return batch_size * steps / (time.perf_counter() - start)


class _MemoryCache:
    """The two things the engine reads from an ImageCache: uint8 images and MOS."""

    def __init__(self, images: np.ndarray, mos: np.ndarray):
        self.images, self.mos, self.key = images, mos, "bench"

    def __len__(self):
        return len(self.images)


def engine_throughput(model, device, batch_size: int, steps: int, warmup: int, amp: bool, compile_: bool,
                      workdir: Path) -> dict:
    """Train-phase images/s of one engine epoch (after a warm-up epoch), and the epoch's other costs."""
    from kdiqa_edge.data import Split
    from kdiqa_edge.train.finetune import finetune_loss, freeze_all_but_image_encoder
    from kdiqa_edge.train.loop import TrainConfig, Trainer

    size = model.preprocess.size
    rng = np.random.default_rng(0)
    count = batch_size * steps
    test = max(batch_size, 64)
    path = workdir / "images.u8"
    images = np.memmap(path, dtype=np.uint8, mode="w+", shape=(count + test, size, size, 3))
    images[:] = rng.integers(0, 256, images.shape, dtype=np.uint8)
    images.flush()
    images = np.memmap(path, dtype=np.uint8, mode="r", shape=images.shape)  # read like the real cache
    cache = _MemoryCache(images, rng.uniform(1, 5, len(images)).astype(np.float32))
    split = Split(train=list(range(count)), val=[], test=list(range(count, count + test)))
    model = copy.deepcopy(model)
    freeze_all_but_image_encoder(model)
    # epoch 1 warms up (allocator, cudnn, compile); epoch 2 is measured
    cfg = TrainConfig(epochs=2, batch_size=batch_size, lr=5e-6, device=str(device), amp=amp, compile=compile_,
                      progress=False, eval_batch_size=max(batch_size, 128))
    started = time.perf_counter()
    trainer = Trainer(model, finetune_loss, cache, split, cfg, workdir / "run")
    summary = trainer.fit()
    wall = time.perf_counter() - started
    rows = trainer.history
    measured = rows[-1]
    # the same again with the phases timed (device synchronized at each boundary)
    profiled = Trainer(copy.deepcopy(model), finetune_loss, cache, split, cfg, workdir / "profiled")
    profiled.profile_steps = True
    profiled.fit()
    phases = dict(profiled.step_timings)
    total = sum(phases.values())
    return {
        "images_per_s": measured["images_per_s"],
        "phases_seconds": phases,
        "share_outside_fwd_bwd_profiled": 1.0 - phases.get("forward_backward", 0.0) / total if total else None,
        "train_seconds_epoch": measured["train_seconds"],
        "wall_seconds_total": wall,
        "epochs": len(rows),
        "steps_per_epoch": trainer.steps_per_epoch,
        "test": summary["test"]["n"] if summary["test"] else 0,
    }


def environment(device) -> dict:
    import torch

    from kdiqa_edge.bench.environment import cpu_isa, cpu_name

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
        "cpu": cpu_name(), "cpu_isa": cpu_isa(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["bf16"] = torch.cuda.is_bf16_supported()
    return env


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny", help="tiny (64 px, CPU) or an open_clip name, e.g. ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="measured steps (bare) / steps per epoch (engine)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--markdown", type=Path, default=None, help="append a result table to this file")
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)

    import torch

    from kdiqa_edge.train.distributed import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = not args.no_amp
    model = build_teacher(args.arch)
    env = environment(device)
    print(json.dumps(env))
    bare = bare_step_throughput(model, device, args.batch_size, args.steps, args.warmup, amp, args.compile)
    print(f"bare train step: {bare:.1f} images/s")
    with tempfile.TemporaryDirectory() as tmp:
        engine = engine_throughput(model, device, args.batch_size, args.steps, args.warmup, amp, args.compile, Path(tmp))
    share_outside = 1.0 - engine["images_per_s"] / bare
    result = {"arch": args.arch, "batch_size": args.batch_size, "amp": amp and device.type == "cuda",
              "compile": args.compile, "bare_images_per_s": bare, "engine": engine,
              "engine_vs_bare": engine["images_per_s"] / bare, "share_outside_fwd_bwd": share_outside,
              "environment": env}
    print(f"engine:          {engine['images_per_s']:.1f} images/s ({100 * engine['images_per_s'] / bare:.1f}% of "
          f"bare; {100 * share_outside:.1f}% of train time outside forward/backward/step by that ratio)")
    profiled_share = engine["share_outside_fwd_bwd_profiled"]
    print(f"profiled epoch:  phases {', '.join(f'{k} {v:.2f} s' for k, v in engine['phases_seconds'].items())}"
          f" -> {100 * profiled_share:.1f}% outside forward/backward/step")
    print(f"per epoch: train {engine['train_seconds_epoch']:.2f} s for {engine['steps_per_epoch']} steps; "
          f"whole run (2 epochs + eval + checkpoints + plots) {engine['wall_seconds_total']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write(
                f"\n### {args.arch}, batch {args.batch_size}, {env['device']}"
                f"{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, CPU {env['cpu']} ({env['cpu_count']} cores, "
                f"ISA {' '.join(env['cpu_isa']) or 'unknown'}), python {env['python']}, torch {env['torch']}, "
                f"{env['torch_threads']} threads, load {env['load_average'][0]:.1f}\n\n"
                "| bare step images/s | engine images/s | engine / bare | outside fwd/bwd (profiled epoch) |\n"
                "|---|---|---|---|\n"
                f"| {bare:.1f} | {engine['images_per_s']:.1f} | {100 * result['engine_vs_bare']:.1f}% | "
                f"{100 * profiled_share:.1f}% |\n")
    return result


if __name__ == "__main__":
    main()
