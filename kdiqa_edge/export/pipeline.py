"""Checkpoint -> artifacts for one or all targets, written atomically, with a manifest; re-runs are idempotent.

Each (target, precision) goes to `OUT/<target>-<precision>/`; `--precision auto` writes the measured pick to
`OUT/<target>-auto/` (export/auto.py). Each folder is built beside its final place and renamed in once its
target passed its checks, so a failure leaves no artifact of that target, partial or whole (only its log,
below); with several targets (`all`) the others go on and what they exported is kept and in the manifest.
`OUT/manifest.json` lists every file with its sha256, plus target, precision, input spec, preprocessing,
parity, drift and versions. A re-run with the same checkpoint, options and data skips the exports whose
files are intact, and first removes the staging folders of a killed run (`io.sweep_temporaries`: only those
no live process holds).

The converters' own output (coremltools, torch.onnx, torch.export, onnxruntime.quantization: their prints,
warnings and progress bars, C++ included) goes to `OUT/<target>-<precision>/export.log`, not the terminal;
a failed export keeps it as `OUT/<target>-<precision>.failed.log` and its error names that file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdiqa_edge.data.runs import RunData, run_data
from kdiqa_edge.data.spec import DatasetSpec
from kdiqa_edge.errors import ConfigError, DataError, KdiqaError, TensorRTUnavailable
from kdiqa_edge.export.base import GATE_FIELDS, TARGETS, Examples, ExportConfig, ExportResult

if TYPE_CHECKING:
    from kdiqa_edge.bench.gate import Figures, Gate, GateResult

MANIFEST = "manifest.json"
OUT_LOCK = ".kdiqa-export.lock"  # held by the one export writing OUT's folders and manifest
EXPORT_LOG = "export.log"
MANIFEST_FORMAT = "kdiqa-edge-export/1"
VERSION_PACKAGES = ("kdiqa-edge", "torch", "timm", "open_clip_torch", "onnx", "onnxruntime", "onnxslim",
                    "coremltools", "tensorrt", "executorch", "openvino", "nncf", "numpy")


def versions() -> dict[str, str]:
    import importlib.metadata
    import platform

    found = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def artifact_meta(model) -> dict[str, Any]:
    """The kdiqa_edge.* metadata every target writes (targets add input, outputs, precision, target)."""
    from kdiqa_edge import artifact

    meta = getattr(model, "meta", {}) or {}
    return {
        "format": artifact.FORMAT_VERSION,
        "preprocess": model.preprocess.to_dict(),
        "score_range": [1, 5],
        "prompts": meta.get("prompts"),
        "source": {"kind": meta.get("kind"), "arch": meta.get("arch"), "checkpoint_hash": meta.get("content_hash"),
                   "pretrained": meta.get("pretrained"), "variant": meta.get("head")},
        "versions": versions(),
    }


def load_examples(data: DatasetSpec, preprocess, cfg: ExportConfig, run: RunData | None = None,
                  progress: bool = True, log: Callable[[str], None] = print) -> Examples:
    """Calibration images from the TRAIN split, parity and drift images from the TEST split.

    The run's own split (its split.json) is used when it matches the dataset, so the test images are ones the
    model never saw; where it does not, the dataset is split as the run split it (its seed and fractions),
    else with `cfg.seed`.
    """
    from kdiqa_edge.data import Split, prepare

    how = ({"seed": run.split_seed, "val_fraction": run.val_fraction, "test_fraction": run.test_fraction,
            "split_by": run.split_by} if run is not None else {"seed": cfg.seed})
    cache, split = prepare(data, preprocess, progress=progress, **how)
    if run is not None and run.split_file is not None:
        try:
            split = Split.load(run.split_file).check(cache.dataset)
        except DataError as exc:
            log(f"note: not using {run.split_file} ({exc}); split with seed {how['seed']} instead")
    rng = np.random.default_rng(cfg.seed)
    train = np.sort(rng.permutation(np.asarray(split.train, dtype=np.int64))[:cfg.calib])
    test = np.asarray(split.test, dtype=np.int64)
    if len(test) > cfg.eval_images:
        test = np.sort(rng.choice(test, cfg.eval_images, replace=False))
    if len(test) < 3:
        raise DataError(f"the test split of {data.name} has {len(test)} images; parity and drift need at least 3")
    quantized = cfg.precision in ("int8", "auto")
    calib = cache.images[train] if quantized else cache.images[:0]
    if quantized and len(calib) == 0:
        raise ConfigError(f"{cfg.precision} needs calibration images, and the TRAIN split of {data.name} has none")
    return Examples(parity=np.asarray(cache.images[test[:cfg.parity_images]]), calib=np.asarray(calib),
                    test=np.asarray(cache.images[test]), test_mos=np.asarray(cache.mos[test], np.float64),
                    source=f"{data.name}: calib {len(calib)} train images, test {len(test)} images")


# Bumped when a fix changes what a reduced-precision export writes, so an export an earlier version made is
# rebuilt, not reused. 2: FP16's float head and score stay FP32 (they were rounded to FP16 between ops), INT8
# with --with-map keeps the head and its shared weights float, CoreML int8 keeps the head float. FP32 exports
# have not changed: they carry no revision, and are reused.
REVISION = 2
# A target's own revision where a fix changed its exports alone (the others keep their keys, and are reused):
# 3: CoreML int8 keeps the stem's conv float (--int8-stem float), ExecuTorch auto writes benchmark_on_device.sh.
TARGET_REVISIONS = {"coreml": 3, "executorch": 3}


def request_key(model_hash: str, cfg: ExportConfig, data: DatasetSpec, target: str) -> str:
    """What decides an export's content: same key, same artifact."""
    fields = {**dataclasses.asdict(cfg), "target": target}
    if cfg.precision != "fp32":
        fields["revision"] = TARGET_REVISIONS.get(target, REVISION)
    measured = cfg.precision == "auto"  # auto's pick depends on the measurement: on this CPU, at these threads
    for key in ("timing_cache",) if measured else ("latency_runs", "threads", "timing_cache"):
        fields.pop(key)
    for key in GATE_FIELDS:  # the gate judges the pick after it is made: the same artifact either way
        fields.pop(key)
    if measured:
        from kdiqa_edge.bench.environment import cpu_info

        fields["machine"] = cpu_info()
    else:  # options only auto reads do not change other exports
        for key in ("max_drift", "min_speedup", "candidates"):
            fields.pop(key)
    if cfg.precision != "int8":
        fields.pop("int8_recipe")
    if not cfg.with_map:  # the keys of exports without a map stay what they were before maps existed
        fields.pop("with_map")
    blob = json.dumps({"model": model_hash, "cfg": fields, "data": data.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_out(checkpoint: str | Path) -> Path:
    """`exports/<run name>`: where `export` writes without --out, one folder per run (so two runs' exports
    never meet); a checkpoint outside a run is named by its own folder."""
    from kdiqa_edge.data.runs import find_run_dir

    path = Path(checkpoint)
    return Path("exports") / (find_run_dir(path) or path).resolve().name


def read_manifest(out: Path) -> dict[str, Any]:
    from kdiqa_edge.io import read_json

    try:
        manifest = read_json(out / MANIFEST)
    except (OSError, ValueError):
        return {}
    return manifest if manifest.get("format") == MANIFEST_FORMAT else {}


def _intact(entry: dict[str, Any], out: Path) -> bool:
    from kdiqa_edge.io import sha256_file

    return bool(entry.get("files")) and all(
        (out / f["path"]).exists() and sha256_file(out / f["path"]) == f["sha256"] for f in entry["files"])


def _entry(result: ExportResult, staged: Path, folder: Path, out: Path, key: str, cfg: ExportConfig) -> dict[str, Any]:
    from kdiqa_edge.io import sha256_file

    files = []
    for path in result.files:
        final = folder / path.relative_to(staged)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        files.append({"path": str(final.relative_to(out)), "sha256": sha256_file(path), "bytes": size})
    return {"target": result.target, "precision": result.precision, "input": result.extra.get("input"),
            "request_key": key, "files": files, "threads": cfg.threads,  # what its checks and latencies ran on
            # the options it was built with: the manifest's own `config` is the last export's, and an entry
            # reused from an earlier one (another --calib, --input) was not built with those
            "config": dataclasses.asdict(cfg),
            "parity": result.parity, "drift": result.drift, "notes": result.notes, "details": result.extra,
            "engine_built": result.extra.get("engine_built"), "unavailable": result.unavailable,
            "log": str((folder / EXPORT_LOG).relative_to(out)) if (staged / EXPORT_LOG).is_file() else None}


def failed_log(out: Path, label: str) -> Path:
    """Where a failed export's converter output is kept (its staging folder is discarded)."""
    return out / f"{label}.failed.log"


def _export_target(target, label: str, model, examples: Examples, staged: Path, out: Path,
                   cfg: ExportConfig, meta: dict[str, Any], verbose: bool, progress: bool) -> ExportResult:
    """One target's export, its converters' output captured into staged/export.log (streamed too with
    `verbose`). On failure the log, where the converters said anything, is kept beside the folder and the error
    names it."""
    from kdiqa_edge.console import capture_output, quiet_progress

    try:
        with capture_output(staged / EXPORT_LOG, echo=verbose), quiet_progress(not progress):
            result = target.export(model, examples, staged, cfg, meta)
    except Exception as exc:
        kept = failed_log(out, label)
        if not (staged / EXPORT_LOG).is_file() or not (staged / EXPORT_LOG).stat().st_size:
            kept.unlink(missing_ok=True)  # the converters said nothing: no log to point at (an older one is stale)
            raise
        shutil.copyfile(staged / EXPORT_LOG, kept)
        named = _naming_log(exc, f"{label}: the converters' output is in {kept}")
        if named is exc:
            raise
        raise named from exc
    failed_log(out, label).unlink(missing_ok=True)  # an earlier failure's log is stale now
    return result


def _naming_log(exc: Exception, note: str) -> Exception:
    """`exc` with `note` in its message: a known error keeps its class (and exit code); anything else keeps
    its traceback and gets the note under it."""
    if isinstance(exc, KdiqaError):
        try:
            return type(exc)(f"{exc} ({note})")
        except TypeError:  # a subclass with its own constructor
            pass
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(note)
    return exc


def export_checkpoint(checkpoint: str | Path, cfg: ExportConfig, out: str | Path,
                      data: DatasetSpec | None = None, force: bool = False, progress: bool = True,
                      log: Callable[[str], None] = print, verbose: bool = False) -> dict[str, Any]:
    """Export `checkpoint` (checkpoint dir or run dir) per `cfg` into `out`; returns the manifest, with
    `run` added (not written): this run's `requested` labels and the ones `reused` as they were.

    Calibration, parity and drift images come from `data`; without one, from the dataset in the run's
    config.yaml (and its split.json), else from the synthetic set. The converters' output goes to each
    export's export.log; `verbose` streams it to stderr too.

    One OUT holds one checkpoint's exports: an OUT whose manifest names another checkpoint (another content
    hash) is refused, unless `force`, which replaces that checkpoint's exports there.
    Two exports into one OUT run one after the other (`manifest_lock`).
    Raises TensorRTUnavailable (after writing everything else) when the tensorrt target could not build.
    """
    from kdiqa_edge.export import auto
    from kdiqa_edge.models import load_checkpoint, resolve_checkpoint_dir

    cfg = cfg.validate()
    for name in cfg.targets():
        target = TARGETS.get(name)
        if cfg.precision == "auto" and not auto.supports_auto(target):
            raise ConfigError(f"target {name} has no --precision auto (it offers no candidates to measure)")
        if cfg.precision not in target.supports.precisions:
            raise ConfigError(f"target {name} does not support {cfg.precision}")
        getattr(TARGETS.get(name), "preflight", lambda cfg: None)(cfg)  # a missing runtime fails before any work
    checkpoint = Path(checkpoint)
    model = load_checkpoint(checkpoint)
    checkpoint_dir = resolve_checkpoint_dir(checkpoint)
    run = run_data(checkpoint)  # the run's dataset (its paths resolved from here) and split, if it was a run
    if data is None or data == DatasetSpec():  # no dataset named: the run's own, else the synthetic set
        data = run.dataset if run is not None else DatasetSpec()
        if run is None and cfg.precision != "fp32":  # as bench says: the drift (and auto's pick) is not on yours
            log(f"note: {checkpoint} is not in a run dir (no config.yaml naming its dataset): calibration and the "
                "drift check use the built-in synthetic set, NOT your data; pass the dataset options (--dataset, "
                "--root ...)")
    out = _out_folder(Path(out))
    with manifest_lock(out, log):
        return _export_into(out, model, checkpoint, checkpoint_dir, run, data, cfg, force, progress, log, verbose)


def _out_folder(out: Path) -> Path:
    """OUT, made where it is missing; one line where it cannot be a folder (a file, or under one)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder for the exports")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the export folder {out}: {exc.strerror or exc}") from None
    return out


@contextlib.contextmanager
def manifest_lock(out: Path, log: Callable[[str], None] = print):
    """One process at a time writes OUT (its folders and manifest.json): a second export into the same OUT
    waits for the first, then reads the manifest the first left (and reuses what it built)."""
    from kdiqa_edge.data._lock import waiting_lock

    with waiting_lock(out / OUT_LOCK, lambda who: log(f"{out}: another export is writing here{who}; waiting "
                                                      "for it to finish")):
        yield


def _export_into(out: Path, model, checkpoint: Path, checkpoint_dir: Path, run: RunData | None, data: DatasetSpec,
                 cfg: ExportConfig, force: bool, progress: bool, log: Callable[[str], None],
                 verbose: bool) -> dict[str, Any]:
    """export_checkpoint's work, under OUT's lock."""
    from kdiqa_edge.errors import first_line
    from kdiqa_edge.export import auto, evaluate
    from kdiqa_edge.io import atomic_path, sweep_temporaries, temporaries_in, write_json

    model_hash = model.meta.get("content_hash", "")
    manifest = read_manifest(out)
    replaced = other_checkpoint(manifest, model_hash, checkpoint_dir, out, force)
    # staging folders and manifests a killed export left (never a live one's; OUT may hold the user's files too)
    sweep_temporaries(out, unclaimed=[f"{name}-" for name in TARGETS.names()] + [MANIFEST])
    exports: dict[str, Any] = {} if replaced else {name: entry for name, entry in manifest.get("exports", {}).items()
                                                   if _intact(entry, out)}

    todo, reused = {}, []
    for name in cfg.targets():
        label, key = f"{name}-{cfg.precision}", request_key(model_hash, cfg, data, name)
        entry = exports.get(label)
        if (force or entry is None or entry.get("request_key") != key
                or (entry.get("unavailable") and _runtime_here(TARGETS.get(name)))):
            todo[name] = (label, key)
        else:
            reused.append(label)
            delta = (entry.get("drift") or {}).get("delta_srcc")
            if cfg.precision != "auto" and isinstance(delta, (int, float)):  # auto's bound is in its key
                exports[label] = {**entry, "notes": evaluate.rejudged(entry.get("notes", []), delta, cfg.max_drift)}

    def write_manifest() -> dict[str, Any]:
        manifest = _manifest(model, checkpoint_dir, cfg, data, exports)
        write_json(out / MANIFEST, manifest)
        return manifest

    failures: list[tuple[str, Exception]] = []
    if todo:
        examples = load_examples(data, model.preprocess, cfg, run, progress, log)
        meta = artifact_meta(model)
        with temporaries_in(out):  # libraries' scratch files: swept after a kill, not /tmp
            for name, (label, key) in todo.items():
                try:
                    with atomic_path(out / label) as staged:  # renamed in whole, once its checks passed
                        staged.mkdir()
                        log(f"{label}: exporting...")
                        target = auto.Auto(TARGETS.get(name), log) if cfg.precision == "auto" else TARGETS.get(name)
                        result = _export_target(target, label, model, examples, staged, out, cfg, meta, verbose,
                                                progress)
                        entry = _entry(result, staged, out / label, out, key, cfg)
                except Exception as exc:
                    if len(todo) == 1:
                        raise
                    failures.append((label, exc))  # --target all: the others go on, and what landed is kept
                    log(f"{label}: failed: {first_line(exc)}")
                    continue
                exports[label] = entry
                if len(todo) > 1:  # recorded as it lands: a later target's failure or a kill keeps it
                    write_manifest()
    if replaced:
        _remove_replaced(replaced, exports, out, log)
    manifest = write_manifest()
    if failures:
        raise _failed(failures, [label for label, _ in todo.values() if label in exports], out)
    requested = [f"{name}-{cfg.precision}" for name in cfg.targets()]
    unavailable = [exports[label]["unavailable"] for label in sorted(requested) if exports[label].get("unavailable")]
    if unavailable:
        raise TensorRTUnavailable(unavailable[0])
    return {**manifest, "run": {"requested": requested, "reused": reused}}


def _failed(failures: list[tuple[str, Exception]], done: list[str], out: Path) -> Exception:
    """The error of a multi-target run some of whose targets failed; the ones that succeeded are in OUT and in
    its manifest. Known errors become one ExportError line naming each; a bug keeps its traceback."""
    from kdiqa_edge.errors import ExportError

    landed = f"exported to {out}: {', '.join(done)}" if done else "nothing else was exported"
    bug = next((exc for _, exc in failures if not isinstance(exc, KdiqaError)), None)
    if bug is not None:
        return _naming_log(bug, landed)
    return ExportError(f"{'; '.join(f'{label}: {exc}' for label, exc in failures)} ({landed})")


def _manifest(model, checkpoint_dir: Path, cfg: ExportConfig, data: DatasetSpec,
              exports: dict[str, Any]) -> dict[str, Any]:
    from kdiqa_edge.bench.environment import cpu_info

    model_hash = model.meta.get("content_hash", "")
    return {
        "format": MANIFEST_FORMAT,
        # absolute: a path relative to where this export ran means nothing to a later one run elsewhere
        "checkpoint": {"path": os.path.abspath(checkpoint_dir), "kind": model.meta.get("kind"),
                       "arch": model.meta.get("arch"), "content_hash": model_hash, "head": model.meta.get("head")},
        "preprocess": model.preprocess.to_dict(),
        "config": dataclasses.asdict(cfg),
        "data": data.to_dict(),
        "versions": versions(),
        "machine": cpu_info(),  # the CPU this run measured latencies on (INT8 speed depends on its ISA)
        "exports": dict(sorted(exports.items())),
    }


def _runtime_here(target) -> bool:
    """Whether a target whose runtime was missing when it exported (only its inputs written: the TensorRT-ready
    ONNX and trtexec.sh) could build more now: its `missing()` says None, or it cannot say. Where it still
    cannot, the written inputs are up to date and reused."""
    missing = getattr(target, "missing", None)
    return not callable(missing) or missing() is None


def other_checkpoint(manifest: dict[str, Any], model_hash: str, checkpoint_dir: Path, out: Path,
                     force: bool) -> dict[str, Any] | None:
    """The manifest's checkpoint where OUT holds another checkpoint's exports (another content hash); that is
    refused in one line unless `force`. None where OUT is new, or holds this checkpoint's exports."""
    held = manifest.get("checkpoint") or {}
    other_hash = held.get("content_hash")
    if not manifest.get("exports") or not other_hash or not model_hash or other_hash == model_hash:
        return None
    if force:
        return {**held, "exports": sorted(manifest["exports"])}
    path = held.get("path") or "?"
    same_path = Path(path).resolve() == checkpoint_dir.resolve()
    which = f"an earlier checkpoint of {path}" if same_path else f"another checkpoint, {path}"
    raise ConfigError(f"{out} holds the exports of {which} (content hash {other_hash[:12]}, this one "
                      f"{model_hash[:12]}); export to another folder with --out DIR, or replace them with --force")


def _remove_replaced(replaced: dict[str, Any], exports: dict[str, Any], out: Path,
                     log: Callable[[str], None]) -> None:
    """--force over another checkpoint's OUT: its export folders this run did not rewrite go (OUT holds one
    checkpoint's exports, and its manifest names that one)."""
    gone = [label for label in replaced["exports"] if label not in exports]
    for label in gone:
        if (out / label).is_dir():
            shutil.rmtree(out / label)
    log(f"{out}: replaced the exports of {replaced.get('path')} (--force)"
        + (f"; removed its {', '.join(gone)}" if gone else ""))


# --- the release gate on an auto export's pick (bench/gate.py) ----------------------------------------------


def pick_figures(label: str, entry: dict[str, Any]) -> Figures:
    """What an auto export's manifest entry measured for its pick, as the gate reads it: SRCC and PLCC on the
    test split, |ΔSRCC| vs the reference, p50 at batch 1 (the runoff's where one ran at batch 1) and the size of
    its model files (an IR with its .bin; not the phone script beside a .pte)."""
    from kdiqa_edge.bench.gate import Figures

    drift = entry.get("drift") or {}
    auto = (entry.get("details") or {}).get("auto") or {}
    row = next((c for c in auto.get("candidates", []) if c.get("name") == auto.get("pick")), {})
    at1 = (row.get("runoff") or {}).get("1") or (row.get("latency") or {}).get("1") or {}
    number = lambda value: float(value) if isinstance(value, (int, float)) else None
    model_files = [f for f in entry.get("files", []) if not f.get("path", "").endswith(".sh")]  # not a script
    return Figures(f"{label} ({auto.get('pick', '?')})", srcc=number(drift.get("srcc")),
                   plcc=number(drift.get("plcc")), delta_srcc=number(drift.get("delta_srcc")),
                   p50_ms=number(at1.get("p50_ms")),
                   size_mb=sum(f.get("bytes", 0) for f in model_files) / 1e6 if model_files else None)


def gate_exports(out: Path, labels: list[str], gate: Gate | None,
                 log: Callable[[str], None] = print) -> GateResult | None:
    """Judge the pick of each auto export in `labels` against `gate`, and record the verdict in OUT's manifest
    (each entry's `gate`: the bounds, whether it passed, its violations; under `manifest_lock`), replacing an
    earlier run's. Without a gate, an earlier run's verdict goes: a CI reading the manifest must not find a
    verdict nobody asked for."""
    with manifest_lock(out, log):
        return _gate_manifest(out / MANIFEST, labels, gate)


def _gate_manifest(manifest_file: Path, labels: list[str], gate: Gate | None) -> GateResult | None:
    from kdiqa_edge.io import read_json, write_json

    manifest = read_json(manifest_file)
    exports = manifest["exports"]
    if gate is None:
        if any("gate" in exports.get(label, {}) for label in labels):
            for label in labels:
                exports.get(label, {}).pop("gate", None)
            write_json(manifest_file, manifest)
        return None
    result = gate.check([pick_figures(label, exports[label]) for label in labels])
    for label, figures in zip(labels, result.rows):
        own = [v.to_dict() for v in result.violations if v.row == figures]
        exports[label]["gate"] = {"bounds": result.bounds, "passed": not own, "violations": own}
    write_json(manifest_file, manifest)
    return result
