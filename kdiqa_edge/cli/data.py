"""`kdiqa-edge data index|info|synth`: look at a dataset the way training will see it."""

from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path
from typing import Annotated

import typer

from kdiqa_edge.cli.options import OldSeed, SplitSeed, dataset_options, renamed
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import DataError

data_app = typer.Typer(
    help="Dataset tools: a normalized index, a summary, the built-in synthetic set.",
    no_args_is_help=True,
)

ValFraction = Annotated[float, typer.Option("--val-fraction", help="Share of images held out for validation.")]
TestFraction = Annotated[float, typer.Option("--test-fraction", help="Share of images held out for testing.")]
SplitBy = Annotated[
    str, typer.Option("--split-by", help="auto (by reference where refs exist, else by image), ref, image, "
                      "or official (KonIQ's own split).")
]
Decode = Annotated[
    bool, typer.Option("--decode", help="Also decode every image into the image cache (finds unreadable files; "
                       "the cache is reused by training).")
]


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("index")
@dataset_options
def index_command(
    data: DatasetSpec,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the index CSV.")] = Path("index.csv"),
    split_seed: SplitSeed = 0,
    old_seed: OldSeed = None,
    val_fraction: ValFraction = 0.0,
    test_fraction: TestFraction = 0.2,
    split_by: SplitBy = "auto",
    decode: Decode = False,
) -> None:
    """Write the normalized index: image (relative to the root), mos (1..5, higher better), raw, ref, split.

    Skipped files go to skipped.csv beside the index, with their reasons.

    Example: kdiqa-edge data index --dataset koniq --root ~/data/koniq10k --out koniq.csv
    """
    from kdiqa_edge.data import write_skipped

    seed = renamed("--seed", "--split-seed", old_seed, split_seed)
    dataset, split = _load(data, seed, val_fraction, test_fraction, split_by, decode)
    parts = split.assignment(len(dataset.records))
    _write_index(out, dataset, parts)
    line = f"indexed {len(dataset)} images ({_sizes(split)}) -> {out}"
    if dataset.skipped:
        skipped_path = write_skipped(out.parent / "skipped.csv", dataset.skipped)
        line += f"; {_summary(dataset.skipped)} (see {skipped_path})"
    typer.echo(line)


@data_app.command("info")
@dataset_options
def info_command(
    data: DatasetSpec,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
    split_seed: SplitSeed = 0,
    old_seed: OldSeed = None,
    val_fraction: ValFraction = 0.0,
    test_fraction: TestFraction = 0.2,
    split_by: SplitBy = "auto",
    decode: Decode = False,
) -> None:
    """Counts, raw and normalized score ranges, direction, references, split sizes, skipped files.

    Example: kdiqa-edge data info --dataset live --root ~/data/databaserelease2 --json
    """
    seed = renamed("--seed", "--split-seed", old_seed, split_seed)
    try:
        dataset, split = _load(data, seed, val_fraction, test_fraction, split_by, decode)
        split_problem = None
    except _SplitFailed as failed:  # still worth a summary: say why there is no split
        dataset, split, split_problem = failed.dataset, None, str(failed.__cause__)
    info = dataset_info(dataset, split)
    if split_problem:
        info["split"] = {"error": split_problem}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"dataset     {info['dataset']} at {info['root']}")
    typer.echo(f"images      {info['images']}" + (f" ({info['dropped']} dropped by convention)" if info["dropped"] else ""))
    typer.echo(f"raw score   {info['raw_min']:g} .. {info['raw_max']:g} (nominal {info['raw_range'][0]:g} .. "
               f"{info['raw_range'][1]:g}, {info['direction']})")
    typer.echo(f"mos (1..5)  {info['mos_min']:.3f} .. {info['mos_max']:.3f}, mean {info['mos_mean']:.3f}")
    typer.echo(f"references  {info['refs']}")
    typer.echo(f"split       {_sizes(split)} (by {split.by}, seed {split.seed})" if split else
               f"split       none: {split_problem}")
    typer.echo(f"skipped     {_summary(dataset.skipped)}")
    for skip in dataset.skipped[:10]:
        typer.echo(f"  {skip.image}: {skip.reason}")
    if len(dataset.skipped) > 10:
        typer.echo(f"  ... and {len(dataset.skipped) - 10} more (kdiqa-edge data index writes them all to skipped.csv)")


