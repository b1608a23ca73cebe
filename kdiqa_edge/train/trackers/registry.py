"""An export in MLflow's model registry: `kdiqa-edge export ... --mlflow-register NAME`.

One MLflow run per registration holds the export's artifacts (each requested export's files, and its
export.log where the converters printed anything, under its OUT folder's name; manifest.json at the top), its
figures as metrics (`<label>/parity.max_abs_diff`, `<label>/drift.delta_srcc`,
`<label>/drift.latency.1.p50_ms`...) and params (target, precision, auto's pick, the checkpoint's content
hash). The chosen export, auto's pick where auto ran, becomes a new version of the registered model NAME:
its folder in that run is the version's source, and its tags name the file to load (`kdiqa_edge.file`), so
`QualityModel.load("models:/NAME/3")` finds it (`runtime/registry_uri.py`).
Where the checkpoint's run logged to the same MLflow store (its trackers.json), the export run goes into that
run's experiment as its child. The store is checked first (`mlflow.check_store`: one line, not minutes of
retries, for a server that does not answer) and MLflow's own chatter is held back (`mlflow.quiet`).
Torch-free; mlflow is imported when called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdiqa_edge.errors import ConfigError, require
from kdiqa_edge.io import read_json
from kdiqa_edge.train.trackers.base import EXTRA, flatten

EXPORTS_EXPERIMENT = "kdiqa-edge-exports"  # where exports of runs that logged to no MLflow store go
FILE_TAG = "kdiqa_edge.file"  # the version's tag naming the artifact to load, relative to its source folder
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Registered:
    name: str
    version: str
    run_id: str
    source: str  # runs:/<run id>/<folder>
    file: str  # the artifact in that folder
    label: str  # the export registered (`cpu-auto`)
    tracking_uri: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def chosen(requested: Sequence[str], exports: dict[str, Any] | None = None) -> str:
    """The one export a registration registers: the auto export where one was requested, else the only one.
    Without `exports` (before any work) it checks `requested` alone."""
    present = [label for label in requested if exports is None or (exports.get(label) or {}).get("files")]
    autos = [label for label in present if label.endswith("-auto")]
    if len(autos) == 1:
        return autos[0]
    if len(present) == 1:
        return present[0]
    if not present:
        raise ConfigError(f"--mlflow-register: no export of {', '.join(requested)} was written to register")
    raise ConfigError(f"--mlflow-register registers one model, and this export writes {', '.join(present)}: "
                      "export one target and precision, or --precision auto")


def register_export(out: str | Path, name: str, requested: Sequence[str], mlflow_uri: str | None = None,
                    log=print) -> Registered:
    """Log OUT's requested exports (from its manifest.json) to MLflow and register the chosen one as a new
    version of model `name`."""
    require("mlflow", EXTRA)
    from kdiqa_edge.train.trackers.mlflow import check_store, quiet

    out = Path(out)
    manifest = read_json(out / MANIFEST)
    label = chosen(requested, manifest.get("exports", {}))
    uri = check_store(mlflow_uri)
    with quiet():
        return _register(out, name, requested, manifest, label, uri, log)


def _register(out: Path, name: str, requested: Sequence[str], manifest: dict[str, Any], label: str, uri: str,
              log) -> Registered:
    """register_export's work, in `uri` (checked)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from kdiqa_edge.train.trackers.mlflow import experiment_id

    exports = manifest.get("exports", {})
    client = MlflowClient(tracking_uri=uri)
    checkpoint = manifest.get("checkpoint") or {}
    training = _training_run(checkpoint.get("path"), uri)
    experiment = training["experiment_id"] if training else experiment_id(client, EXPORTS_EXPERIMENT)
    tags = {"kdiqa_edge.export": str(out.resolve()), "kdiqa_edge.registered_as": name,
            **({"mlflow.parentRunId": training["run_id"]} if training else {})}
    run_id = client.create_run(experiment, run_name=f"export {out.name} {label}", tags=tags).info.run_id
    try:
        logged = [label] + [other for other in requested if other != label and (exports.get(other) or {}).get("files")]
        for each in logged:
            _log_export(client, run_id, out, exports[each])
        client.log_artifact(run_id, str(out / MANIFEST))
        _log_figures(client, run_id, {each: exports[each] for each in logged}, checkpoint)
        entry = exports[label]
        file = Path(entry["files"][0]["path"])
        folder = file.parent.as_posix()
        source = f"runs:/{run_id}/{folder}"
        try:
            client.create_registered_model(name, description="kdiqa-edge image-quality models")
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        version = client.create_model_version(
            name, source, run_id=run_id, description=f"{label} of {checkpoint.get('path', '?')}",
            tags={FILE_TAG: file.name, "kdiqa_edge.label": label, "kdiqa_edge.target": str(entry.get("target")),
                  "kdiqa_edge.precision": str(entry.get("precision")),
                  "kdiqa_edge.content_hash": str(checkpoint.get("content_hash"))})
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    registered = Registered(name, str(version.version), run_id, source, file.name, label, uri)
    log(f"registered {label} ({file.name}) as {registered.uri} in {uri} (run {run_id})")
    return registered


def _log_export(client, run_id: str, out: Path, entry: dict[str, Any]) -> None:
    """An export's files and its export.log, each under its path in OUT; an empty log (the converters printed
    nothing) is no artifact."""
    paths = [f["path"] for f in entry["files"]]
    if entry.get("log") and (out / entry["log"]).is_file() and (out / entry["log"]).stat().st_size:
        paths.append(entry["log"])
    for relative in paths:
        path = out / relative
        parent = Path(relative).parent.as_posix()
        if path.is_dir():  # an .mlpackage
            client.log_artifacts(run_id, str(path), relative)
        elif path.is_file():
            client.log_artifact(run_id, str(path), None if parent == "." else parent)


def _log_figures(client, run_id: str, entries: dict[str, dict[str, Any]], checkpoint: dict[str, Any]) -> None:
    import time

    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics, params = [], [Param("checkpoint.content_hash", str(checkpoint.get("content_hash"))),
                           Param("checkpoint.path", str(checkpoint.get("path")))]
    for label, entry in entries.items():
        for part in ("parity", "drift"):
            for key, value in flatten(entry.get(part) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics.append(Metric(f"{label}/{part}.{key}", float(value), now, 0))
        params += [Param(f"{label}.target", str(entry.get("target"))),
                   Param(f"{label}.precision", str(entry.get("precision")))]
        pick = ((entry.get("details") or {}).get("auto") or {}).get("pick")
        if pick:
            params.append(Param(f"{label}.pick", str(pick)))
    client.log_batch(run_id, metrics=metrics[:1000], params=params[:100])


def _training_run(checkpoint_path: str | None, uri: str) -> dict[str, Any] | None:
    """The MLflow run of the checkpoint's training run dir, where it logged to this same store."""
    if not checkpoint_path:
        return None
    folder = Path(checkpoint_path)
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    state_file = run_dir / "trackers.json"
    try:
        saved = read_json(state_file).get("mlflow") if state_file.is_file() else None
    except (OSError, ValueError):
        return None
    return saved if saved and saved.get("tracking_uri") == uri and saved.get("run_id") else None
