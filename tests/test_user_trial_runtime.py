"""Issue 30 (what a new user hit), the torch-free side: `bench` on the run's own data and split, rows named by
export folder, "not pretrained" in score/bench/QualityModel, score's exit status, summary and option names, and
one-line errors naming the missing file. Every check goes through the real CLI where the defect was in it."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import pytest
from test_runtime_helpers import export_tiny_onnx, real_photos
from typer.testing import CliRunner

from kdiqa_edge.cli import app, main

torch = pytest.importorskip("torch")

FAST = ["--batch-sizes", "1", "--warmup", "0", "--runs", "1", "--rounds", "1"]


def _cli(args) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory) -> Path:
    """A user's own CSV set (columns `name` and `mos_quality`, images in `pics/`), distilled the quick way
    from inside its folder with relative paths, as the issue's user did: test_resnet from the tiny teacher."""
    from kdiqa_edge.data.synthetic import generate

    folder = tmp_path_factory.mktemp("user")
    generate(folder / "pics", refs=3, seed=5, size=(86, 64))
    with open(folder / "pics" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "mos_quality"])
        writer.writerows([row["image"], row["mos"]] for row in rows)
    with contextlib.chdir(folder), pytest.raises(SystemExit) as exit_info:
        main(["distill", "--dataset", "csv", "--csv", "labels.csv", "--image-dir", "pics", "--image-col", "name",
              "--mos-col", "mos_quality", "--teacher", "tiny", "--teacher-epochs", "1", "--no-pretrained",
              "--student", "test_resnet", "--epochs", "1", "--quiet", "--out", "runs/mine"])
    assert exit_info.value.code in (0, None)
    return folder / "runs" / "mine"


@pytest.fixture(scope="module")
def exports(csv_run, tmp_path_factory) -> Path:
    """The run exported as the README does it: OUT/onnx-fp32/model.fp32.onnx and OUT/onnx-int8/model.int8.onnx."""
    from kdiqa_edge.data.runs import run_data
    from kdiqa_edge.export import ExportConfig, export_checkpoint

    out = tmp_path_factory.mktemp("exports")
    common = {"calib": 16, "parity_images": 4, "eval_images": 16, "latency_runs": 2, "threads": 1}
    for precision in ("fp32", "int8"):
        export_checkpoint(csv_run, ExportConfig(target="onnx", precision=precision, **common), out,
                          data=run_data(csv_run).dataset, progress=False, log=lambda message: None)
    return out


def _test_srcc(run: Path) -> tuple[float, int]:
    summary = json.loads((run / "summary.json").read_text())
    return summary["test"]["srcc"], summary["test"]["n"]


# --- defect 2: bench measures the run's data -------------------------------------------------------------


