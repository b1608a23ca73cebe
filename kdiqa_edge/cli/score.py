"""`kdiqa-edge score MODEL IMAGE|DIR...`: one line per image, torch-free."""

from __future__ import annotations

import contextlib
import csv
import enum
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from kdiqa_edge.runtime.files import IMAGE_SUFFIXES  # noqa: F401 - where this module had it
from kdiqa_edge.runtime.pipeline import MAX_WORKERS

Provider = Annotated[
    str | None,
    typer.Option("--provider", help="onnxruntime execution provider (cpu, cuda, tensorrt, coreml; default the "
                                    "best available), cpu/cuda for a checkpoint, cpu/gpu/ane for CoreML, OpenVINO's "
                                    "device for an .xml (CPU, GPU, NPU, AUTO; default CPU)."),
]
Threads = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for inference (ONNX Runtime, "
                                                                         "ExecuTorch's pool, torch).")]


Workers = Annotated[int | None, typer.Option(
    "--workers", min=1, max=MAX_WORKERS,
    help="Threads that decode and resize images while the model runs (default: the cores --threads leaves, all "
         f"of them without --threads; at most {MAX_WORKERS}: each keeps 4 decoded images in memory).")]


class Decode(str, enum.Enum):
    exact = "exact"  # every JPEG decoded at full size
    draft = "draft"  # libjpeg's DCT scaling (1/2, 1/4, 1/8) for JPEGs at least twice the input size


class MapKind(str, enum.Enum):
    fast = "fast"  # the artifact's score_map output (export --with-map): one pass
    patches = "patches"  # the model on a grid of overlapping crops: any model, one batch of crops per image


class OutputFormat(str, enum.Enum):
    text = "text"  # image<TAB>score, or image<TAB>error: reason; a tab or newline in either as \\t, \\n
    csv = "csv"  # image,score,error with a header
    json = "json"  # one {"image", "score", "error"} object per line


_TEXT_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})  # --format text: a row is a line
NOTHING_SCORED = 1  # exit status when no image was scored or a named path does not exist


