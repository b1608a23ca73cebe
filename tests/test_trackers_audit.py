"""The trackers' audit: a Ctrl-C while they start (D6), a --mlflow-uri MLflow cannot use (D8), a resume given
another store (D9), the libraries' chatter (D10) and an empty export.log in the registry (D12).

No network: MLflow on sqlite files (and a socket that never answers, for the server checks), W&B offline.
The interrupts are a KeyboardInterrupt raised where a Ctrl-C would land (inside wandb.init, or between two
trackers' starts), not signals.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ddp_helpers import free_port

from kdiqa_edge.cli import main
from kdiqa_edge.errors import ConfigError


def _cli(args) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return SimpleNamespace(code=exit_info.value.code or 0, out=out.getvalue(), err=err.getvalue())


def _offline(mp: pytest.MonkeyPatch, root: Path) -> None:
    """W&B offline with its folders in `root`; MLflow's URI only from what a test passes, run from `root` (a
    sqlite store keeps its artifacts in ./mlruns)."""
    mp.chdir(root)
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        mp.setenv(f"WANDB_{name}_DIR", str(root / f"wandb-{name.lower()}"))
    mp.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        mp.delenv(name, raising=False)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)


def _mlflow_runs(uri: str) -> list[tuple[str, str]]:
    """(run id, status) of every run in the store."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return [(r.info.run_id, r.info.status) for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id])]


def _run_info(run_dir: Path, mlflow_uri: str | None):
    from kdiqa_edge.train.trackers import RunInfo

    run_dir.mkdir(parents=True, exist_ok=True)
    return RunInfo(run_dir=run_dir, name=run_dir.name, experiment="synthetic-teacher-tiny",
                   stage="teacher-finetune", config={"teacher": "tiny", "epochs": 2}, eval_split="test",
                   tags={"stage": "teacher-finetune"}, mlflow_uri=mlflow_uri)


def _tracked(names, run, said: list):
    from kdiqa_edge.train.trackers.run import TrackedRun

    return TrackedRun(names, run, ("srcc",), say=said.append)


def _wandb_exit_codes(run_dir: Path) -> list[int]:
    from test_trackers import _wandb_records

    return [record.exit.exit_code for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
            for record in _wandb_records(path) if record.WhichOneof("record_type") == "exit"]


# -- D6: Ctrl-C while the trackers start --------------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted_at_start(tmp_path_factory, small_synthetic):
    """A teacher fine-tune logging to MLflow (sqlite) and W&B (offline), Ctrl-C'd inside wandb.init (MLflow's
    run made by then), then resumed: each session's exit code and output, and the trackers' records in
    between."""
    import wandb

    root = tmp_path_factory.mktemp("interrupted")
    run, store = root / "run", f"sqlite:///{root / 'mlflow.db'}"
    args = ["teacher", "finetune", "--teacher", "tiny", "--dataset", "synthetic",
            "--root", small_synthetic.root, "--epochs", 1, "--batch-size", 32, "--lr", 1e-4, "--no-features",
            "--quiet", "--out", run,
            "--logger", "mlflow", "--logger", "wandb", "--mlflow-uri", store]
    init, asked = wandb.init, []

    def ctrl_c_inside(**kwargs):
        asked.append(kwargs.get("id"))
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, root)
        mp.setattr(wandb, "init", ctrl_c_inside)
        first = _cli(args)
        state_file = run / "trackers.json"
        between = SimpleNamespace(saved=json.loads(state_file.read_text()) if state_file.is_file() else {},
                                  runs=_mlflow_runs(store))
        mp.setattr(wandb, "init", init)
        second = _cli(["teacher", "finetune", "--out", run, "--resume", "--quiet"])
    return SimpleNamespace(run=run, store=store, first=first, second=second, between=between, asked=asked)


