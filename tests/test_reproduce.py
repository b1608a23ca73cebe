"""`kdiqa-edge reproduce`: the paper's protocol on the synthetic set, tables written, finished runs skipped."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("timm")

from kdiqa_edge.cli import app
from kdiqa_edge.paper import table_i, table_ii
from kdiqa_edge.train.reproduce import ReproduceConfig, plan


def _args(data, out):
    return ["reproduce", "--dataset", "synthetic", "--root", str(data.root), "--students", "test_efficientnet",
            "--seeds", "2", "--epochs", "1", "--teacher", "tiny", "--no-pretrained", "--batch-size", "32",
            "--out", str(out)]


def test_plan_has_one_teacher_per_seed_and_no_teacher_for_regression(tmp_path):
    runs = plan(ReproduceConfig(students=["a", "b"], variants=["full", "soft"], seeds=3), tmp_path)
    assert [r.name for r in runs if r.seed == 0] == ["teacher", "a-full", "a-soft", "b-full", "b-soft"]
    assert len(runs) == 15
    runs = plan(ReproduceConfig(students=["a"], variants=["regression"], seeds=2), tmp_path)
    assert all(r.stage == "distill" for r in runs) and len(runs) == 2


def test_paper_tables_hold_the_published_figures():
    assert table_i("mobilevit_s", "koniq") == (0.912, 0.890)
    assert table_ii("resnet18", "soft", "koniq") == 0.881
    assert table_ii("resnet18", "soft", "tid2013") is None


def test_reproduce_runs_writes_both_tables_and_skips_finished_runs(small_synthetic, tmp_path):
    runner = CliRunner()
    out = tmp_path / "repro"
    result = runner.invoke(app, _args(small_synthetic, out))
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    rows = {row["run"]: row for row in results["rows"]}
    assert rows["test_efficientnet-full"]["n"] == 2 and rows["teacher"]["n"] == 2
    assert [r["seed"] for r in rows["test_efficientnet-full"]["runs"]] == [0, 1]
    assert -1.0 <= rows["test_efficientnet-full"]["srcc_median"] <= 1.0
    table1 = (out / "table1.md").read_text()
    assert "| test_efficientnet | 2 |" in table1 and "teacher tiny (not pretrained), fine-tuned" in table1
    assert "| test_efficientnet | full | 2 |" in (out / "table2.md").read_text()
    # --no-pretrained and the tiny teacher: every row says it is random init, and the tables say what that means
    assert all(line.endswith("| not pretrained |") for line in table1.splitlines() if line.startswith("| t"))
    assert "a smoke test of the pipeline, not the paper's setting" in table1
    assert rows["test_efficientnet-full"]["not_pretrained"] == ["model", "teacher"]
    # the two seeds are two different splits
    split0 = json.loads((out / "seed0" / "test_efficientnet-full" / "split.json").read_text())
    split1 = json.loads((out / "seed1" / "test_efficientnet-full" / "split.json").read_text())
    assert split0["test"] != split1["test"]

    stamp = (out / "seed1" / "test_efficientnet-full" / "summary.json").stat().st_mtime_ns
    again = runner.invoke(app, _args(small_synthetic, out))
    assert again.exit_code == 0, again.output
    assert again.output.count("done, skipped") == 4
    assert (out / "seed1" / "test_efficientnet-full" / "summary.json").stat().st_mtime_ns == stamp

    dry = runner.invoke(app, _args(small_synthetic, out) + ["--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "0 of 4 runs to do" in dry.output