def score(
    model: Annotated[Path, typer.Argument(help=".onnx, .engine/.plan, .mlpackage, .pte, checkpoint dir or run dir.")],
    images: Annotated[list[Path], typer.Argument(
        help="Image files and/or directories (searched recursively), or quoted patterns: 'photos/*.jpg', "
             "'photos/**/*.png'.",
        readable=False)],  # an unreadable one is a row with its reason, not the whole run refused
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per inference call.")] = 16,
    output: Annotated[OutputFormat, typer.Option(
        "--format", help="text: image<TAB>score, one line per file (a tab or newline in a name written as "
                         "\\t, \\n); csv: image,score,error; json: one object per line.")
    ] = OutputFormat.text,
    as_json: Annotated[bool, typer.Option("--json", help="Shorthand for --format json.")] = False,
    old_csv: Annotated[bool, typer.Option("--csv", hidden=True, help="Deprecated: --format csv.")] = False,
    provider: Provider = None,
    threads: Threads = None,
    workers: Workers = None,
    decode: Annotated[Decode | None, typer.Option(
        "--decode", help="JPEG decoding: draft (DCT-scaled, for JPEGs at least twice the input size) or exact "
                         "(full size). Default: what the model records, which its training cache used.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Write the rows to this .csv, .jsonl or .parquet in chunks, with progress on stderr; a "
                      "re-run with the same model goes on where it stopped (files matched by absolute path, "
                      "size and mtime, whichever way the path is typed; a row keeps the path as first typed).",
        rich_help_panel="Output file")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="--out: replace what it holds (another model's scores, another file).",
        rich_help_panel="Output file")] = False,
    retry_errors: Annotated[bool, typer.Option(
        "--retry-errors", help="--out: try again the files whose row is an error (unreadable then), though "
                               "unchanged since; their new rows replace the error rows.",
        rich_help_panel="Output file")] = False,
    chunk: Annotated[int, typer.Option(
        "--chunk", min=1, help="--out: rows per committed chunk (a kill loses at most the chunk in flight).",
        rich_help_panel="Output file")] = 1024,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="--out: no progress lines.",
                                        rich_help_panel="Output file")] = False,
    map_dir: Annotated[Path | None, typer.Option(
        "--map", help="Also write each image's local quality map into this folder: NAME.map.png (the map over "
                      "the photo, a colour scale 1..5, the global score in the corner) and NAME.map.npy (the map).",
        rich_help_panel="Quality maps")] = None,
    map_kind: Annotated[MapKind, typer.Option(
        "--map-kind", help="fast: the artifact's score_map output (export --with-map; a checkpoint has it too), "
                           "from the scoring pass's model; patches: the model on a 4x4 grid of overlapping crops "
                           "(any model).", rich_help_panel="Quality maps")] = MapKind.fast,
) -> None:
    """Score images with a quality model (1 = bad ... 5 = perfect). Unreadable images are reported, not fatal.

    Folders are searched recursively; every file that cannot be scored (unreadable, not an image, a dangling
    symlink, a folder that cannot be listed) gets a row with its error, and the summary counts it.

    Exit status: 0 when at least one image was scored (with --out: or has a score there from an earlier
    run), even if others were unreadable; 1 when no image was scored, or when a path named here does not
    exist (the others are still scored first); 2 for a model or option that cannot be used.

    Examples:

      kdiqa-edge score student.onnx photo.jpg

      kdiqa-edge score student.onnx photos/ --format csv > scores.csv

      kdiqa-edge score student.onnx /data/photos --out scores.parquet   # resumable: run it again after a stop

      kdiqa-edge score student.onnx photos/ --map maps/   # + maps/NAME.map.png and .npy (export --with-map)
    """
    from kdiqa_edge.cli.options import renamed
    from kdiqa_edge.errors import ConfigError
    from kdiqa_edge.runtime import QualityModel
    from kdiqa_edge.runtime.files import ImageFiles
    from kdiqa_edge.runtime.pipeline import default_workers

    output = renamed("--csv", "--format csv", OutputFormat.csv if old_csv else None, output)
    if as_json and output not in (OutputFormat.text, OutputFormat.json):
        raise ConfigError(f"--json and --format {output.value} are exclusive: pick one output format")
    output = OutputFormat.json if as_json else output
    if out is not None:
        _check_out_format(out, output)
    elif overwrite or retry_errors:
        raise ConfigError(f"{'--overwrite' if overwrite else '--retry-errors'} works on what --out holds: give "
                          "--out too")
    # ONNX Runtime's workers do not spin-wait between runs: the decode threads need those cores (measured in
    # benchmarks/results/score-*.md: 7% more images/s on 512 px JPEGs and on 12 MP photos, 2-vCPU EPYC)
    quality_model = QualityModel.load(model, provider=provider, threads=threads, spinning=False)
    for note in quality_model.notes:
        typer.secho(note, err=True, fg="yellow")
    if untrained := quality_model.info.not_pretrained_note(str(model)):
        typer.secho(f"note: {untrained}", err=True, fg="yellow")
    recorded = quality_model.preprocess.decode
    if decode is not None and decode.value != recorded:
        typer.secho(f"note: --decode {decode.value}: {model} records {recorded} decoding, the pixels its training "
                    "cache used; its scores may differ from those on its own decode", err=True, fg="yellow")
    # --map's overlays are PNGs: a --map inside a scored folder would be scored as photos by the next run
    run = _Run(quality_model, ImageFiles(images, exclude=[map_dir] if map_dir else ()), batch_size,
               workers or default_workers(threads),
               decode.value if decode else recorded)
    if map_dir is not None:
        from kdiqa_edge.runtime.maps import MapWriter

        run.maps = MapWriter(quality_model, map_dir, map_kind.value,  # a kind the model lacks: one line, now
                             decode.value if decode else None)
    with warnings.catch_warnings():  # entered before the decode threads start, left after they end
        # Pillow's warnings on a damaged file it still decodes ("Corrupt EXIF data", "Truncated File Read",
        # "Tag data larger than file") name no file and would scroll past by the hundred on a big folder: the
        # image is scored, and a file Pillow cannot use is a row with its reason
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        if out is None:
            run.to_stdout(output)
        else:
            run.to_file(out, model, overwrite, chunk, quiet, retry_errors)
    # a file skipped with an earlier run's error row has no score now either: a re-run of a run where every
    # file failed fails as it did
    scores = run.scored + run.skipped - run.skipped_failed
    typer.secho(summary_line(run.scored, run.failed, run.found.ignored, run.seconds, run.skipped,
                             run.skipped_failed), err=True, fg="yellow" if run.failed or not scores else None)
    if map_dir is not None:
        typer.secho(f"{run.mapped} {map_kind.value} maps in {map_dir} (NAME.map.png, NAME.map.npy; maps.csv says "
                    f"whose){'; not searched for images' if run.found.excluded else ''}", err=True)
    if run.found.missing or not scores:
        why = _missing(run.found.missing) if run.found.missing else "no image was scored"
        typer.secho(f"error: {why}", err=True, fg="red")
        raise typer.Exit(NOTHING_SCORED)