def test_ctrl_c_while_trackers_start_records_them_and_resume_continues_them(interrupted_at_start):
    done = interrupted_at_start
    assert done.first.code == 130 and "resume with" in done.first.err
    saved = done.between.saved
    assert set(saved) == {"mlflow", "wandb"}  # written as each started; W&B's id picked before wandb.init
    assert saved["wandb"]["run_id"] == done.asked[0] and saved["mlflow"]["step"] == -1
    assert done.between.runs == [(saved["mlflow"]["run_id"], "KILLED")]  # not RUNNING forever
    assert done.second.code == 0, done.second.err
    assert _mlflow_runs(done.store) == [(saved["mlflow"]["run_id"], "FINISHED")]  # the same run, no twin
    final = json.loads((done.run / "trackers.json").read_text())
    assert final["wandb"]["run_id"] == saved["wandb"]["run_id"]
    folders = list((done.run / "wandb").glob("offline-run-*"))
    assert folders and all(f.name.endswith(f"-{saved['wandb']['run_id']}") for f in folders)
    assert "wandb" not in done.first.out + done.second.out


_CTRL_C_ONCE_WANDB_RUNS = """
import sys
from pathlib import Path

from kdiqa_edge.train.trackers import RunInfo
from kdiqa_edge.train.trackers.mlflow import MlflowTracker
from kdiqa_edge.train.trackers.run import TrackedRun


def ctrl_c(self, *args):
    raise KeyboardInterrupt


MlflowTracker.start = ctrl_c
run_dir = Path(sys.argv[1])
run_dir.mkdir()
run = RunInfo(run_dir=run_dir, name=run_dir.name, experiment="synthetic-teacher-tiny",
              stage="teacher-finetune", config={}, eval_split="test", tags={})
try:
    TrackedRun(["wandb", "mlflow"], run, ("srcc",)).start(0)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
"""


def test_ctrl_c_once_wandb_runs_leaves_stdout_to_us(tmp_path):
    """A process Ctrl-C'd while MLflow starts, W&B's run open: W&B's teardown at exit printed its sync hints,
    in colour, on stdout. The run is finished by us now (exit code 130), and W&B says nothing of its own."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.update({f"WANDB_{name}_DIR": str(tmp_path / f"wandb-{name.lower()}")
                for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT")})
    env.pop("WANDB_RUN_ID", None)
    done = subprocess.run([sys.executable, "-c", _CTRL_C_ONCE_WANDB_RUNS, str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.splitlines()[-1] == "interrupted" and "\x1b[" not in done.stderr
    assert _wandb_exit_codes(tmp_path / "run") == [130]


def test_ctrl_c_after_some_started_ends_each_as_killed(tmp_path, offline, monkeypatch, capsys):
    """TensorBoard and W&B started, MLflow's run made, then a Ctrl-C (here in MLflow's held_step): TensorBoard
    closed, W&B finished with exit code 130, MLflow's run KILLED; all three in trackers.json."""
    from kdiqa_edge.train.trackers.mlflow import MlflowTracker
    from kdiqa_edge.train.trackers.tensorboard import TensorBoardTracker

    closed = []
    tb_close = TensorBoardTracker.close
    monkeypatch.setattr(TensorBoardTracker, "close",
                        lambda self, status: (closed.append(status), tb_close(self, status)))

    def ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(MlflowTracker, "held_step", ctrl_c)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run, said = _run_info(tmp_path / "run", store), []
    with pytest.raises(KeyboardInterrupt):
        _tracked(["tensorboard", "wandb", "mlflow"], run, said).start(0)
    saved = json.loads((run.run_dir / "trackers.json").read_text())
    assert set(saved) == {"tensorboard", "wandb", "mlflow"}
    assert closed == ["KILLED"] and _wandb_exit_codes(run.run_dir) == [130]
    assert _mlflow_runs(store) == [(saved["mlflow"]["run_id"], "KILLED")]
    assert said == [] and capsys.readouterr().out == ""


# -- D8: the MLflow store, checked before any work ----------------------------------------------------------
def test_mlflow_uri_scheme_typo_is_one_line_naming_the_stores():
    from kdiqa_edge.train.trackers import check_loggers

    with pytest.raises(ConfigError) as error:
        check_loggers(["mlflow"], "htp://nowhere")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("--mlflow-uri htp://nowhere: MLflow has no tracking store")
    assert "http://HOST:PORT" in message and "sqlite:///PATH.db" in message
    assert check_loggers(["tensorboard"], "htp://nowhere") == ["tensorboard"]  # the URI is MLflow's alone


