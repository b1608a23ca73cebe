"""The package skeleton: CLI entry point, error handling, registry, configs, atomic writes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from kdiqa_edge import config, io
from kdiqa_edge.errors import ConfigError, first_line
from kdiqa_edge.registry import Registry


def test_cli_help_and_version():
    out = subprocess.run([sys.executable, "-m", "kdiqa_edge", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "kdiqa-edge" in out.stdout
    out = subprocess.run([sys.executable, "-m", "kdiqa_edge", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "0.1.0" in out.stdout


def test_registry_refuses_duplicates_and_names_choices():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="duplicate"):
        reg.register("a")(2)
    with pytest.raises(ConfigError, match="choose one of: a"):
        reg.get("b")


@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-4  # learning rate
    epochs: int = 100  # epochs


def test_config_file_then_cli_overrides_and_none_never_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\n")
    cfg = config.resolve(_Cfg, path, lr=None, epochs=None)
    assert cfg == _Cfg(lr=1e-4, epochs=5)
    assert config.resolve(_Cfg, path, epochs=7).epochs == 7
    with pytest.raises(ConfigError, match="unknown"):
        config.from_dict(_Cfg, {"lr": 1.0, "bogus": 2})
    config.save(cfg, tmp_path / "saved.yaml")
    assert config.resolve(_Cfg, tmp_path / "saved.yaml") == cfg


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_file_never_replaces_a_folder_but_a_folder_does(tmp_path):
    from kdiqa_edge.errors import ConfigError

    folder = tmp_path / "exports"
    (folder / "inner").mkdir(parents=True)
    (folder / "inner" / "model.onnx").write_bytes(b"weights")
    with pytest.raises(ConfigError, match="it is a folder"):
        io.write_json(folder, {"report": 1})  # bench --json-out FOLDER once deleted the folder
    assert (folder / "inner" / "model.onnx").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"]  # no temporary left
    with io.atomic_path(folder) as tmp:  # a package folder (an .mlpackage) is replaced whole
        tmp.mkdir()
        (tmp / "new.bin").write_bytes(b"new")
    assert [p.name for p in folder.iterdir()] == ["new.bin"]


def test_first_line_of_an_exception_is_one_line_even_when_it_says_nothing():
    assert first_line(RuntimeError("\n  bad shape [1, 3]\ntraceback detail\n")) == "bad shape [1, 3]"
    assert first_line(OSError("x" * 300), limit=10) == "x" * 10
    assert first_line(ValueError("no"), typed=True) == "ValueError: no"
    # an empty message (an IndexError before, inside the error handler) gives the exception's type
    assert first_line(RuntimeError("")) == first_line(RuntimeError("  \n"), typed=True) == "RuntimeError"
