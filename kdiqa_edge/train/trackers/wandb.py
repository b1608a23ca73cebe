"""Weights & Biases: one W&B run per run dir, its files in RUN/wandb/.

Configured as W&B's users configure it: WANDB_PROJECT (default kdiqa-edge), WANDB_ENTITY, WANDB_MODE
(`offline` needs no network; `wandb sync RUN/wandb/offline-run-*` uploads later), WANDB_API_KEY. Group: the
dataset and the model (`koniq-resnet18`); job type: the stage; tags `split_seed=0`, `student=...`,
`variant=...`. The run id is picked before `wandb.init` (WANDB_RUN_ID if set), so a start interrupted inside
it is recorded too; `--resume` reopens the same run id (`resume="allow"`). W&B's own output (banner, history,
summary, sync hints) is held back (`silent=True`, `console="off"`): one line of ours says where the run is.
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdiqa_edge.train.trackers.base import TRACKERS, RunInfo, final_metrics, note

DEFAULT_PROJECT = "kdiqa-edge"
EXIT_CODES = {"FINISHED": 0, "KILLED": 130, "FAILED": 1}
ID_CHARS = string.ascii_lowercase + string.digits  # what W&B's own run ids are made of


@TRACKERS.register("wandb")
class WandbTracker:
    name = "wandb"
    package = "wandb"
    state: dict[str, Any] | None = None  # what reopens the run, known before wandb.init (see Tracker.start)

    def start(self, run: RunInfo, saved: Mapping[str, Any] | None, next_step: int) -> dict[str, Any]:
        import wandb

        project = (saved or {}).get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        run_id = (saved or {}).get("run_id") or os.environ.get("WANDB_RUN_ID") or \
            "".join(secrets.choice(ID_CHARS) for _ in range(8))
        self.state = {"project": project, "run_id": run_id}
        # console="off": our progress lines and captured converter output stay ours; silent: W&B's own lines
        # (on stdout, some of them) too
        self.run = wandb.init(project=project, id=run_id, name=run.name, group=run.experiment, job_type=run.stage,
                              dir=str(run.run_dir), config=run.config,
                              tags=[f"{k}={v}"[:64] for k, v in run.tags.items()], resume="allow",
                              reinit="create_new", settings=wandb.Settings(console="off", silent=True))
        self.resumed = bool(saved)
        if self.run.offline:
            note(self.name, f"offline run; upload it with: wandb sync {self.run.settings.sync_dir}")
        else:
            note(self.name, f"run at {self.run.url}")
        return {"project": project, "run_id": self.run.id}

    def held_step(self) -> int | None:
        # a resumed online run knows its last step; offline, W&B cannot tell
        step = getattr(self.run, "step", 0)
        return step - 1 if self.resumed and step > 0 else None

    def log(self, points: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        for step, values in points:
            self.run.log(dict(values), step=step)

    def images(self, images: Mapping[str, Path], step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path)) for name, path in images.items()}, step=step)

    def summary(self, summary: Mapping[str, Any], step: int) -> None:
        self.run.log(final_metrics(summary), step=step)
        self.run.summary.update(dict(summary))

    def close(self, status: str) -> None:
        self.run.finish(exit_code=EXIT_CODES.get(status, 1))
