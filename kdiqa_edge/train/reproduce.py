"""The paper's protocol: N seeded 80/20 splits, teacher fine-tune and distillation per split, medians.

    out/seed<k>/teacher/                 the teacher fine-tuned on split k (shared by every student)
    out/seed<k>/<student>-<variant>/     one distillation run
    out/results.json, table1.md, table2.md

Finished runs (a summary.json) are skipped, interrupted ones resumed, so the command can be re-run until
done. Medians follow the paper; means are reported beside them (LIQE and pyiqa report means).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdiqa_edge import paper
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import ConfigError
from kdiqa_edge.io import read_json, write_json, write_text
from kdiqa_edge.models.teacher import DEFAULT_TEACHER
from kdiqa_edge.train.schedules import parse_variant
from kdiqa_edge.train.state import recover_last, run_finished, run_interrupted

# Reference train-step throughput (images/s, batch 64) from the design card: H200, bf16, channels_last.
GPU_IMAGES_PER_S = {"ViT-B-32": 3118, "resnet18": 6511, "efficientnet_b0": 1896, "mobilevit_s": 1622,
                    "swin_tiny_patch4_window7_224": 1404}


@dataclasses.dataclass
class ReproduceConfig:
    students: list = dataclasses.field(default_factory=lambda: list(paper.STUDENTS))  # timm names
    variants: list = dataclasses.field(default_factory=lambda: ["full"])  # full, soft, hard, fixed:X, regression
    seeds: int = 5  # random 80/20 splits (seeds 0..N-1); the paper reports the median over several runs
    teacher: str = DEFAULT_TEACHER  # open_clip NAME:TAG, or tiny
    teacher_weights: str | None = None  # local open_clip weights file (offline machines)
    pretrained: bool = True  # ImageNet-pretrained students (the paper); False = random init
    epochs: int = 100  # student epochs (the paper's)
    teacher_epochs: int | None = None  # None = the same as epochs
    batch_size: int = 64
    device: str = "auto"
    progress: bool = True
    unlabeled: list = dataclasses.field(default_factory=list)  # unlabeled SOURCEs for every distillation
    unlabeled_fraction: float = 0.5  # share of each batch that is unlabeled
    loggers: list = dataclasses.field(default_factory=list)  # trackers for every run (train/trackers/)
    mlflow_uri: str | None = None  # MLflow tracking URI (else MLFLOW_TRACKING_URI, else MLflow's default)


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    seed: int
    stage: str  # teacher | distill
    student: str | None
    variant: str | None
    run_dir: Path

    @property
    def done(self) -> bool:
        return run_finished(self.run_dir)

    @property
    def interrupted(self) -> bool:
        return run_interrupted(self.run_dir)

    @property
    def name(self) -> str:
        return "teacher" if self.stage == "teacher" else f"{self.student}-{self.variant}"


def plan(cfg: ReproduceConfig, out: Path) -> list[PlannedRun]:
    if cfg.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    if not cfg.students:
        raise ConfigError("--students is empty")
    variants = [parse_variant(v).spec for v in cfg.variants]
    needs_teacher = any(parse_variant(v).uses_teacher_head for v in variants)
    runs: list[PlannedRun] = []
    for seed in range(cfg.seeds):
        seed_dir = out / f"seed{seed}"
        if needs_teacher:
            runs.append(PlannedRun(seed, "teacher", None, None, seed_dir / "teacher"))
        for student in cfg.students:
            for variant in variants:
                runs.append(PlannedRun(seed, "distill", student, variant,
                                       seed_dir / f"{student}-{variant.replace(':', '')}"))
    return runs


def _distill_config(cfg: ReproduceConfig, run: PlannedRun, teacher_dir: Path | None):
    from kdiqa_edge.train.distill import DistillConfig

    return DistillConfig(student=run.student, variant=run.variant, pretrained=cfg.pretrained,
                         teacher_checkpoint=str(teacher_dir / "checkpoints" / "best") if teacher_dir else None,
                         teacher=cfg.teacher, teacher_weights=cfg.teacher_weights, split_seed=run.seed,
                         seed=run.seed, epochs=cfg.epochs, batch_size=cfg.batch_size, device=cfg.device,
                         progress=cfg.progress, unlabeled=list(cfg.unlabeled) if parse_variant(
                             run.variant).uses_teacher_features else [],
                         unlabeled_fraction=cfg.unlabeled_fraction, loggers=list(cfg.loggers),
                         mlflow_uri=cfg.mlflow_uri)


def _finetune_config(cfg: ReproduceConfig, seed: int):
    from kdiqa_edge.train.finetune import FinetuneConfig

    return FinetuneConfig(teacher=cfg.teacher, teacher_weights=cfg.teacher_weights, split_seed=seed, seed=seed,
                          epochs=cfg.teacher_epochs or cfg.epochs, batch_size=cfg.batch_size, device=cfg.device,
                          progress=cfg.progress, loggers=list(cfg.loggers), mlflow_uri=cfg.mlflow_uri)


def estimate(cfg: ReproduceConfig, data: DatasetSpec, runs: list[PlannedRun]) -> dict[str, Any]:
    """How many images each run trains on, and a rough time from a measured (or reference) throughput."""
    from kdiqa_edge.data import load_dataset

    dataset = load_dataset(data)
    n_train = round(len(dataset.records) * 0.8)
    device = _device(cfg.device)
    size = teacher_image_size(cfg.teacher)  # the students take the teacher's preprocessing
    rates: dict[str, float | None] = {}
    todo = [r for r in runs if not r.done]
    total_s = 0.0
    unknown = []
    for run in todo:
        arch = cfg.teacher if run.stage == "teacher" else run.student
        epochs = (cfg.teacher_epochs or cfg.epochs) if run.stage == "teacher" else cfg.epochs
        if arch not in rates:
            rates[arch] = _throughput(arch, run.stage, device, size)
        if rates[arch]:
            mixed = run.stage == "distill" and cfg.unlabeled and parse_variant(run.variant).uses_teacher_features
            per_epoch = n_train / (1 - cfg.unlabeled_fraction) if mixed else n_train  # unlabeled ride along
            total_s += epochs * per_epoch / rates[arch]
        else:
            unknown.append(run.name)
    return {"images": len(dataset.records), "train_images": n_train, "device": device, "image_size": size,
            "images_per_s": rates, "runs_total": len(runs), "runs_todo": len(todo),
            "estimated_seconds": total_s, "unestimated": sorted(set(unknown))}


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _throughput(arch: str, stage: str, device: str, size: int) -> float | None:
    """Train-step images/s: the design card's H200 figures on CUDA at 224 px, else measured steps at batch 8."""
    base = arch.split(":")[0]
    if device.startswith("cuda") and base in GPU_IMAGES_PER_S and size == 224:
        return float(GPU_IMAGES_PER_S[base])
    try:
        return _measure(arch, stage, device, size)
    except Exception:  # noqa: BLE001 - an estimate must never stop a plan
        return None