def test_mlflow_folder_needs_mlflow3_opt_in_and_names_the_database_instead(tmp_path, monkeypatch):
    from kdiqa_edge.train.trackers import check_loggers

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    folder = tmp_path / "mlruns"
    with pytest.raises(ConfigError) as error:
        check_loggers(["mlflow"], str(folder))
    message = str(error.value)
    assert "\n" not in message and "MLFLOW_ALLOW_FILE_STORE=true" in message
    assert message.endswith(f"--mlflow-uri sqlite:///{folder / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in: the folder works
    assert check_loggers(["mlflow"], str(folder)) == ["mlflow"]


@contextlib.contextmanager
def _silent_server():
    """A port that takes connections and never answers (a server hung, a firewall that drops)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_mlflow_server_that_does_not_answer_is_refused_in_seconds(monkeypatch):
    from kdiqa_edge.train.trackers import check_loggers
    from kdiqa_edge.train.trackers import mlflow as mlflow_tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        check_loggers(["mlflow"], url)
    assert time.monotonic() - started < mlflow_tracker.PROBE_TIMEOUT_S
    assert str(error.value) == (f"--mlflow-uri {url}: no MLflow tracking server answers there ([Errno 111] "
                                "Connection refused); start it, or pass another --mlflow-uri")
    monkeypatch.setattr(mlflow_tracker, "PROBE_TIMEOUT_S", 1)
    with _silent_server() as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # named as where it came from
        started = time.monotonic()
        with pytest.raises(ConfigError, match=rf"^MLFLOW_TRACKING_URI={url}: .*\(no answer in 1 s\)"):
            check_loggers(["mlflow"])
        assert time.monotonic() - started < 10


def test_resumed_run_whose_server_is_gone_fails_fast_with_one_warning(tmp_path, offline):
    """The store recorded in trackers.json is not checked by check_loggers (it is the run's): its start is one
    quick request, then one warning line, not minutes of MLflow's retries."""
    run, said = _run_info(tmp_path / "run", None), []
    url = f"http://127.0.0.1:{free_port()}"
    (run.run_dir / "trackers.json").write_text(json.dumps(
        {"mlflow": {"tracking_uri": url, "experiment_id": "1", "run_id": "abc", "step": 5}}))
    started = time.monotonic()
    tracked = _tracked(["mlflow"], run, said).start(6)
    assert time.monotonic() - started < 10 and not tracked.active
    assert said == [f"mlflow could not start (ConfigError: the run's store {url}: no MLflow tracking server "
                    "answers there ([Errno 111] Connection refused); start it, or pass another "
                    "--mlflow-uri); training goes on without it, the run dir keeps every record"]


def test_tracker_warning_keeps_the_library_message_whole(tmp_path, offline, monkeypatch):
    from kdiqa_edge.train.trackers.tensorboard import TensorBoardTracker

    remedy = "set X=1 to go on"
    monkeypatch.setattr(TensorBoardTracker, "log", lambda self, points: (_ for _ in ()).throw(
        RuntimeError("the store is in maintenance mode " + "and says a lot " * 30 + remedy)))
    said = []
    tracked = _tracked(["tensorboard"], _run_info(tmp_path / "run", None), said).start(0)
    tracked.epoch([{"step": 0, "epoch": 1, "loss": 1.0}], {"epoch": 1, "step": 1, "srcc": 0.5})
    assert len(said) == 1 and remedy in said[0] and said[0].endswith("the run dir keeps every record")
    tracked.end()


def test_mlflow_uri_help_says_what_a_folder_needs():
    from typer.testing import CliRunner

    from kdiqa_edge.cli import app

    result = CliRunner().invoke(app, ["teacher", "finetune", "--help"],
                                env={"COLUMNS": "200", "NO_COLOR": "1"})
    text = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", result.output))
    assert "a folder only with MLFLOW_ALLOW_FILE_STORE=true" in text and "or a folder (default" not in text


# -- D9: a resume given another store ----------------------------------------------------------------------
def _first_session(run, said) -> dict:
    """Steps 0-2 (epoch 1) logged, then killed: trackers.json's MLflow state."""
    with open(run.run_dir / "steps.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["step", "epoch", "loss"])
        writer.writeheader()
        writer.writerows({"step": step, "epoch": 1, "loss": 1.0 - step / 10} for step in range(3))
    tracked = _tracked(["mlflow"], run, said).start(0)
    tracked.epoch([{"step": s, "epoch": 1, "loss": 1.0 - s / 10} for s in range(3)], _HISTORY[0])
    tracked.end("KILLED")
    return json.loads((run.run_dir / "trackers.json").read_text())["mlflow"]


_HISTORY = [{"epoch": 1, "step": 3, "srcc": 0.5, "eval_split": "test"}]


def test_resume_with_another_mlflow_uri_goes_on_as_a_new_run_there(tmp_path, offline, capsys):
    from mlflow import MlflowClient

    first_store, second_store = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    said = []
    first = _first_session(_run_info(tmp_path / "run", first_store), said)
    resumed = _tracked(["mlflow"], _run_info(tmp_path / "run", second_store), said).start(3)
    resumed.catch_up(tmp_path / "run" / "steps.csv", _HISTORY, 3)
    resumed.end("KILLED")
    assert said == []
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mlflow:")]
    assert notes == [f"mlflow: --mlflow-uri {second_store} is not the store this run logged to "
                     f"({first_store}): it goes on there as a new run (a run id lives in one store)"]
    saved = json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]
    assert saved["tracking_uri"] == second_store and saved["run_id"] != first["run_id"]
    [(run_id, status)] = _mlflow_runs(second_store)
    assert run_id == saved["run_id"] and status == "KILLED"
    history = MlflowClient(second_store).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2]  # the new run got what the old one had
    assert _mlflow_runs(first_store) == [(first["run_id"], "KILLED")]  # the old one is left as it was


def test_plain_resume_continues_the_recorded_store_and_says_so_where_the_environment_differs(
        tmp_path, offline, monkeypatch, capsys):
    """The config's relative URI from another folder, then MLFLOW_TRACKING_URI elsewhere: the same run, one
    line saying where it continues in the second case only."""
    monkeypatch.chdir(tmp_path)
    said = []
    first = _first_session(_run_info(tmp_path / "run", "sqlite:///mlflow.db"), said)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _tracked(["mlflow"], _run_info(tmp_path / "run", "sqlite:///mlflow.db"), said).start(3).end("KILLED")
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("mlflow:")]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    _tracked(["mlflow"], _run_info(tmp_path / "run", None), said).start(3).end("KILLED")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mlflow:")]
    assert notes == [f"mlflow: continuing run {first['run_id']} in {first['tracking_uri']}, where it began, "
                     "not in MLFLOW_TRACKING_URI (--mlflow-uri moves it there as a new run)"]
    assert said == [] and _mlflow_runs(first["tracking_uri"]) == [(first["run_id"], "KILLED")]
    assert not (tmp_path / "other.db").exists() and not (tmp_path / "elsewhere" / "mlflow.db").exists()


