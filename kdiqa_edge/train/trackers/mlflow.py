"""MLflow: one run per run dir through MlflowClient (no global active run, so several runs in one process,
as a reproduce sweep has, stay apart).

Where: --mlflow-uri, else MLFLOW_TRACKING_URI, else MLflow's own default (MLflow 3: sqlite:///mlflow.db in the
current folder, or ./mlruns where that folder already holds one); a server URL works the same. `check_store`
(`preflight`, before any work) refuses in one line a URI MLflow has no store for, a folder without MLflow 3's
opt-in (MLFLOW_ALLOW_FILE_STORE=true) and a server that does not answer one quick request. The URI is made
absolute and kept in trackers.json, so `--resume` from any folder reopens the same run; a resume given another
--mlflow-uri goes on as a new run there (a run id lives in one store). Experiment: the dataset and the model
(`koniq-resnet18`); run name: the run dir's name; tags: split seed, student, variant. MLflow's own logging
below ERROR and its progress bars are held back while we drive it (`quiet`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from kdiqa_edge.errors import ConfigError, first_line
from kdiqa_edge.train.trackers.base import TRACKERS, RunInfo, final_metrics, note

STEP_KEY = "train/loss"  # logged at every step: its history says how far a reopened run got
BATCH = 1000  # MLflow's limit of metrics per log_batch call
PARAM_BATCH = 100  # ... of params per call
PARAM_LENGTH = 6000  # ... of characters in a param's value
PROBE_TIMEOUT_S = 5  # one request, no retries: a server that does not answer is refused before any work
# MLflow's own tracking stores (a plugin's come from its entry points); a database may name its driver
# (postgresql+psycopg2://)
SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


@contextlib.contextmanager
def quiet():
    """While we drive MLflow: its logging below ERROR ("Creating initial MLflow database tables...") and its
    artifact progress bars held back. Also a decorator."""
    import mlflow  # noqa: F401 - its import sets its loggers' levels: before ours

    from kdiqa_edge.console import quiet_logger

    with quiet_logger("mlflow"), _environ(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        yield


@contextlib.contextmanager
def _environ(**values: str):
    """MLflow's settings are environment variables, read at each call: these values inside the block."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI a run goes to, absolute where it is local: `uri`, MLFLOW_TRACKING_URI, MLflow's default."""
    if not uri:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    return absolute_uri(uri)


def absolute_uri(uri: str) -> str:
    """A folder or a relative sqlite file made absolute (a resumed run may start in another folder)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri and not uri.startswith("file:"):
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def check_store(uri: str | None = None, source: str | None = None) -> str:
    """The store a run would log to (`uri`, else MLFLOW_TRACKING_URI, else MLflow's default), absolute, once
    MLflow can use it; else a one-line ConfigError naming what to pass instead. `source`: how the error names
    the URI (default: where it came from)."""
    resolved = tracking_uri(uri)
    if source is None:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        source = (f"--mlflow-uri {uri}" if uri else f"MLFLOW_TRACKING_URI={env}" if env
                  else f"MLflow's default store {resolved}")
    scheme = urlparse(resolved).scheme.lower()
    if scheme == "file":
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

        if not MLFLOW_ALLOW_FILE_STORE.get():
            folder = Path(url2pathname(urlparse(resolved).path))
            raise ConfigError(f"{source} is a folder, and MLflow 3 keeps runs in a folder only with "
                              "MLFLOW_ALLOW_FILE_STORE=true (its file store is deprecated); use a database "
                              f"in it instead: --mlflow-uri sqlite:///{folder / 'mlflow.db'}")
    elif scheme.split("+")[0] not in SCHEMES + _plugin_schemes():
        raise ConfigError(f"{source}: MLflow has no tracking store for {scheme or 'this'}:// URIs; use a "
                          "tracking server (http://HOST:PORT, https://...), a database (sqlite:///PATH.db, "
                          "postgresql://, mysql://, mssql://) or databricks")
    elif scheme in ("http", "https"):
        _probe(resolved, source)
    return resolved


def _plugin_schemes() -> tuple[str, ...]:
    from importlib.metadata import entry_points

    return tuple(entry.name for entry in entry_points(group="mlflow.tracking_store"))


def _probe(uri: str, source: str) -> None:
    """One request to the server, `PROBE_TIMEOUT_S` at most and no retries (MLflow's defaults: 7 retries,
    120 s each, some 4 minutes of waiting for a server that is not there)."""
    from mlflow import MlflowClient

    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}
    with quiet(), _environ(**limits):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # whatever stops this request would stop the run
            raise ConfigError(f"{source}: no MLflow tracking server answers there ({_reason(exc)}); start "
                              "it, or pass another --mlflow-uri") from exc