def teacher_image_size(teacher: str) -> int:
    """The input size of a teacher, from its config alone (no weights are loaded)."""
    from kdiqa_edge.models.teacher import TEACHER_CONFIGS

    base = teacher.split(":")[0]
    if base in TEACHER_CONFIGS:
        size = TEACHER_CONFIGS.get(base)["vision_cfg"]["image_size"]
    else:
        import open_clip

        size = (open_clip.get_model_config(base) or {}).get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _measure(arch: str, stage: str, device: str, size: int, batch: int = 8) -> float:
    import torch

    if stage == "teacher":
        import open_clip

        from kdiqa_edge.models.teacher import TEACHER_CONFIGS, _create_registered

        base = arch.split(":")[0]
        model = (_create_registered(base)[0] if base in TEACHER_CONFIGS
                 else open_clip.create_model(base, pretrained=None)).visual
    else:
        import timm

        from kdiqa_edge.models.student import _size_kwargs

        model = timm.create_model(arch, num_classes=0, pretrained=False, **_size_kwargs(arch, size))
    model = model.to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = []
    for _ in range(3):  # the first step pays for allocation and kernel selection
        start = time.perf_counter()
        optimizer.zero_grad()
        model(x).float().mean().backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch / min(times)


PLAN_FILE = "reproduce.json"
# Fields that do not change what a run computes, so they may differ between calls on one --out.
_NOT_PLAN = ("device", "progress", "loggers", "mlflow_uri")