# -- D10: the libraries' chatter ---------------------------------------------------------------------------
def test_mlflow_chatter_is_held_back(interrupted_at_start):
    """A new sqlite store said "INFO mlflow.store.db.utils: Creating initial MLflow database tables..."."""
    for session in (interrupted_at_start.first, interrupted_at_start.second):
        assert "mlflow" not in session.err.lower(), session.err


def test_wandb_says_one_line_of_ours_per_run(interrupted_at_start):
    """W&B's banner, run history and summary (some 30 lines) held back, even with --quiet: one line of ours,
    where the offline run is and how to upload it."""
    first, second = interrupted_at_start.first, interrupted_at_start.second
    assert "wandb" not in first.err  # interrupted inside wandb.init: nothing to say yet
    lines = [line for line in second.err.splitlines() if "wandb" in line.lower() or "W&B" in line]
    assert len(lines) == 1 and re.fullmatch(r"wandb: offline run; upload it with: wandb sync /\S+/run/wandb/"
                                            r"offline-run-\S+", lines[0]), second.err


def test_quiet_holds_back_mlflow_download_bar(tmp_path, offline, capsys):
    """MLflow's tqdm "Downloading artifacts" bar (what `QualityModel.load("models:/NAME/latest")` showed) is
    gone inside `trackers.mlflow.quiet()`, the block runtime/registry_uri.py's download is to run in."""
    from mlflow.artifacts import download_artifacts

    from kdiqa_edge.train.trackers.mlflow import quiet
    from kdiqa_edge.train.trackers.registry import register_export

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registered = register_export(_export_out(tmp_path / "exports", ""), "tiny-iqa", ["onnx-fp32"], store,
                                 log=lambda _: None)
    capsys.readouterr()
    with quiet():
        download_artifacts(run_id=registered.run_id, artifact_path="onnx-fp32",
                           dst_path=str(tmp_path / "got"), tracking_uri=store)
    assert (tmp_path / "got" / "onnx-fp32" / "model.fp32.onnx").read_bytes() == b"onnx"
    assert capsys.readouterr().err == ""


