"""MLflow: one run per run dir through MlflowClient (no global active run, so several runs in one process,
as a reproduce sweep has, stay apart).

Where: --mlflow-uri, else MLFLOW_TRACKING_URI, else MLflow's own default (MLflow 3: sqlite:///mlflow.db in the
current folder, or ./mlruns where that folder already holds one); a server URL works the same. The URI is made
absolute and kept in trackers.json, so `--resume` from any folder reopens the same run. Experiment: the
dataset and the model (`koniq-resnet18`); run name: the run dir's name; tags: split seed, student, variant.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdiqa_edge.train.trackers.base import TRACKERS, RunInfo, final_metrics

STEP_KEY = "train/loss"  # logged at every step: its history says how far a reopened run got
BATCH = 1000  # MLflow's limit of metrics per log_batch call
PARAM_BATCH = 100  # ... of params per call
PARAM_LENGTH = 6000  # ... of characters in a param's value


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

    def start(self, run: RunInfo, saved: Mapping[str, Any] | None, next_step: int) -> dict[str, Any]:
        from mlflow import MlflowClient

        uri = saved["tracking_uri"] if saved else tracking_uri(run.mlflow_uri)
        self.client = MlflowClient(tracking_uri=uri)
        if saved:
            self.run_id, experiment = saved["run_id"], saved["experiment_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = experiment_id(self.client, run.experiment)
            self.run_id = self.client.create_run(
                experiment, run_name=run.name, tags={**run.tags, "kdiqa_edge.run_dir": str(run.run_dir)}).info.run_id
            self._params(run.hparams)
            self.client.log_dict(self.run_id, run.config, "config.yaml")
        return {"tracking_uri": uri, "experiment_id": experiment, "run_id": self.run_id}

    def _params(self, hparams: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, str(value)[:PARAM_LENGTH]) for key, value in hparams.items()]
        for i in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + PARAM_BATCH])

    def held_step(self) -> int | None:
        history = self.client.get_metric_history(self.run_id, STEP_KEY)
        return max((m.step for m in history), default=None)

    def log(self, points: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, step) for step, values in points for name, value in values.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    def images(self, images: Mapping[str, Path], step: int) -> None:
        for name, path in images.items():
            self.client.log_artifact(self.run_id, str(path), str(Path(name).parent))

    def summary(self, summary: Mapping[str, Any], step: int) -> None:
        import json

        self.log([(step, final_metrics(summary))])
        with tempfile.TemporaryDirectory() as folder:  # log_dict cannot take json.dumps' default=str
            path = Path(folder) / "summary.json"
            path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
