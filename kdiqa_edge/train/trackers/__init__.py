"""Training trackers behind one small interface (`base.Tracker`): TensorBoard, MLflow, Weights & Biases.

Importing the package registers every backend (each module registers itself in `base.TRACKERS` and imports
its library only when a run starts); `run.TrackedRun` drives the ones --logger names. A new tracker: a module
registering its class, a line here. `registry.py` logs an export and registers it in MLflow's model registry.
"""

from kdiqa_edge.train.trackers import mlflow, tensorboard, wandb  # noqa: F401  (registration)
from kdiqa_edge.train.trackers.base import EXTRA, TRACKERS, RunInfo, Tracker, check_loggers

__all__ = ["EXTRA", "TRACKERS", "RunInfo", "Tracker", "check_loggers"]
