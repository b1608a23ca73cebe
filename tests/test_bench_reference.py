"""`bench` judges what it is given before measuring it, through the real CLI: a model scored on the test split of
a run it was not distilled in (it may have trained on those images) is refused, a missing path is one line
before any work, a failed row exits 1, a run among the models gives the data when the reference is no run, and
a report path that is a folder is refused before any work (it was replaced by the report).

Runs are made as distill leaves them (config.yaml, checkpoints/best), from two random-init test_resnet
checkpoints of different weights, on the shared small synthetic set: no training here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import run_cli

pytest.importorskip("torch")
pytest.importorskip("onnx")

QUICK = ["--batch-sizes", "1", "--warmup", "1", "--runs", "2", "--rounds", "1", "--max-images", "8"]
NO_ACCURACY = ["--no-accuracy", "--batch-sizes", "1", "--warmup", "0", "--runs", "1", "--rounds", "1"]


def _make_run(run: Path, checkpoint: Path, root: Path, split_seed: int) -> Path:
    shutil.copytree(checkpoint, run / "checkpoints" / "best")
    (run / "config.yaml").write_text(f"student: test_resnet\ndataset:\n  name: synthetic\n  root: {root}\n"
                                     f"split_seed: {split_seed}\nval_fraction: 0.0\ntest_fraction: 0.2\n"
                                     "split_by: auto\n")
    return run


def _export_onnx(checkpoint: Path, path: Path, with_source: bool = True) -> Path:
    """The checkpoint as an FP32 ONNX with the metadata export writes (`source` dropped: a foreign model's)."""
    from kdiqa_edge.export import ExportConfig
    from kdiqa_edge.export.onnx import export_fp32, score_model, set_metadata
    from kdiqa_edge.export.pipeline import artifact_meta
    from kdiqa_edge.models import load_checkpoint

    model = load_checkpoint(checkpoint)
    scored = score_model(model, ExportConfig())
    export_fp32(scored, path, ExportConfig.opset)
    meta = {**artifact_meta(model), "target": "onnx", "precision": "fp32", "input": scored.input_spec(),
            "outputs": scored.output_names}
    if not with_source:
        meta.pop("source")
    set_metadata(path, meta)
    return path


def _hash(checkpoint: Path) -> str:
    return json.loads((checkpoint / "model.json").read_text())["content_hash"]


@pytest.fixture(scope="module")
def project(student_checkpoints, small_synthetic, tmp_path_factory) -> dict[str, Path]:
    """runs/a (checkpoint a, split seed 0), runs/b (checkpoint b, split seed 1: other test images), runs/twin
    (checkpoint b, split seed 0: runs/a's test images), a.onnx (checkpoint a's export, recording its hash, no
    manifest) and foreign.onnx (the same without `source`)."""
    found = student_checkpoints("bench-reference", {"a": "test_resnet", "b": "test_resnet"})
    folder = tmp_path_factory.mktemp("bench-reference")
    root = Path(small_synthetic.root)
    return {"a": _make_run(folder / "runs" / "a", found["a"], root, 0),
            "b": _make_run(folder / "runs" / "b", found["b"], root, 1),
            "twin": _make_run(folder / "runs" / "twin", found["b"], root, 0),
            "a.onnx": _export_onnx(found["a"], folder / "a.onnx"),
            "foreign.onnx": _export_onnx(found["a"], folder / "foreign.onnx", with_source=False),
            "hash_a": _hash(found["a"]), "hash_b": _hash(found["b"]), "root": root}


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_a_model_distilled_in_another_run_is_refused_on_that_runs_test_split(project, tmp_path, capsys):
    report = tmp_path / "bench.json"
    for model in (project["a.onnx"], project["a"]):  # an export recording its checkpoint, and a run dir
        code, _, err = run_cli(["bench", model, "--reference", project["b"], *QUICK, "--fail-under", "srcc=-1",
                                "--json-out", report], capsys)
        errors = _errors(err)
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
        line = errors[0]
        assert f"{model} records checkpoint {project['hash_a'][:12]}" in line, line
        assert f"best {project['hash_b'][:12]}" in line and f"test split of {project['b']} may hold images it " \
                                                               "trained on" in line, line
        assert "pass the run it was distilled in as --reference" in line and "--dataset/--root" in line, line
        assert not report.exists()  # refused, not gated: no report says it passed


def test_the_models_own_run_or_one_holding_out_the_same_images_passes_and_a_sourceless_model_is_noted(
        project, tmp_path, capsys):
    # runs/twin holds checkpoint b, not a: but it split the same dataset with runs/a's seed, so its model never
    # saw runs/a's test images
    code, _, err = run_cli(["bench", project["a.onnx"], project["twin"], "--reference", project["a"], *QUICK,
                            "--json-out", tmp_path / "own.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "own.json").read_text())
    assert [r["status"] for r in report["results"]] == ["ok", "ok", "ok"]
    assert not any("checkpoint" in note for note in report["notes"]), report["notes"]

    code, _, err = run_cli(["bench", project["foreign.onnx"], "--reference", project["b"], *QUICK,
                            "--json-out", tmp_path / "foreign.json"], capsys)
    assert code == 0, err
    notes = json.loads((tmp_path / "foreign.json").read_text())["notes"]
    assert (f"{project['foreign.onnx']} records no checkpoint hash: bench cannot tell whether the test split of "
            f"{project['b']} holds images it trained on") in notes, notes

    # the dataset options name runs/b's dataset: the user chose it, so a.onnx is scored there with a note
    code, _, err = run_cli(["bench", project["a.onnx"], "--reference", project["b"], "--dataset", "synthetic",
                            "--root", project["root"], *QUICK, "--json-out", tmp_path / "named.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "named.json").read_text())
    assert report["dataset"]["origin"] == "run"
    said = [n for n in report["notes"] if n.startswith(f"{project['a.onnx']} records checkpoint")]
    assert len(said) == 1 and project["hash_a"][:12] in said[0] and project["hash_b"][:12] in said[0], said


def test_a_missing_path_is_one_line_before_any_work_and_a_failed_row_exits_1(project, tmp_path, capsys):
    report = tmp_path / "bench.json"
    for args, says in (([project["a.onnx"], "--reference", tmp_path / "nope"],
                        f"--reference {tmp_path / 'nope'}: no such file or directory"),
                       ([tmp_path / "nope.onnx", project["a.onnx"]], f"no such model: {tmp_path / 'nope.onnx'}")):
        code, out, err = run_cli(["bench", *args, *QUICK, "--json-out", report], capsys)
        errors = _errors(err)
        assert code == 2 and errors == [f"error: {says}"] and "Traceback" not in err, err
        assert out == "" and not report.exists()  # before any work: no table, no report

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    code, out, err = run_cli(["bench", project["a.onnx"], broken, *NO_ACCURACY, "--json-out", report], capsys)
    assert code == 1, err
    assert "bench: 1 of 2 model(s) failed: broken.onnx at load" in err.splitlines(), err
    assert [r["status"] for r in json.loads(report.read_text())["results"]] == ["ok", "failed"]


def test_a_run_among_the_models_gives_the_data_when_the_reference_is_not_a_run(project, tmp_path, capsys):
    code, _, err = run_cli(["bench", project["a"], project["a.onnx"], "--reference", project["a.onnx"], *QUICK,
                            "--json-out", tmp_path / "bench.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["headline"] is None and "NOT your data" not in err
    assert report["dataset"]["origin"] == "run" and report["dataset"]["source"] == f"synthetic (the data " \
                                                                                    f"{project['a']} trained on)"
    reference, *_ = report["results"]
    assert reference["reference"] and reference["model"] == str(project["a.onnx"])


@pytest.mark.parametrize("option, example", [("--json-out", "bench.json"), ("--markdown", "bench.md"),
                                             ("--plot", "bench.png")])
def test_a_report_path_that_is_a_folder_is_refused_before_any_work(project, tmp_path, capsys, monkeypatch, option,
                                                                   example):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's")
    monkeypatch.chdir(tmp_path)
    for given, named in ((folder, folder / example), (Path("."), Path(example))):
        code, out, err = run_cli(["bench", project["a.onnx"], *NO_ACCURACY, option, given], capsys)
        assert code == 2 and _errors(err) == [f"error: {option} {given} is a folder: name a file, e.g. {named}"], err
        assert out == ""  # before any work: nothing benched, nothing written
    assert (folder / "keep.txt").read_text() == "the user's" and sorted(p.name for p in tmp_path.iterdir()) == [
        "results"]

    deeper = tmp_path / "new" / "deeper" / example  # a missing parent folder is made, as before
    code, _, err = run_cli(["bench", project["a.onnx"], *NO_ACCURACY, option, deeper], capsys)
    assert code == 0 and deeper.is_file() and deeper.stat().st_size > 0, err


# -- which test images bench scores

def test_max_images_spreads_over_the_test_contents_and_a_tiny_test_split_is_said(small_synthetic, tmp_path):
    """--max-images took the first N test images: on a split by reference content, N images of one content.
    A test split under 3 images makes bench score every image, training ones included: a note says so."""
    from kdiqa_edge.bench.accuracy import FROM_OPTIONS, EvalData, EvalSource
    from kdiqa_edge.data import load_dataset, make_split
    from kdiqa_edge.preprocess import PreprocessSpec

    spec, small = EvalSource(small_synthetic, FROM_OPTIONS, test_fraction=0.5), PreprocessSpec(size=32)
    records = load_dataset(small_synthetic).records
    test = make_split(load_dataset(small_synthetic), seed=0, test_fraction=0.5).test
    contents = {records[i].ref for i in test}
    assert len(contents) >= 2 and len(test) >= 2 * 30  # 30 images a content
    data = EvalData(spec, max_images=8, progress=False)
    chosen = data.get(small)
    assert len(chosen.names) == 8 and set(chosen.names) <= {records[i].image for i in test}
    by_name = {r.image: r.ref for r in records}
    assert {by_name[name] for name in chosen.names} == contents  # every test content, not the first one's
    assert not data.notes and chosen.split == "test"

    one = tmp_path / "one"  # two references, a split that holds one image out: fewer than 3 test images
    shutil.copytree(small_synthetic.root, one)
    lines = (one / "scores.csv").read_text().splitlines()
    refs = sorted({r.ref for r in records})[:1]
    kept = [lines[0]] + [line for line in lines[1:] if any(f",{ref}," in f",{line}," for ref in refs)][:4]
    (one / "scores.csv").write_text("\n".join(kept) + "\n")
    tiny = EvalData(EvalSource(type(small_synthetic)(name="synthetic", root=one), FROM_OPTIONS),
                    progress=False)
    assert tiny.get(small).split == "all" and len(tiny.get(small).names) == 4
    assert any("training images included" in note for note in tiny.notes)