def record_plan(cfg: ReproduceConfig, data: DatasetSpec, out: Path) -> None:
    """Write reproduce.json, refusing an --out that holds another plan (its runs would be mixed with ours)."""
    ours = check_plan(cfg, data, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PLAN_FILE, ours)


def check_plan(cfg: ReproduceConfig, data: DatasetSpec, out: Path) -> dict[str, Any]:
    """The plan to record in --out; ConfigError where --out holds another one. Writes nothing, so a dry run
    refuses what the real run would.

    The dataset is recorded with absolute paths (the plan's jobs may run from any folder); both sides are
    compared as JSON reads them back (a range is a list), an older plan's relative paths resolved."""
    from kdiqa_edge.data.readers import absolute_spec

    check_runs(cfg)
    path = Path(out) / PLAN_FILE
    ours = json.loads(json.dumps({"config": dataclasses.asdict(cfg), "dataset": absolute_spec(data).to_dict()}))
    if path.is_file():
        theirs = read_json(path)
        defaults = json.loads(json.dumps(dataclasses.asdict(ReproduceConfig())))  # a field newer than the plan
        differ = [k for k in ours["config"] if k not in _NOT_PLAN
                  and theirs.get("config", {}).get(k, defaults[k]) != ours["config"][k]]
        differ += ["dataset"] if _plan_dataset(theirs, out).to_dict() != ours["dataset"] else []
        if differ:
            raise ConfigError(f"{out} was written by another plan (it differs in {', '.join(differ)}): "
                              "use the same options or another --out")
    return ours


def check_runs(cfg: ReproduceConfig) -> None:
    """Refuse, before the plan is recorded or any run starts, what would fail every run later: an unknown
    student (a name or tag) or teacher, an unusable --unlabeled source or fraction. Each distillation runs
    after its split's teacher fine-tune (hours of it), and a recorded plan kept the typo. Whether ImageNet
    weights can be had is each job's to say: a scheduler's nodes may reach what this one cannot."""
    from kdiqa_edge.data.unlabeled import check_source
    from kdiqa_edge.models.student import check_student
    from kdiqa_edge.models.teacher import check_teacher

    variants = [parse_variant(v) for v in cfg.variants]
    if any(v.uses_teacher_head for v in variants):
        check_teacher(cfg.teacher, cfg.teacher_weights)
    for student in cfg.students:
        check_student(student, pretrained=False)  # the name and tag only
    if cfg.unlabeled and any(v.uses_teacher_features for v in variants):
        if not 0.0 <= cfg.unlabeled_fraction < 1.0:
            raise ConfigError(f"--unlabeled-fraction must be within 0..1 (1 excluded: rated images train "
                              f"too), got {cfg.unlabeled_fraction}")
        for source in cfg.unlabeled:
            check_source(source)


def _plan_dataset(saved: dict, out: Path) -> DatasetSpec:
    """A plan's dataset with absolute paths (a plan written before paths were recorded absolute holds them
    relative to where it ran: tried against the folders above --out, then the current folder)."""
    from kdiqa_edge.data.readers import absolute_spec

    spec = DatasetSpec.from_dict(saved.get("dataset") or {})
    return absolute_spec(spec, list(Path(out).resolve().parents))


def load_plan(out: Path) -> tuple[ReproduceConfig, DatasetSpec]:
    """The config and dataset an --out was planned with (for jobs, --status and collection)."""
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{out} holds no reproduce plan ({PLAN_FILE} not found)")
    saved = read_json(path)
    return ReproduceConfig(**saved["config"]), _plan_dataset(saved, out)


