"""--logger tensorboard|mlflow|wandb, each backend for real with no network, and export --mlflow-register.

One tiny teacher fine-tune through the CLI, killed in its second epoch and resumed, logs to all three (TensorBoard
event files, an MLflow file store, W&B offline); each is read back with its own reader and compared with the
run dir's records. An `mlflow server` on 127.0.0.1 starts with the module (it takes seconds) and takes the
registered export at the end.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run_cli
from ddp_helpers import become_rank, free_port

from kdiqa_edge.cli import main

STEPS_PER_EPOCH = 3  # 90 training images of the 120 (one of the 4 references is the test split), batch 32
RUN_IDS = {}


def _cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code or 0, out.getvalue(), err.getvalue()


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free port of 127.0.0.1 (file backend store, proxied artifacts), stopped after the
    module; `wait()` until it answers."""
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
    log = open(root / "server.log", "w")  # noqa: SIM115 - held open for the server's life
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", "--backend-store-uri", (root / "store").as_uri(),
                               "--artifacts-destination", str(root / "artifacts")],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def wait(timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert server.poll() is None, (root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        return url
            except OSError:
                time.sleep(0.25)  # the server is still importing
        raise AssertionError(f"mlflow server did not answer in {timeout} s")

    server.wait_ready = wait
    yield server
    os.killpg(server.pid, 15)
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, small_synthetic, mlflow_server):
    """The run dir of a teacher fine-tune logged to the three trackers, Ctrl-C'd after step 4 (in epoch 2),
    then resumed; and the MLflow file store it logged to."""
    from kdiqa_edge.train.loop import Trainer

    root = tmp_path_factory.mktemp("tracked")
    run, store = root / "run", (root / "mlruns").as_uri()
    args = ["teacher", "finetune", "--teacher", "tiny", "--dataset", "synthetic", "--root", small_synthetic.root,
            "--epochs", 2, "--batch-size", 32, "--lr", 1e-4, "--no-features", "--quiet", "--out", run,
            "--logger", "tensorboard", "--logger", "mlflow", "--logger", "wandb", "--mlflow-uri", store]
    with pytest.MonkeyPatch.context() as mp:
        for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
            mp.setenv(f"WANDB_{name}_DIR", str(root / f"wandb-{name.lower()}"))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in for a folder store
        mp.setattr(Trainer, "interrupt_after_steps", STEPS_PER_EPOCH + 1)
        code, _, first_err = _cli(args)
        assert code == 130 and "resume with" in first_err
        RUN_IDS["after_kill"] = json.loads((run / "trackers.json").read_text())
        mp.setattr(Trainer, "interrupt_after_steps", None)
        code, _, err = _cli(["teacher", "finetune", "--out", run, "--resume", "--quiet"])  # loggers: config.yaml's
        assert code == 0, err
    assert "warning" not in first_err + err
    return run, store


def test_tensorboard_event_files_hold_steps_csv_once(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = tracked_run
    steps, metrics = _csv(run / "steps.csv"), _csv(run / "metrics.csv")
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in steps] == list(range(2 * STEPS_PER_EPOCH))
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in steps], rel=1e-5)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([float(r["lr"]) for r in steps], rel=1e-5)
    srcc = events.Scalars("test/srcc")  # per epoch, at its last step
    assert [e.step for e in srcc] == [int(r["step"]) - 1 for r in metrics] == [2, 5]
    assert [e.value for e in srcc] == pytest.approx([float(r["srcc"]) for r in metrics], rel=1e-5)
    assert {"test/plcc", "test/krcc", "test/rmse", "summary/test_srcc"} <= set(events.Tags()["scalars"])
    assert {"plots/curves", "plots/scatter_test"} <= set(events.Tags()["images"])
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2  # one per session, one history


