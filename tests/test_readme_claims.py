"""What the README promises about our output, checked through the real CLI.

The README's first paragraph says that with random weights "every output says so ("not pretrained")": the
accuracy figures of such a run are a smoke test, and a user must not read them as IQA results. Every command
that shows a model's figures is run here on one random-init run and must say it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("onnx")

from kdiqa_edge.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_PRETRAINED = re.compile(r"not pretrained|NOT PRETRAINED", re.IGNORECASE)


def _run(args: list[str]):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output  # stdout and stderr together: the user's terminal


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, small_synthetic):
    out = tmp_path_factory.mktemp("claims")
    run = out / "run"
    text = _run(["distill", "--dataset", "synthetic", "--root", small_synthetic.root, "--teacher", "tiny",
                 "--teacher-epochs", "1", "--student", "test_resnet", "--no-pretrained", "--epochs", "1",
                 "--quiet", "--out", run])
    return run, out, text, small_synthetic


def test_the_readme_still_makes_the_claim():
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert 'every output says so ("not pretrained"' in text


def test_every_output_of_a_random_init_run_says_not_pretrained(random_run):
    run, out, distill_text, data = random_run
    said = {"distill": distill_text}
    said["export"] = _run(["export", run, "--precision", "fp32", "--out", out / "exports"])
    artifact = out / "exports" / "onnx-fp32" / "model.fp32.onnx"
    images = sorted((Path(data.root) / "images").iterdir())[:2]
    said["score"] = _run(["score", artifact, *images])
    said["score --format json"] = _run(["score", artifact, *images, "--format", "json"])
    said["bench"] = _run(["bench", artifact, "--reference", run, "--batch-sizes", "1", "--runs", "2",
                          "--warmup", "1", "--max-images", "10", "--markdown", out / "bench.md",
                          "--json-out", out / "bench.json"])
    said["bench --markdown"] = (out / "bench.md").read_text()
    rows = json.loads((out / "bench.json").read_text())["results"]
    said["bench --json-out"] = " ".join("not pretrained" for r in rows if r.get("pretrained") is False)
    said["teacher eval"] = _run(["teacher", "eval", "--teacher", "tiny", "--dataset", "synthetic", "--root",
                                 data.root])

    from kdiqa_edge.runtime import QualityModel

    said["QualityModel repr"] = repr(QualityModel.load(artifact))
    silent = [name for name, text in said.items() if not NOT_PRETRAINED.search(text)]
    assert not silent, f"these outputs do not say 'not pretrained': {silent}"
    assert len(rows) == 2 and all(r["pretrained"] is False for r in rows)