def run_one(cfg: ReproduceConfig, data: DatasetSpec, out: Path, run: PlannedRun) -> dict[str, Any]:
    """Train one planned run in its run dir, resuming it when a train state is there."""
    from kdiqa_edge.train.distill import run_distill
    from kdiqa_edge.train.finetune import run_finetune

    recover_last(run.run_dir)  # (a scheduler's job comes here first) a kill cut a save short: resume from it
    if run.stage == "teacher":
        return run_finetune(_finetune_config(cfg, run.seed), data, run.run_dir, resume=run.interrupted)
    teacher_dir = out / f"seed{run.seed}" / "teacher" if parse_variant(run.variant).uses_teacher_head else None
    return run_distill(_distill_config(cfg, run, teacher_dir), data, run.run_dir, resume=run.interrupted)


def write_tables(runs: list[PlannedRun], data: DatasetSpec, out: Path) -> dict[str, Any]:
    results = collect(runs, data.name)
    write_json(out / "results.json", results)
    write_text(out / "table1.md", table_i_markdown(results))
    write_text(out / "table2.md", table_ii_markdown(results))
    return results


def run_reproduce(cfg: ReproduceConfig, data: DatasetSpec, out: str | Path, dry_run: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or, with dry_run, only plan) the protocol in this process; returns results.json's content."""
    out = Path(out)
    runs = plan(cfg, out)
    if dry_run:
        check_plan(cfg, data, out)
        return {"plan": [_row(r) for r in runs], "estimate": estimate(cfg, data, runs)}
    record_plan(cfg, data, out)
    for index, run in enumerate(runs, 1):
        head = f"[{index}/{len(runs)}] seed {run.seed} {run.name}"
        recover_last(run.run_dir)  # a save a kill cut short: resumed from its checkpoint, not trained afresh
        if run.done:
            log(f"{head}: done, skipped")
            continue
        log(f"{head}: {'resuming' if run.interrupted else 'starting'} -> {run.run_dir}")
        run_one(cfg, data, out, run)
    return write_tables(runs, data, out)


def _row(run: PlannedRun) -> dict[str, Any]:
    return {"seed": run.seed, "run": run.name, "dir": str(run.run_dir),
            "status": "done" if run.done else "interrupted" if run.interrupted else "todo"}


NOT_PRETRAINED = "not pretrained"  # how models/student.py and models/teacher.py label random-init weights


def collect(runs: list[PlannedRun], dataset: str) -> dict[str, Any]:
    """Per-run test metrics and their median/mean per (student, variant) and for the teacher; each row says
    whether random-init weights were in it (its own, or its teacher's) and on which split its checkpoints
    were chosen, from the runs' summaries."""
    groups: dict[str, list[dict]] = {}
    facts: dict[str, dict[str, set]] = {}
    for run in runs:
        if not run.done:
            continue
        summary = read_json(run.run_dir / "summary.json")
        test = summary.get("test")
        if test:
            groups.setdefault(run.name, []).append({"seed": run.seed, **test})
            seen = facts.setdefault(run.name, {"random": set(), "select": set(), "teacher": set()})
            own = summary.get("student") if run.stage == "distill" else summary.get("label")
            seen["random"] |= {"model"} if NOT_PRETRAINED in str(own or "") else set()
            seen["random"] |= {"teacher"} if NOT_PRETRAINED in str(summary.get("teacher") or "") else set()
            seen["select"].add(str(summary.get("select") or "?"))
            seen["teacher"].add(str((summary.get("label") if run.stage == "teacher" else summary.get("teacher"))
                                    or "-"))
    rows = []
    for name, values in groups.items():
        student, variant = (None, None) if name == "teacher" else _split_name(name, runs)
        seen = facts[name]
        row = {"run": name, "student": student, "variant": variant, "n": len(values), "runs": values,
               "not_pretrained": sorted(seen["random"]), "select": sorted(seen["select"]),
               "teacher": sorted(seen["teacher"])}
        for key in ("plcc", "plcc_fit", "srcc", "krcc", "rmse"):
            series = [v[key] for v in values]
            row[f"{key}_median"] = statistics.median(series)
            row[f"{key}_mean"] = statistics.fmean(series)
        rows.append(row)
    return {"dataset": dataset, "rows": rows}