def test_mlflow_file_store_one_run_across_the_resume(tracked_run):
    from mlflow import MlflowClient

    run, store = tracked_run
    saved = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert saved["run_id"] == RUN_IDS["after_kill"]["mlflow"]["run_id"] and saved["tracking_uri"] == store
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("synthetic-teacher-tiny")
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.run_id == saved["run_id"] and logged.info.status == "FINISHED"
    assert logged.info.run_name == run.name
    steps, metrics = _csv(run / "steps.csv"), _csv(run / "metrics.csv")
    history = client.get_metric_history(saved["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [int(r["step"]) for r in steps]  # each step once
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [float(r["loss"]) for r in steps], rel=1e-5)
    plcc = sorted(client.get_metric_history(saved["run_id"], "test/plcc"), key=lambda m: m.step)
    assert [m.value for m in plcc] == pytest.approx([float(r["plcc"]) for r in metrics], rel=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert logged.data.metrics["summary/test_srcc"] == pytest.approx(summary["test"]["srcc"])
    assert logged.data.params["teacher"] == "tiny" and logged.data.params["epochs"] == "2"
    assert logged.data.tags["split_seed"] == "0" and logged.data.tags["stage"] == "teacher-finetune"
    files = {a.path for a in client.list_artifacts(saved["run_id"])} | {
        a.path for a in client.list_artifacts(saved["run_id"], "plots")}
    assert {"config.yaml", "summary.json", "plots/curves.png", "plots/scatter_test.png"} <= files


def _wandb_records(path: Path) -> list:
    """The records of a W&B run log (`run-<id>.wandb`), decoded with wandb's own protobuf. wandb 0.31 has no
    Python reader of it (wandb-core, in Go, writes it): LevelDB's log framing, 32 KiB blocks, a 7-byte file
    header (`:W&B`, magic, version) and a 7-byte header per chunk (crc, length, type: 1 full, 2 first,
    3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_continues_under_one_id(tracked_run):
    run, _ = tracked_run
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]["run_id"]
    assert run_id == RUN_IDS["after_kill"]["wandb"]["run_id"]
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)  # the session and its resume
    rows, config, summary, tags = [], {}, {}, set()
    for folder in folders:
        for record in _wandb_records(folder / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif kind == "run":  # its config as wandb.init got it, and its tags
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
                tags = set(record.run.tags)
            elif kind == "summary":
                summary.update({item.key or "/".join(item.nested_key): item.value_json
                                for item in record.summary.update})
    steps = _csv(run / "steps.csv")
    logged = [(row["_step"], row["train/loss"]) for row in rows if "train/loss" in row]
    assert [s for s, _ in logged] == [int(r["step"]) for r in steps]  # each step once, in order
    assert [v for _, v in logged] == pytest.approx([float(r["loss"]) for r in steps], rel=1e-5)
    assert [row["test/srcc"] for row in rows if "test/srcc" in row] == pytest.approx(
        [float(r["srcc"]) for r in _csv(run / "metrics.csv")], rel=1e-5)
    assert config["split_seed"] == 0 and config["teacher"] == "tiny" and config["dataset"]["name"] == "synthetic"
    assert {"split_seed=0", "teacher=tiny", "stage=teacher-finetune"} <= tags
    assert json.loads(summary["test"])["srcc"] == pytest.approx(json.loads((run / "summary.json").read_text())["test"]["srcc"])
    assert {"plots/curves/_type", "plots/scatter_test/_type"} <= {key for row in rows for key in row}  # wandb.Image


def test_tracker_failing_mid_run_does_not_stop_training(small_synthetic, tmp_path, capsys, monkeypatch):
    """The MLflow store's run folder vanishes after epoch 1 is saved (a disk gone): one warning line, the
    training goes on to its summary, TensorBoard keeps logging."""
    from kdiqa_edge.data import prepare
    from kdiqa_edge.models.teacher import load_teacher
    from kdiqa_edge.train.finetune import finetune_loss
    from kdiqa_edge.train.loop import TrainConfig, Trainer

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "mlruns"

    class StoreGone(Trainer):
        def save_checkpoint(self, best: bool = False) -> None:
            super().save_checkpoint(best)
            if self.epoch == 1:
                shutil.rmtree(store)

    teacher = load_teacher("tiny")
    cache, split = prepare(small_synthetic, teacher.preprocess, seed=0, progress=False)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-4, progress=False, loggers=["mlflow", "tensorboard"],
                      mlflow_uri=str(store))
    summary = StoreGone(teacher, finetune_loss, cache, split, cfg, tmp_path / "run",
                        extra_meta={"stage": "teacher-finetune"}).fit()
    assert summary["epochs"] == 2 and (tmp_path / "run" / "summary.json").is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: mlflow stopped logging (")
    assert "training goes on" in warnings[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2 * STEPS_PER_EPOCH))


def test_logger_names_and_missing_packages_are_one_line(tmp_path, monkeypatch):
    code, _, err = _cli(["teacher", "finetune", "--teacher", "tiny", "--logger", "comet", "--out", tmp_path / "r"])
    assert code == 2 and err.strip().splitlines() == ["error: unknown logger 'comet'; choose one of: mlflow, "
                                                      "tensorboard, wandb"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's own way to make a package not importable
    code, _, err = _cli(["teacher", "finetune", "--teacher", "tiny", "--logger", "wandb", "--out", tmp_path / "r"])
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert "--logger wandb needs wandb" in err and "pip install 'kdiqa-edge[track]'" in err
    assert not (tmp_path / "r").exists()


def _ddp_worker(rank: int, world_size: int, port: int, root: str, run_dir: str, cache_dir: str):
    from kdiqa_edge.data import DatasetSpec, prepare
    from kdiqa_edge.models.teacher import load_teacher
    from kdiqa_edge.train.finetune import finetune_loss
    from kdiqa_edge.train.loop import TrainConfig, Trainer

    become_rank(rank, world_size, port, cache_dir)
    teacher = load_teacher("tiny")
    cache, split = prepare(DatasetSpec(name="synthetic", root=root), teacher.preprocess, seed=0, progress=False)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-4, progress=False, augment="none", loggers=["tensorboard"])
    Trainer(teacher, finetune_loss, cache, split, cfg, run_dir, extra_meta={"stage": "teacher-finetune"}).fit()


def test_rank_zero_alone_logs_under_torchrun(small_synthetic, tmp_path):
    """2 gloo processes train one run dir: one TensorBoard event file (rank 0's), holding steps.csv."""
    import torch.multiprocessing as mp
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdiqa_edge import paths

    run = tmp_path / "run"
    # spawned: forking a process whose autograd threads have run (any test before this one in the same worker)
    # is refused by torch
    mp.spawn(_ddp_worker, args=(2, free_port(), str(small_synthetic.root), str(run), str(paths.cache_dir())), nprocs=2)
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [int(r["step"]) for r in _csv(run / "steps.csv")]
    assert list(json.loads((run / "trackers.json").read_text())) == ["tensorboard"]


def test_register_export_in_mlflow_server_and_load_models_uri(tracked_run, mlflow_server, tmp_path, monkeypatch,
                                                               capsys):
    """The fine-tuned checkpoint's ONNX export, registered twice on a live `mlflow server`: versions 1 and 2,
    whose files `models:/NAME/2` resolves to and QualityModel opens, scoring as the export itself does."""
    import numpy as np
    from mlflow import MlflowClient

    from kdiqa_edge import QualityModel
    from kdiqa_edge.export import ExportConfig, export_checkpoint
    from kdiqa_edge.runtime.registry_uri import resolve_model_uri
    from kdiqa_edge.train.trackers.registry import register_export

    run, _ = tracked_run
    url = mlflow_server.wait_ready()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    out = tmp_path / "exports"
    export_checkpoint(run, ExportConfig(target="onnx", precision="fp32"), out, progress=False, log=lambda _: None)
    first = register_export(out, "tiny-iqa", ["onnx-fp32"], log=lambda _: None)
    # the second through the CLI: the export is up to date, so it is reused and registered as version 2
    code, said, err = run_cli(["export", run, "--target", "onnx", "--precision", "fp32", "--out", out,
                               "--mlflow-register", "tiny-iqa", "--mlflow-uri", url], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert first.version == "1" and "tiny-iqa" in said + err
    client = MlflowClient(url)
    version = client.get_model_version("tiny-iqa", "2")
    assert version.run_id != first.run_id and version.tags["kdiqa_edge.file"] == "model.fp32.onnx"
    logged = client.get_run(version.run_id)
    assert logged.data.metrics["onnx-fp32/parity.max_abs_diff"] < 1e-4
    assert {a.path for a in client.list_artifacts(version.run_id)} >= {"manifest.json", "onnx-fp32"}

    path = resolve_model_uri("models:/tiny-iqa/2")
    assert path.read_bytes() == (out / "onnx-fp32" / "model.fp32.onnx").read_bytes()
    assert resolve_model_uri("models:/tiny-iqa/latest") == path
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    registered = QualityModel.load("models:/tiny-iqa/2")
    exported = QualityModel.load(out / "onnx-fp32" / "model.fp32.onnx")
    np.testing.assert_array_equal(registered.predict(images), exported.predict(images))
    from PIL import Image

    Image.fromarray(images[0]).save(tmp_path / "photo.png")
    rows = {}
    for model in ("models:/tiny-iqa/2", out / "onnx-fp32" / "model.fp32.onnx"):  # score takes the URI as load does
        code, said, err = run_cli(["score", model, tmp_path / "photo.png", "--format", "csv", "--out",
                                   tmp_path / f"{len(rows)}.csv"], capsys)
        assert code == 0, err
        rows[str(model)] = (tmp_path / f"{len(rows)}.csv").read_text()
    assert len(set(rows.values())) == 1 and "photo.png" in rows["models:/tiny-iqa/2"]
