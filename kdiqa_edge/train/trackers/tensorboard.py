"""TensorBoard: event files in RUN/tb/ through torch's SummaryWriter (`tensorboard --logdir runs/`).

A resumed run writes on in the same folder with `purge_step` at its next step: TensorBoard hides whatever
an interrupted session logged from there on, so the replayed steps are shown once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdiqa_edge.train.trackers.base import TRACKERS, RunInfo, final_metrics

LOG_DIR = "tb"


@TRACKERS.register("tensorboard")
class TensorBoardTracker:
    name = "tensorboard"
    package = "tensorboard"

    def start(self, run: RunInfo, saved: Mapping[str, Any] | None, next_step: int) -> dict[str, Any]:
        import yaml
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(run.run_dir / LOG_DIR), purge_step=next_step if saved else None)
        if not saved:
            # in the run's own folder (SummaryWriter.add_hparams would open a sub-run), with the summary's
            # headline figures as the HParams dashboard's metrics
            metrics = {name: 0.0 for name in final_metrics({"test": dict.fromkeys(("plcc", "srcc", "krcc", "rmse"), 0)})}
            values = {k: ("None" if v is None else v) for k, v in run.hparams.items()}
            for event in hparams(values, metrics):
                self.writer.file_writer.add_summary(event)
            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(run.config, sort_keys=False) + "```", 0)
            self.writer.add_text("tags", "  \n".join(f"{k}: {v}" for k, v in run.tags.items()), 0)
            self.writer.flush()
        return {"log_dir": LOG_DIR}

    def held_step(self) -> int | None:
        return None  # purge_step already hides what an interrupted session logged past the resumed step

    def log(self, points: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        for step, values in points:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def images(self, images: Mapping[str, Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        for name, path in images.items():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(name, pixels, step, dataformats="HWC")
        self.writer.flush()

    def summary(self, summary: Mapping[str, Any], step: int) -> None:
        for name, value in final_metrics(summary).items():
            self.writer.add_scalar(name, value, step)
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2, default=str) + "\n```", step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()