def _reason(exc: Exception) -> str:
    """Why a request failed, in short: the socket's error, the HTTP status or the time-out, else its first
    line."""
    text = str(exc)
    if "timed out" in text.lower():
        return f"no answer in {PROBE_TIMEOUT_S} s"
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", text) or re.search(r"error code (\d+)", text)
    if found is None:
        return first_line(exc, limit=300, typed=True)
    return found.group(0) if found.group(0).startswith("[") else f"HTTP {found.group(1)}"


def _same_store(given: str | None, saved: Mapping[str, Any]) -> bool:
    """Does a resume's --mlflow-uri (None: not given) name the store its run logged to? The same text (a
    relative path is resolved where each command ran) or the same absolute URI."""
    return not given or given == saved.get("uri_given") or absolute_uri(given) == saved.get("tracking_uri")


def experiment_id(client, name: str) -> str:
    """The experiment called `name`, created if missing (two runs of a sweep may race to create it)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@TRACKERS.register("mlflow")
class MlflowTracker:
    name = "mlflow"
    package = "mlflow"
    preflight = staticmethod(check_store)  # check_loggers: the store, before any work
    run_id: str | None = None

    @quiet()
    def start(self, run: RunInfo, saved: Mapping[str, Any] | None, next_step: int) -> dict[str, Any]:
        from mlflow import MlflowClient

        saved = self._continued(run, saved)
        # a server gone since the preflight (or, on resume, since the run began): one quick failure
        uri = check_store(saved["tracking_uri"], f"the run's store {saved['tracking_uri']}") if saved \
            else check_store(run.mlflow_uri)
        self.client = MlflowClient(tracking_uri=uri)
        if saved:
            self.run_id, experiment = saved["run_id"], saved["experiment_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return {**saved, "uri_given": saved.get("uri_given", run.mlflow_uri)}
        experiment = experiment_id(self.client, run.experiment)
        tags = {**run.tags, "kdiqa_edge.run_dir": str(run.run_dir)}
        self.run_id = self.client.create_run(experiment, run_name=run.name, tags=tags).info.run_id
        try:
            self._params(run.hparams)
            self.client.log_dict(self.run_id, run.config, "config.yaml")
        except BaseException:  # Ctrl-C before trackers.json holds it: a --resume makes it afresh, so no twin
            with contextlib.suppress(Exception):
                self.client.delete_run(self.run_id)
            self.run_id = None
            raise
        return {"tracking_uri": uri, "experiment_id": experiment, "run_id": self.run_id,
                "uri_given": run.mlflow_uri}

    def _continued(self, run: RunInfo, saved: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """`saved` where this session continues that run; None where a resume's --mlflow-uri names another
        store (a new run there). Either way one line where the user may expect the other."""
        if saved and not _same_store(run.mlflow_uri, saved):
            note(self.name, f"--mlflow-uri {run.mlflow_uri} is not the store this run logged to "
                            f"({saved['tracking_uri']}): it goes on there as a new run (a run id lives in "
                            "one store)")
            return None
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if saved and not run.mlflow_uri and env and absolute_uri(env) != saved["tracking_uri"]:
            note(self.name, f"continuing run {saved['run_id']} in {saved['tracking_uri']}, where it began, "
                            "not in MLFLOW_TRACKING_URI (--mlflow-uri moves it there as a new run)")
        return saved

    @quiet()
    def _params(self, hparams: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:PARAM_LENGTH]) for key, value in hparams.items()]
        for i in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + PARAM_BATCH])

    @quiet()
    def held_step(self) -> int | None:
        history = self.client.get_metric_history(self.run_id, STEP_KEY)
        return max((m.step for m in history), default=None)

    @quiet()
    def log(self, points: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, step) for step, values in points for name, value in values.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    @quiet()
    def images(self, images: Mapping[str, Path], step: int) -> None:
        for name, path in images.items():
            self.client.log_artifact(self.run_id, str(path), str(Path(name).parent))

    @quiet()
    def summary(self, summary: Mapping[str, Any], step: int) -> None:
        import json

        self.log([(step, final_metrics(summary))])
        with tempfile.TemporaryDirectory() as folder:  # log_dict cannot take json.dumps' default=str
            path = Path(folder) / "summary.json"
            path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(self.run_id, str(path))

    @quiet()
    def close(self, status: str) -> None:
        if self.run_id is not None:  # None: its start was interrupted and removed what it had made
            self.client.set_terminated(self.run_id, status)