@data_app.command("synth")
def synth_command(
    out: Annotated[Path, typer.Argument(help="Folder to write (new, empty, or an earlier synthetic set).")],
    refs: Annotated[int, typer.Option("--refs", help="Number of reference contents (30 images each).")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the crops and the noise.")] = 0,
    size: Annotated[str, typer.Option("--size", help="WIDTHxHEIGHT of every image; match a small model's input "
                                                     "(e.g. 86x64) so it can see the distortions.")] = "320x240",
) -> None:
    """Generate the built-in synthetic IQA set: scikit-image photos x 6 distortions x 5 levels, SSIM pseudo-MOS.

    Example: kdiqa-edge data synth ./synthetic --refs 4
    """
    from kdiqa_edge.console import plural
    from kdiqa_edge.data import synthetic
    from kdiqa_edge.errors import ConfigError

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must be WIDTHxHEIGHT (e.g. 86x64), got {size!r}") from None
    synthetic.generate(out, refs=refs, seed=seed, progress=True, size=(width, height))
    count = refs * len(synthetic.DISTORTIONS) * synthetic.LEVELS
    typer.echo(f"wrote {count} images from {plural(refs, 'reference')} to {out} (scores.csv, README)")


def _load(data: DatasetSpec, seed: int, val_fraction: float, test_fraction: float, split_by: str, decode: bool):
    from kdiqa_edge.data import ImageCache, load_dataset, make_split

    dataset = load_dataset(data)
    if decode:
        dataset = ImageCache.build(dataset, strict=data.strict).dataset
    try:
        split = make_split(dataset, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction, by=split_by)
    except DataError as exc:
        raise _SplitFailed(dataset) from exc
    return dataset, split


class _SplitFailed(DataError):
    """The dataset loaded but cannot be split as asked (`info` still reports it; `index` fails)."""

    def __init__(self, dataset):
        self.dataset = dataset
        super().__init__("")

    def __str__(self) -> str:
        return str(self.__cause__)


def dataset_info(dataset, split) -> dict:
    import numpy as np

    raw = np.asarray([r.raw for r in dataset.records], dtype=np.float64)
    mos = np.asarray([r.mos for r in dataset.records], dtype=np.float64)
    reasons: dict[str, int] = {}
    for skip in dataset.skipped:
        reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
    return {
        "dataset": dataset.name, "root": str(dataset.root), "images": len(dataset), "dropped": dataset.dropped,
        "raw_range": list(dataset.raw_range), "raw_min": float(raw.min()), "raw_max": float(raw.max()),
        "direction": "lower is better (DMOS)" if dataset.lower_better else "higher is better",
        "mos_min": float(mos.min()), "mos_max": float(mos.max()), "mos_mean": float(mos.mean()),
        "refs": len(dataset.refs),
        "split": {**split.sizes(), "by": split.by, "seed": split.seed} if split is not None else None,
        "skipped": len(dataset.skipped), "skipped_reasons": reasons,
        "skipped_files": [[s.image, s.reason] for s in dataset.skipped],
    }


def _write_index(out: Path, dataset, parts: list[str]) -> None:
    from kdiqa_edge.io import write_text

    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "mos", "raw", "ref", "split", "distortion", "level", "official"])
    for record, part in zip(dataset.records, parts):
        writer.writerow([record.image, f"{record.mos:.6f}", f"{record.raw:.6g}", record.ref or "", part,
                         record.distortion or "", "" if record.level is None else record.level,
                         record.official or ""])
    write_text(out, buffer.getvalue())


def _sizes(split) -> str:
    sizes = split.sizes()
    return " / ".join(f"{name} {n}" for name, n in sizes.items() if n or name != "val")


def _summary(skipped) -> str:
    from kdiqa_edge.data import skip_summary

    return skip_summary(skipped)