def test_bench_reference_on_a_csv_run_reports_the_runs_own_test_srcc(csv_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # elsewhere: the run recorded its dataset relative to its own folder
    result = _cli(["bench", csv_run, "--reference", csv_run, *FAST, "--json-out", tmp_path / "b.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    srcc, n = _test_srcc(csv_run)
    with open(csv_run / "metrics.csv", newline="") as handle:
        last_epoch = list(csv.DictReader(handle))[-1]  # one epoch: the best one, the checkpoint benched
    assert float(last_epoch["srcc"]) == pytest.approx(srcc, abs=1e-5)
    for row in report["results"]:
        assert row["status"] == "ok" and row["backend"] == "torch", row
        assert row["metrics"]["n"] == n and row["metrics"]["srcc"] == pytest.approx(srcc, abs=1e-4)
    dataset = report["dataset"]
    assert dataset["origin"] == "run" and dataset["name"] == "csv" and dataset["split"] == "test"
    assert Path(dataset["split_file"]) == csv_run / "split.json" and report["headline"] is None
    assert "NOT your data" not in result.output and "Accuracy: csv (the data " in result.stdout
    assert "test split of" in " ".join(result.stdout.split())  # the caption wraps at the terminal's width


def test_bench_on_the_exports_of_a_csv_run_uses_its_data_and_names_rows_by_export_folder(csv_run, exports,
                                                                                          tmp_path):
    """The README's form, `bench exports/*/*.onnx --reference runs/x`: the FP32 export scores the run's test
    split as the run did; rows are onnx-fp32 and onnx-int8 (both files once read as 'model.*.onnx')."""
    models = sorted(exports.glob("*/*.onnx"))
    result = _cli(["bench", *models, "--reference", csv_run, *FAST, "--json-out", tmp_path / "b.json",
                   "--markdown", tmp_path / "b.md", "--plot", tmp_path / "b.png"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    rows = {row["name"]: row for row in report["results"]}
    assert list(rows) == ["mine", "onnx-fp32", "onnx-int8"]
    srcc, n = _test_srcc(csv_run)
    assert rows["onnx-fp32"]["metrics"]["n"] == n and rows["onnx-fp32"]["metrics"]["srcc"] == pytest.approx(srcc,
                                                                                                          abs=1e-4)
    assert rows["onnx-int8"]["precision"] == "int8" and report["dataset"]["origin"] == "run"
    for name in ("onnx-fp32", "onnx-int8"):
        assert f"│ {name}" in result.stdout and f"| {name} |" in (tmp_path / "b.md").read_text()


def test_bench_of_a_run_dir_without_a_reference_uses_that_runs_data(csv_run, tmp_path):
    result = _cli(["bench", csv_run, *FAST, "--json-out", tmp_path / "b.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["dataset"]["origin"] == "run" and report["headline"] is None
    assert report["results"][0]["metrics"]["srcc"] == pytest.approx(_test_srcc(csv_run)[0], abs=1e-4)


def test_export_folder_names_tell_auto_from_int8_and_clashing_runs_apart(tmp_path):
    from kdiqa_edge.bench.runner import BenchResult, _distinct_names

    def export(out: Path, folder: str, *files: str) -> list[Path]:
        (out / folder).mkdir(parents=True)
        manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {
            "format": "kdiqa-edge-export/1", "exports": {}}
        manifest["exports"][folder] = {"files": [{"path": f"{folder}/{name}"} for name in files]}
        (out / "manifest.json").write_text(json.dumps(manifest))
        for name in files:
            (out / folder / name).write_bytes(b"")
        return [out / folder / name for name in files]

    paths = [*export(tmp_path / "a", "onnx-auto", "model.onnx"), *export(tmp_path / "a", "onnx-int8", "model.int8.onnx"),
             *export(tmp_path / "b", "onnx-int8", "model.int8.onnx"),
             *export(tmp_path / "a", "tensorrt-int8", "model.int8.onnx", "model.int8.engine")]
    loose = tmp_path / "loose" / "model.onnx"  # not in an export folder: its file name
    loose.parent.mkdir()
    loose.write_bytes(b"")
    results = [BenchResult(model=str(p), name="", format="ONNX", precision="int8") for p in [*paths, loose]]
    _distinct_names(results)
    assert [r.name for r in results] == ["onnx-auto", "a/onnx-int8", "b/onnx-int8",
                                         "tensorrt-int8/model.int8.onnx", "tensorrt-int8/model.int8.engine",
                                         "model.onnx"]


def test_dataset_options_win_over_the_runs_and_say_so(csv_run, tmp_path):
    from kdiqa_edge.data.synthetic import generate

    other = generate(tmp_path / "other", refs=2, seed=9, size=(86, 64))
    result = _cli(["bench", csv_run, "--reference", csv_run, *FAST, "--dataset", "synthetic", "--root", other,
                   "--split-seed", "1", "--json-out", tmp_path / "b.json"])
    assert result.exit_code == 0, result.output
    assert "the dataset options given here win over the dataset of" in result.stderr.splitlines()[0]
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["dataset"]["origin"] == "options" and report["dataset"]["split_seed"] == 1
    assert report["dataset"]["spec"]["root"] == str(other) and report["dataset"]["split_file"] is None
    assert any("win over" in note for note in report["notes"])


def test_bench_without_a_run_says_synthetic_on_its_first_line(tmp_path, monkeypatch):
    """A bare artifact as the reference names no dataset: the built-in set is used, and the first line says so
    (the built-in set is made small here: the fallback generates it on first use)."""
    from kdiqa_edge.data import synthetic

    generate = synthetic.generate
    monkeypatch.setenv("KDIQA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "generate", lambda out, refs, seed, progress: generate(out, 2, seed, size=(86, 64)))
    model = export_tiny_onnx(tmp_path / "student.onnx")
    result = _cli(["bench", model, "--reference", model, *FAST, "--json-out", tmp_path / "b.json",
                   "--markdown", tmp_path / "b.md"])
    assert result.exit_code == 0, result.output
    first = result.stderr.splitlines()[0]
    assert first.startswith("note: accuracy on the built-in synthetic set, NOT your data: the reference ")
    assert "is not a run dir" in first and "--reference RUN_DIR" in first
    assert "NOT your data" in result.stdout.strip().splitlines()[0]  # the table's title
    assert "NOT your data" in (tmp_path / "b.md").read_text().splitlines()[2]
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["headline"].startswith("accuracy on the built-in") and report["dataset"]["origin"] == "synthetic"


def test_bench_old_option_spellings_still_work_with_one_deprecation_line(csv_run, tmp_path):
    result = _cli(["bench", csv_run, "--reference", csv_run, *FAST, "--seed", "0", "--json", tmp_path / "b.json"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert warnings == ["warning: --seed is deprecated here, use --split-seed",
                        "warning: --json PATH is deprecated here, use --json-out PATH (--json is an on/off switch "
                        "in the other commands)"]
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["config"]["split_seed"] == 0 and report["dataset"]["origin"] == "run"
    help_text = _cli(["bench", "--help"]).stdout
    assert "--json-out" in help_text and "--split-seed" in help_text
    assert "--seed " not in help_text and "--json " not in help_text


# --- defect 7: not pretrained, everywhere ------------------------------------------------------------------


def test_not_pretrained_is_said_by_score_bench_and_the_repr(csv_run, exports, tmp_path):
    from kdiqa_edge.runtime import QualityModel

    fp32 = exports / "onnx-fp32" / "model.fp32.onnx"
    image = next((csv_run.parent.parent / "pics" / "images").iterdir())
    result = _cli(["score", fp32, image])
    assert result.exit_code == 0, result.output
    assert (f"note: {fp32} is not pretrained (random init): its scores are a smoke test, not image quality"
            in result.stderr.splitlines())
    assert "not pretrained (random init)" in repr(QualityModel.load(fp32))
    assert "not pretrained" in repr(QualityModel.load(csv_run))  # a run dir: its model.json says so

    result = _cli(["bench", fp32, "--reference", csv_run, *FAST, "--json-out", tmp_path / "b.json",
                   "--markdown", tmp_path / "b.md"])
    assert result.exit_code == 0, result.output
    assert "mine, onnx-fp32 are not pretrained (random init): their SRCC, PLCC and drift are a smoke test" in \
        " ".join(result.stdout.split())
    report = json.loads((tmp_path / "b.json").read_text())
    assert [row["pretrained"] for row in report["results"]] == [False, False]
    assert report["notes"][0].startswith("mine, onnx-fp32 are not pretrained")
    text = (tmp_path / "b.md").read_text()
    assert "| Pretrained |" in text and "| NO (random init) |" in text


@pytest.mark.parametrize("recorded", [True, None])
def test_a_pretrained_model_or_one_that_does_not_say_gets_no_such_note(recorded, tmp_path):
    import onnx

    from kdiqa_edge.runtime import QualityModel

    model = export_tiny_onnx(tmp_path / "tiny.onnx")
    graph = onnx.load(str(model))
    for prop in graph.metadata_props:
        if prop.key == "kdiqa_edge.source":
            source = {key: value for key, value in json.loads(prop.value).items() if key != "pretrained"}
            prop.value = json.dumps(source if recorded is None else {**source, "pretrained": recorded})
    onnx.save(graph, str(model))
    assert QualityModel.load(model).info.pretrained is recorded
    photo = real_photos(tmp_path / "photos")[0]
    result = _cli(["score", model, photo])
    assert result.exit_code == 0 and "note:" not in result.output and "not pretrained" not in result.output
    assert "not pretrained" not in repr(QualityModel.load(model))


# --- defect 6, 13, 11: score's exit status, summary, errors and option names -------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("tiny")
    return export_tiny_onnx(folder / "tiny.onnx"), real_photos(folder / "photos")


def test_score_exits_nonzero_when_a_named_path_is_missing_after_scoring_the_others(tiny, tmp_path):
    model, photos = tiny
    result = _cli(["score", model, photos[0], tmp_path / "typo.jpg", tmp_path / "no-such-folder", photos[1]])
    assert result.exit_code == 1
    rows = result.stdout.splitlines()
    assert [row.split("\t")[0] for row in rows] == [str(photos[0]), str(tmp_path / "typo.jpg"),
                                                   str(tmp_path / "no-such-folder"), str(photos[1])]
    assert rows[1].endswith("\terror: no such file or directory")
    summary, error = result.stderr.splitlines()[-2:]
    assert summary.startswith("2 scored, 2 unreadable in ") and summary.endswith(" images/s")
    assert error == f"error: no such file or directory: {tmp_path / 'typo.jpg'}, {tmp_path / 'no-such-folder'}"


def test_score_exits_nonzero_when_nothing_was_scored(tiny, tmp_path):
    model, _ = tiny
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    result = _cli(["score", model, tmp_path / "empty"])
    assert result.exit_code == 1 and result.stdout == ""
    summary, error = result.stderr.splitlines()[-2:]
    assert summary.startswith("0 scored, 0 unreadable in ") and "images/s" not in summary
    assert summary.endswith(" s; 1 other files ignored (no image suffix)") and error == "error: no image was scored"
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    result = _cli(["score", model, tmp_path / "broken.jpg"])
    assert result.exit_code == 1 and "not an image" in result.stdout


def test_score_with_some_unreadable_images_exits_zero_and_reports_images_per_second(tiny, tmp_path):
    model, photos = tiny
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    result = _cli(["score", model, *photos, tmp_path / "broken.jpg"])
    assert result.exit_code == 0, result.output
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith(f"{len(photos)} scored, 1 unreadable in ") and summary.endswith(" images/s")
    seconds, rate = summary.split(" in ")[1].split(" s, ")
    assert float(rate.split()[0]) > 0 and float(seconds) >= 0
    assert "Exit status: 0 when" in _cli(["score", "--help"]).stdout


def test_a_missing_model_file_is_one_line_naming_it(tiny, tmp_path, capsys):
    _, photos = tiny
    for name in ("gone.onnx", "gone.pte", "gone.engine"):
        with pytest.raises(SystemExit) as exit_info:
            main(["score", str(tmp_path / name), str(photos[0])])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err == f"error: no such file: {tmp_path / name}\n", err


def test_image_load_errors_name_the_file_and_rows_keep_the_reason_alone(tiny, tmp_path):
    from kdiqa_edge.preprocess import ImageLoadError
    from kdiqa_edge.runtime import QualityModel

    model = QualityModel.load(tiny[0])
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError) as info:
        model.score(missing)
    assert str(info.value) == f"{missing}: file not found" and info.value.reason == "file not found"
    (result,) = model.score_files([missing])
    assert result.error == "file not found"


def test_score_output_format_spellings(tiny):
    model, photos = tiny
    as_csv = _cli(["score", model, photos[0], "--format", "csv"])
    assert as_csv.exit_code == 0 and as_csv.stdout.splitlines()[0] == "image,score,error"
    assert "deprecated" not in as_csv.stderr
    for args in (["--format", "json"], ["--json"]):
        as_json = _cli(["score", model, photos[0], *args])
        assert as_json.exit_code == 0 and json.loads(as_json.stdout)["image"] == str(photos[0])
    old = _cli(["score", model, photos[0], "--csv"])
    assert old.exit_code == 0 and old.stdout == as_csv.stdout
    assert [line for line in old.stderr.splitlines() if "deprecated" in line] == [
        "warning: --csv is deprecated here, use --format csv"]
    clash = CliRunner().invoke(app, ["score", str(model), str(photos[0]), "--json", "--format", "csv"])
    assert clash.exit_code != 0 and "--json and --format csv are exclusive" in str(clash.exception)
    help_text = _cli(["score", "--help"]).stdout
    assert "--format" in help_text and "--csv" not in help_text