def _missing(paths: list[Path]) -> str:
    import glob

    patterns = [str(path) for path in paths if glob.has_magic(str(path))]
    plain = [str(path) for path in paths if not glob.has_magic(str(path))]
    return "; ".join([*([f"no such file or directory: {', '.join(plain)}"] if plain else []),
                      *([f"no file matches: {', '.join(patterns)}"] if patterns else [])])


def _check_out_format(out: Path, output: OutputFormat) -> None:
    from kdiqa_edge.errors import ConfigError
    from kdiqa_edge.runtime.output import output_kind

    kind = output_kind(out)
    if output is not OutputFormat.text and {"csv": "csv", "json": "jsonl"}[output.value] != kind:
        raise ConfigError(f"--format {output.value} and --out {out} disagree: --out's suffix sets the format")


class _Run:
    """One `score` run: the walk, the pipeline, the counts the summary line reports."""

    def __init__(self, quality_model, found, batch_size: int, workers: int, decode: str):
        self.model, self.found, self.batch_size = quality_model, found, batch_size
        self.workers, self.decode = workers, decode
        self.scored = self.failed = self.skipped = self.skipped_failed = self.mapped = 0
        self.seconds = 0.0
        self.maps = None  # a runtime.maps.MapWriter with --map

    def results(self, entries):
        import time

        from kdiqa_edge.runtime.pipeline import score_paths

        run = None
        if self.maps is not None and self.maps.kind == "fast":  # scores and fast maps from one run of a batch
            from kdiqa_edge.runtime.maps import predict_maps

            run = lambda pixels: predict_maps(self.model, pixels, batch_size=len(pixels))
        start = time.perf_counter()
        rendering = _Renders(self, run is not None)
        try:
            for decoded, result in score_paths(self.model, entries, self.batch_size, self.workers, self.decode,
                                               run=run):
                self.scored += result.error is None
                self.failed += result.error is not None
                if self.maps is not None and result.error is None:
                    rendering.add(result)
                yield decoded, result
            rendering.finish()
        finally:
            rendering.close()
            self.seconds = time.perf_counter() - start

    def _map(self, path: str, values=None, score: float | None = None) -> None:
        """The image's overlay and .npy (`values`: its fast map from the scoring run, else computed); a file
        that cannot be read again (it changed since) says why on stderr."""
        self._mapped(self.maps.write(path, values, score))

    def _mapped(self, row) -> None:
        if row.error is not None:
            typer.secho(f"{row.path}: no map: {row.error}", err=True, fg="yellow")
        else:
            self.mapped += 1

    def to_stdout(self, output: OutputFormat) -> None:
        with contextlib.suppress(AttributeError, ValueError):  # a file name's non-UTF-8 bytes go out as they are
            sys.stdout.reconfigure(errors="surrogateescape")
        writer = csv.writer(sys.stdout, lineterminator="\n") if output is OutputFormat.csv else None
        if writer:
            writer.writerow(["image", "score", "error"])
        for _, result in self.results(iter(self.found)):
            value = None if result.score is None else round(result.score, 6)
            if writer:
                writer.writerow([result.path, "" if value is None else f"{value:.6f}", result.error or ""])
            elif output is OutputFormat.json:
                sys.stdout.write(json.dumps({"image": result.path, "score": value, "error": result.error}) + "\n")
            else:  # one line per file: a tab or newline in a name (or a reason) is written as \t, \n
                path = result.path.translate(_TEXT_ESCAPES)
                sys.stdout.write(f"{path}\t{value:.4f}\n" if result.error is None
                                 else f"{path}\terror: {result.error.translate(_TEXT_ESCAPES)}\n")
            sys.stdout.flush()

    def to_file(self, out: Path, model: Path, overwrite: bool, chunk: int, quiet: bool,
                retry_errors: bool = False) -> None:
        """Rows to `out` in committed chunks, skipping what an earlier run with this model wrote there."""
        from kdiqa_edge.console import plural
        from kdiqa_edge.runtime.output import ScoresOutput, model_sha256
        from kdiqa_edge.runtime.registry_uri import is_registry_uri

        source = self.model.info.path if is_registry_uri(model) else model  # a registry's: its files, resolved
        identity = {"sha256": model_sha256(source), "name": model.name, "precision": self.model.info.precision,
                    "arch": self.model.info.arch}
        target = ScoresOutput(out, identity, self.decode, overwrite=overwrite, chunk_rows=chunk,
                              retry_errors=retry_errors)
        try:
            self._write(target, out, quiet)
        except KeyboardInterrupt:
            if target.state:  # opened: ScoresOutput's exit committed what was scored
                typer.secho(f"{out}: {target.state['rows']} rows kept; run the same command again to go on "
                            "(the files they cover are skipped)", err=True)
            raise
        if target.replaced:
            typer.secho(f"{plural(target.replaced, 'file')} scored again (changed since an earlier run, or "
                        "missing then): the new rows replace the old ones", err=True)
        if target.retried:
            typer.secho(f"--retry-errors: {plural(target.retried, 'file')} that failed before tried again, "
                        f"{target.recovered} scored now; the new rows replace the error rows", err=True)
        if self.skipped_failed:
            them = "it" if self.skipped_failed == 1 else "them"
            typer.secho(f"{plural(self.skipped_failed, 'file')} skipped with the error row of an earlier run "
                        f"(unchanged since): --retry-errors tries {them} again", err=True)
        typer.secho(f"{target.state['rows']} rows in {out} (model sha256 {identity['sha256'][:12]}, "
                    f"--decode {self.decode}; {target.state_path.name} beside it)", err=True)

    def _write(self, target, out: Path, quiet: bool) -> None:
        """The walk's unseen entries scored into `target` (a ScoresOutput), with progress."""
        from kdiqa_edge.console import Progress
        from kdiqa_edge.runtime.output import Row

        with target:
            total = None if quiet else sum(1 for _ in self._unseen(target, count=False))
            if target.resumed:
                typer.secho(f"{out}: {target.resumed} rows from an earlier run kept; files they cover are skipped",
                            err=True)
            with Progress("score", total, unit="images", enabled=not quiet) as bar:
                for decoded, result in self.results(self._unseen(target)):
                    target.add(Row(result.path, result.score, result.error, decoded.stamp))
                    bar.advance(1)

    def _unseen(self, target, count: bool = True):
        """The walk, less the entries `target` holds a row for (same path, size and mtime)."""
        from kdiqa_edge.runtime.pipeline import file_stamp

        for path, problem in self.found:
            if target.seen(str(path), None if problem else file_stamp(path)):
                failed = target.failed(str(path))
                self.skipped += count
                self.skipped_failed += count and failed
                if count and self.maps is not None and not failed and not self.maps.mapped(path):
                    self._map(str(path))  # --map asks a map of every image, scored in this run or before
                continue
            yield path, problem