# -- D12: export --mlflow-register's artifacts -------------------------------------------------------------
def _export_out(out: Path, log_text: str) -> Path:
    (out / "onnx-fp32").mkdir(parents=True)
    (out / "onnx-fp32" / "model.fp32.onnx").write_bytes(b"onnx")
    (out / "onnx-fp32" / "export.log").write_text(log_text)
    entry = {"files": [{"path": "onnx-fp32/model.fp32.onnx"}], "log": "onnx-fp32/export.log",
             "target": "onnx", "precision": "fp32"}
    (out / "manifest.json").write_text(json.dumps({"exports": {"onnx-fp32": entry}, "checkpoint": {}}))
    return out


@pytest.mark.parametrize("log_text", ["", "onnxscript: 3 warnings\n"])
def test_registered_export_logs_export_log_only_when_it_says_something(log_text, tmp_path, offline, capsys):
    from mlflow import MlflowClient

    from kdiqa_edge.train.trackers.registry import register_export

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = _export_out(tmp_path / "exports", log_text)
    registered = register_export(out, "tiny-iqa", ["onnx-fp32"], store, log=lambda _: None)
    files = {a.path: a.file_size for a in MlflowClient(store).list_artifacts(registered.run_id, "onnx-fp32")}
    expected = {"onnx-fp32/model.fp32.onnx": 4}
    if log_text:
        expected["onnx-fp32/export.log"] = len(log_text)
    assert files == expected
    assert "mlflow" not in capsys.readouterr().err.lower()  # nor MLflow's "Creating initial ... tables"


def test_readme_names_every_command_that_takes_logger():
    text = re.sub(r"\s+", " ", (Path(__file__).parents[1] / "README.md").read_text())
    assert "`--logger` (repeatable, on `teacher finetune`, `distill` and `reproduce`" in text


def test_a_reproduce_run_is_named_with_its_seed():
    """reproduce's OUT/seed0/teacher and OUT/seed1/teacher were both "teacher" in MLflow and W&B."""
    from kdiqa_edge.train.trackers.base import run_name

    assert run_name(Path("out/seed0/teacher")) == "seed0/teacher"
    assert run_name(Path("out/seed12/test_resnet-full")) == "seed12/test_resnet-full"
    assert run_name(Path("runs/koniq-mvit")) == "koniq-mvit" and run_name(Path("seeds/x")) == "x"


def test_a_resumes_logger_options_are_the_runs_from_then_on(small_synthetic, tmp_path, capsys):
    """`--resume --logger tensorboard` logged, but config.yaml kept the old loggers: a later plain --resume
    silently dropped TensorBoard."""
    import yaml
    from cli_helpers import run_cli

    run = tmp_path / "teacher"
    base = ["teacher", "finetune", "--teacher", "tiny", "--dataset", "synthetic", "--root", small_synthetic.root,
            "--epochs", "1", "--batch-size", "32", "--no-features", "--quiet", "--out", run]
    assert run_cli(base, capsys)[0] == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["loggers"] == []
    code, _, err = run_cli(["teacher", "finetune", "--out", run, "--resume", "--logger", "tensorboard", "--quiet"],
                           capsys)
    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["loggers"] == ["tensorboard"]