def _row_name(row: dict[str, Any]) -> str:
    if row["run"] == "teacher":
        return f"teacher {', '.join(row.get('teacher') or ()) or 'CLIP'}, fine-tuned"
    return row["student"]


def _weights(row: dict[str, Any]) -> str:
    """A row's weights column: random init said as such (README: every output says so), its teacher's too."""
    random = set(row.get("not_pretrained") or ())
    if "model" in random:
        return NOT_PRETRAINED
    return f"teacher {NOT_PRETRAINED}" if "teacher" in random else "pretrained"


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    """What the reader must know before comparing the rows with the paper: random init, test-split selection."""
    notes = []
    if any(row.get("not_pretrained") for row in rows):
        notes.append(f"{NOT_PRETRAINED}: random-init weights (--no-pretrained, a tiny or :random teacher): a smoke "
                     "test of the pipeline, not the paper's setting; these figures are no IQA results.")
    selected = sorted({s for row in rows for s in row.get("select") or ()})
    if selected:
        on_test = any(s.startswith("test") for s in selected)
        notes.append(f"Best epoch chosen by: {', '.join(selected)}" + (
            " (no validation split: the epoch is picked on the test images it is scored on, as in the paper's "
            "protocol; optimistic against a held-out figure)" if on_test else "") + ".")
    return notes


def _split_name(name: str, runs: list[PlannedRun]) -> tuple[str, str]:
    run = next(r for r in runs if r.name == name)
    return run.student, run.variant


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table_i_markdown(results: dict[str, Any]) -> str:
    dataset = results["dataset"]
    lines = [f"# Table I — {dataset}: median PLCC / SRCC over the seeds (variant full)", "",
             "| model | runs | PLCC | SRCC | PLCC (fitted) | KRCC | paper PLCC | paper SRCC | weights |",
             "|---|---|---|---|---|---|---|---|---|"]
    shown = [row for row in results["rows"] if row["run"] == "teacher" or row["variant"] == "full"]
    for row in shown:
        published = paper.table_i(row["student"], dataset) if row["student"] else None
        lines.append(f"| {_row_name(row)} | {row['n']} | {_fmt(row['plcc_median'])} | {_fmt(row['srcc_median'])} | "
                     f"{_fmt(row['plcc_fit_median'])} | {_fmt(row['krcc_median'])} | "
                     f"{_fmt(published[0] if published else None)} | {_fmt(published[1] if published else None)} | "
                     f"{_weights(row)} |")
    lines += ["", "PLCC is raw (no fit), as in the paper's table; the fitted PLCC uses the 4-parameter logistic.",
              "Paper figures: Hou & Song, Table I (only for its four students and datasets csiq, live, koniq, spaq).",
              *_notes(shown)]
    return "\n".join(lines) + "\n"


def table_ii_markdown(results: dict[str, Any]) -> str:
    dataset = results["dataset"]
    lines = [f"# Table II — {dataset}: ablations, median PLCC over the seeds", "",
             "| student | variant | runs | PLCC | SRCC | paper PLCC | weights |", "|---|---|---|---|---|---|---|"]
    for row in sorted((r for r in results["rows"] if r["run"] != "teacher"),
                      key=lambda r: (r["student"], r["variant"])):
        published = paper.table_ii(row["student"], row["variant"], dataset)
        lines.append(f"| {_row_name(row)} | {row['variant']} | {row['n']} | {_fmt(row['plcc_median'])} | "
                     f"{_fmt(row['srcc_median'])} | {_fmt(published)} | {_weights(row)} |")
    lines += ["", "Variants: regression = plain regression head (paper row X); hard = hard labels only; "
              "soft = soft labels only; full = cosine-annealed soft/hard (paper +ours).",
              *_notes([r for r in results["rows"] if r["run"] != "teacher"])]
    return "\n".join(lines) + "\n"