class _Renders:
    """`score --map`'s writes. A fast map comes with its score from the scoring run: its overlay is rendered and
    its files written in threads (`--workers` of them; Pillow's resize and PNG encoding release the GIL),
    NAMEs claimed in walk order, results taken in that order, at most 2 x workers in flight. A patches map
    runs the model itself: written in line."""

    def __init__(self, scoring, threaded: bool):
        import collections
        from concurrent.futures import ThreadPoolExecutor

        self.scoring, self.pending = scoring, collections.deque()
        self.threads = max(1, scoring.workers or 1)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kdiqa-map") if threaded else None

    def add(self, result) -> None:
        if self.pool is None:
            self.scoring._map(result.path, result.score_map, result.score)
            return
        maps = self.scoring.maps
        name = maps.claim(result.path)
        self.pending.append(self.pool.submit(maps.write, result.path, result.score_map, result.score, name))
        while len(self.pending) > 2 * self.threads or (self.pending and self.pending[0].done()):
            self.scoring._mapped(self.pending.popleft().result())

    def finish(self) -> None:
        while self.pending:
            self.scoring._mapped(self.pending.popleft().result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def summary_line(scored: int, failed: int, ignored: int, seconds: float, skipped: int = 0,
                 skipped_failed: int = 0) -> str:
    """'120 scored, 0 unreadable in 3.2 s, 37.5 images/s': what score did, on stderr after the rows.
    `skipped_failed`: of the `skipped` files (a row in --out already), those whose row is an error."""
    rate = f", {scored / seconds:.1f} images/s" if scored and seconds > 0 else ""
    other = f"; {ignored} other files ignored (no image suffix)" if ignored else ""
    errors = f", {skipped_failed} of them unreadable then" if skipped_failed else ""
    done = f"; {skipped} skipped (in --out from an earlier run, unchanged{errors})" if skipped else ""
    return f"{scored} scored, {failed} unreadable in {seconds:.1f} s{rate}{done}{other}"


def register(app: typer.Typer) -> None:
    app.command("score", no_args_is_help=True)(score)
