"""A training run's trackers, started, fed and closed together (`Trainer` drives it, on rank 0 only).

What they get, named as the run dir names it:
- at start: the config (config.yaml) as hyperparameters, the tags (split seed, student, variant...);
- per epoch, once its checkpoint is saved: steps.csv's rows as `train/<column>` at each step (loss terms,
  lambda, lr), then metrics.csv's row: `<eval split>/<metric>` (plcc, plcc_fit, srcc, krcc, rmse) and
  `train_epoch/<column>` (epoch means, timings) and `epoch` at the epoch's last step;
- at the end: plots/*.png as images and summary.json.

RUN/trackers.json keeps, per tracker, what reopens its run (ids, store) and the last step it logged, so
`--resume` continues the same runs: steps it logged already are not sent again (TensorBoard also hides,
with `purge_step`, whatever an interrupted session logged past it), and epochs saved but not logged before
a kill are sent from steps.csv and metrics.csv first. It is rewritten (atomically) as soon as each tracker
has started: a Ctrl-C while the others start (wandb.init takes seconds) ends the started ones as KILLED
and leaves them recorded, so a --resume continues them rather than opening twins.
A tracker that raises (a server gone, a full disk) is one warning line, then left out; training goes on and
the run dir keeps every record.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kdiqa_edge.errors import first_line
from kdiqa_edge.io import read_json, write_json
from kdiqa_edge.train.trackers.base import TRACKERS, RunInfo, Tracker

STATE_FILE = "trackers.json"
ROW_KEYS = ("epoch", "step", "eval_split")  # a row's position, not a figure
WARNING_LIMIT = 1000  # characters of a tracker's error kept in its warning line


def warn(line: str) -> None:
    from kdiqa_edge.console import stream

    print(f"warning: {line}", file=stream("stderr"), flush=True)


class TrackedRun:
    """The trackers named by --logger for one run dir. `eval_metrics`: the per-epoch metric columns."""

    def __init__(self, names: Iterable[str], run: RunInfo, eval_metrics: Sequence[str],
                 say: Callable[[str], None] = warn):
        self.names, self.run, self.eval_metrics, self.say = list(names), run, tuple(eval_metrics), say
        self.active: dict[str, Tracker] = {}
        self.logged: dict[str, int] = {}  # the last step each tracker holds
        self.states: dict[str, dict[str, Any]] = {}
        self.closed = False

    @property
    def state_file(self) -> Path:
        return self.run.run_dir / STATE_FILE

    # -- start ------------------------------------------------------------------------------------------
    def start(self, next_step: int) -> TrackedRun:
        """Open (or reopen, from trackers.json) every tracker; `next_step`: the first step this session
        trains. Interrupted (Ctrl-C) or failing past a tracker's own errors, it ends the ones started, then
        re-raises."""
        self.states = read_json(self.state_file) if self.state_file.is_file() else {}
        atexit.register(self.end)  # a recipe that never reaches Trainer.cleanup() still ends them
        try:
            for name in self.names:
                self._start(name)
        except BaseException:
            self.end(status_now())
            raise
        self._save()
        return self

    def _start(self, name: str) -> None:
        saved = self.states.get(name)
        logged = int(saved.get("step", -1)) if saved else -1
        tracker = TRACKERS.get(name)()
        try:
            state = self._call(name, tracker, "start", self.run, saved, logged + 1)
        except BaseException:  # inside the library's start: what it had made is ended, and recorded if known
            self.active.pop(name, None)
            if getattr(tracker, "state", None):
                self.states[name] = {**tracker.state, "step": logged}
                self._save()
            _close_quietly(tracker, status_now())
            raise
        if name not in self.active:  # it failed (one warning line said so)
            return
        if saved is not None and state.get("run_id") != saved.get("run_id"):
            logged = -1  # a new run (MLflow, in another store): it gets every step
        self.logged[name] = logged
        self.states[name] = {**state, "step": logged}
        self._save()  # recorded before anything else can stop the start
        held = self._call(name, tracker, "held_step")
        if name in self.active and held is not None and held is not _FAILED:
            self.logged[name] = self.states[name]["step"] = max(logged, held)

    def catch_up(self, steps_csv: Path, history: Sequence[Mapping[str, Any]], before_step: int) -> None:
        """Send what a resumed run saved but its trackers never got (a kill between the checkpoint and the
        logging): steps.csv's rows and metrics.csv's rows before `before_step`."""
        behind = [name for name in self.active if self.logged[name] < before_step - 1]
        if not behind:
            return
        rows = []
        if steps_csv.is_file():
            with open(steps_csv, newline="") as handle:
                rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
        points = self._step_points([r for r in rows if int(r["step"]) < before_step])
        points += [self._epoch_point(row) for row in history if int(row["step"]) <= before_step]
        self._send(sorted(points, key=lambda p: p[0]), behind)

    # -- per epoch, at the end ----------------------------------------------------------------------------
    def epoch(self, step_rows: Sequence[Mapping[str, Any]], row: Mapping[str, Any]) -> None:
        """One epoch: its steps.csv rows, then its metrics.csv row."""
        self._send(self._step_points(step_rows) + [self._epoch_point(row)], list(self.active))

    # -- end of run -------------------------------------------------------------------------------------
    def end(self, status: str | None = None) -> None:
        """Send the run's final records (summary.json, plots/*.png, as the recipe left them) and close every
        tracker: FINISHED where summary.json is written, else `status` (KILLED: --resume continues it)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.end)
        summary_file = self.run.run_dir / "summary.json"
        finished = summary_file.is_file() and status in (None, "FINISHED")
        if finished:
            plots = sorted((self.run.run_dir / "plots").glob("*.png"))
            self.finish(read_json(summary_file), {f"plots/{path.stem}": path for path in plots})
        for name in list(self.active):
            self._call(name, self.active[name], "close", "FINISHED" if finished else (
                status if status not in (None, "FINISHED") else "KILLED"))
        self.active.clear()

    def finish(self, summary: Mapping[str, Any], images: Mapping[str, Path]) -> None:
        step = max(self.logged.values(), default=0)
        for name in list(self.active):
            if images:
                self._call(name, self.active[name], "images", images, step)
            if name in self.active:
                self._call(name, self.active[name], "summary", summary, step)

    # -- internals --------------------------------------------------------------------------------------
    def _step_points(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, dict[str, float]]]:
        return [(int(row["step"]), {f"train/{k}": float(v) for k, v in row.items()
                                    if k not in ROW_KEYS and isinstance(v, (int, float))}) for row in rows]

    def _epoch_point(self, row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
        split = row.get("eval_split", self.run.eval_split)
        values = {"epoch": float(row["epoch"])}
        for key, value in row.items():
            if key in ROW_KEYS or not isinstance(value, (int, float)):
                continue
            values[f"{split}/{key}" if key in self.eval_metrics else f"train_epoch/{key}"] = float(value)
        return int(row["step"]) - 1, values  # at the epoch's last step (steps count from 0)

    def _send(self, points: list[tuple[int, dict[str, float]]], names: Sequence[str]) -> None:
        if not points:
            return
        for name in names:
            if name not in self.active:
                continue
            fresh = [(step, values) for step, values in points if step > self.logged[name]]
            if fresh and self._call(name, self.active[name], "log", fresh) is not _FAILED:
                self.logged[name] = fresh[-1][0]
                self.states[name]["step"] = self.logged[name]
        self._save()

    def _save(self) -> None:
        try:
            write_json(self.state_file, self.states)
        except OSError as exc:  # a full disk: the training's own writes will say so
            self.say(f"trackers: cannot write {self.state_file} ({first_line(exc, typed=True)})")

    def _call(self, name: str, tracker, method: str, *args):
        """tracker.method(*args); a failure is one warning line and the tracker is left out from then on."""
        if method == "start":
            self.active[name] = tracker
        try:
            return getattr(tracker, method)(*args)
        except Exception as exc:  # noqa: BLE001 - any library's error: the training must not stop for a tracker
            self.active.pop(name, None)
            doing = "could not start" if method == "start" else "stopped logging"
            # the library's whole first line: its remedy often closes it
            self.say(f"{name} {doing} ({first_line(exc, limit=WARNING_LIMIT, typed=True)}); training goes on "
                     "without it, the run dir keeps every record")
            if method != "close":
                _close_quietly(tracker, "FAILED")
            return _FAILED


_FAILED = object()


def _close_quietly(tracker, status: str) -> None:
    with contextlib.suppress(Exception):  # it is broken or half-started, and its warning (if any) was said
        tracker.close(status)


def _number(text: str) -> Any:
    try:
        return float(text) if text not in ("", None) else text
    except ValueError:
        return text


def status_now() -> str:
    """How the run ends, from the exception being raised through the caller's `finally`, if any."""
    exc = sys.exc_info()[1]
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
