"""Config values are checked against their fields' annotations as they are read: a profile's or a config file's
wrong type is one ConfigError line naming the file, the field, the value and the type expected, while every
shipped profile and every saved run config still loads as it was written."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest
from cli_helpers import run_cli

from kdiqa_edge import config
from kdiqa_edge.errors import ConfigError
from kdiqa_edge.export.base import ExportConfig

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted((REPO / "export").glob("*.yaml"))
CPU_AUTO = REPO / "export" / "cpu-auto.yaml"


def _profile_with(tmp_path: Path, field: str, value: str, source: Path = CPU_AUTO) -> Path:
    """A copy of a shipped profile with `field`'s line set to `value` (YAML, as a user would type it)."""
    text, count = re.subn(rf"(?m)^{field}:[^#\n]*", f"{field}: {value}  ", source.read_text(encoding="utf-8"))
    assert count == 1, f"{source.name} has no {field} line"
    path = tmp_path / f"bad-{source.name}"
    path.write_text(text, encoding="utf-8")
    return path


def _one_line_error(path: Path) -> str:
    with pytest.raises(ConfigError) as error:
        config.resolve(ExportConfig, path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")  # the file first: the user edits it
    return message


@pytest.mark.parametrize(("field", "value", "said"), [
    ("fail_under", "0.5", 'fail_under: 0.5 is a number, expected a string or null'),
    ("max_size_mb", '"abc"', 'max_size_mb: "abc" is a string, expected a number or null'),
    ("max_latency_ms", '"5"', 'max_latency_ms: "5" is a string, expected a number or null (write it without quotes)'),
    ("max_drift", '"0.05"', 'max_drift: "0.05" is a string, expected a number (write it without quotes)'),
    ("calib", '"16"', 'calib: "16" is a string, expected an integer (write it without quotes)'),
    ("threads", '"2"', 'threads: "2" is a string, expected an integer (write it without quotes)'),
    ("max_size_mb", "true", "max_size_mb: true is a boolean, expected a number or null"),
    ("threads", "2.0", "threads: 2.0 is a number, expected an integer"),
    ("calib", "yes", "calib: true is a boolean, expected an integer"),  # YAML 1.1 reads yes as true
    ("max_drift", "1e-2", 'max_drift: "1e-2" is a string, expected a number (YAML reads 1e-2 as text: write 1.0e-2)'),
    ("opset", "[17]", "opset: [17] is a list, expected an integer"),
    ("target", "3", "target: 3 is an integer, expected a string"),
])
def test_a_profile_value_of_the_wrong_type_is_one_line_naming_file_field_value_and_type(tmp_path, field, value, said):
    path = _profile_with(tmp_path, field, value)
    assert _one_line_error(path) == f"{path}: {said}"


def test_a_profile_with_zero_threads_is_refused(tmp_path):
    # a range, not a type: ExportConfig.validate checks what the --threads flag's min=1 checks for a flag
    with pytest.raises(ConfigError, match="threads must be at least 1, got 0"):
        config.resolve(ExportConfig, _profile_with(tmp_path, "threads", "0")).validate()


def test_distill_refuses_zero_teacher_epochs_that_would_fall_back_to_epochs():
    from kdiqa_edge.train.distill import DistillConfig
    from kdiqa_edge.train.mixed import check_unlabeled
    from kdiqa_edge.train.schedules import parse_variant

    cfg = DistillConfig(teacher_epochs=0)
    with pytest.raises(ConfigError, match="--teacher-epochs must be at least 1, got 0"):
        check_unlabeled(cfg, parse_variant(cfg.variant))


def test_an_int_is_taken_for_a_number_and_stored_as_one(tmp_path):
    path = _profile_with(tmp_path, "max_latency_ms", "5")
    path = _profile_with(tmp_path, "min_speedup", "1", source=path)
    cfg = config.resolve(ExportConfig, path)
    assert (cfg.max_latency_ms, cfg.min_speedup) == (5.0, 1.0)
    assert type(cfg.max_latency_ms) is float and type(cfg.min_speedup) is float  # as --max-latency-ms 5 gives


def test_an_unknown_profile_field_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(CPU_AUTO.read_text(encoding="utf-8") + "thread: 4\n", encoding="utf-8")
    assert _one_line_error(path) == f"{path}: unknown ExportConfig field(s): thread"


def test_the_cli_prints_the_line_and_exits_2_without_a_traceback(tmp_path, capsys):
    path = _profile_with(tmp_path, "max_drift", '"0.05"')
    code, out, err = run_cli(["export", tmp_path / "run", "--profile", path, "--target", "onnx",
                              "--precision", "fp32", "--out", tmp_path / "exports"], capsys)
    assert code == 2, err
    assert err.strip() == f'error: {path}: max_drift: "0.05" is a string, expected a number (write it without quotes)'
    assert "Traceback" not in out + err
    assert not (tmp_path / "exports").exists()


def test_a_cli_override_of_the_wrong_type_is_refused_by_class():
    with pytest.raises(ConfigError, match=r'^ExportConfig: threads: "2" is a string, expected an integer'):
        config.override(ExportConfig(), threads="2")


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_shipped_profile_loads_with_its_annotated_types_and_is_checked(tmp_path, profile):
    data = config.load_file(profile)
    cfg = config.resolve(ExportConfig, profile).validate()
    assert {name: getattr(cfg, name) for name in data} == data
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    for field in dataclasses.fields(ExportConfig):
        value, kind = getattr(cfg, field.name), field.type.split(" | ")[0]
        assert value is None or type(value) is hints[kind], (field.name, value)
    # the same file with one value turned into text is refused, naming that file
    assert f"{tmp_path / ('bad-' + profile.name)}: precision: " in _one_line_error(
        _profile_with(tmp_path, "precision", "[fp32]", source=profile))


def _saved_configs():
    from kdiqa_edge.demo import DemoConfig
    from kdiqa_edge.train.distill import DistillConfig
    from kdiqa_edge.train.finetune import FinetuneConfig
    from kdiqa_edge.train.launch import SlurmOptions
    from kdiqa_edge.train.reproduce import ReproduceConfig

    dataset = {"name": "csv", "root": "/data/x", "csv": "/data/x/scores.csv", "mos_range": [0, 100], "strict": False}
    return [
        DistillConfig(student="test_resnet", variant="fixed:0.5", pretrained=False, teacher="tiny",
                      teacher_epochs=1, dataset=dataset, epochs=3, batch_size=32, grad_clip=1.0,
                      workdir="/tmp/w", unlabeled=["/data/u1", "/data/u2.tar"], loggers=["tensorboard"]),
        FinetuneConfig(teacher="tiny", dataset=dataset, epochs=2, templates=["a {level} photo"]),
        DemoConfig(), DemoConfig.quick(), ReproduceConfig(seeds=2, students=["test_resnet"]),
        SlurmOptions(partition="gpu", extra={"constraint": "a100"}), ExportConfig(max_size_mb=10.0),
    ]


@pytest.mark.parametrize("cfg", _saved_configs(), ids=lambda c: type(c).__name__)
def test_a_saved_config_reads_back_equal_tuples_included(tmp_path, cfg):
    """A run's config.yaml is its config written out (tuples as YAML lists) and read back on --resume."""
    path = config.save(cfg, tmp_path / "config.yaml")
    assert config.resolve(type(cfg), path) == cfg
    data = config.load_file(path)  # and it is checked: a text or integer value turned into a list is refused
    name = next(name for name, value in data.items() if type(value) in (str, int))
    config.save(dataclasses.replace(cfg, **{name: [data[name]]}), path)
    with pytest.raises(ConfigError, match=rf"^{re.escape(f'{path}: {name}: [')}.* is a list, expected (a|an) "):
        config.resolve(type(cfg), path)


def test_a_saved_run_config_edited_to_a_wrong_type_names_it(tmp_path):
    from kdiqa_edge.train.distill import DistillConfig, load_config

    path = config.save(DistillConfig(epochs=3), tmp_path / "run" / "config.yaml")
    path.write_text(path.read_text().replace("epochs: 3", 'epochs: "3"'))
    with pytest.raises(ConfigError, match=rf'^{re.escape(str(path))}: epochs: "3" is a string, expected an integer'):
        load_config(path)
    path.write_text(path.read_text().replace('epochs: "3"', "epochs: 3").replace("unlabeled: []", "unlabeled: /u"))
    with pytest.raises(ConfigError, match=r'^\S+config.yaml: unlabeled: "/u" is a string, expected a list$'):
        load_config(path)


@dataclasses.dataclass(frozen=True)
class _Inner:
    size: tuple[int, int] = (224, 224)  # h, w
    mode: Literal["bilinear", "bicubic"] = "bicubic"


@dataclasses.dataclass
class _Outer:
    names: tuple[str, ...] = ("a", "b")
    seeds: list[int] = dataclasses.field(default_factory=list)
    inner: _Inner = _Inner()
    ratio: float | None = None
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


@pytest.mark.parametrize(("data", "said"), [
    ({"names": ["a", 3]}, "names[1]: 3 is an integer, expected a string"),
    ({"names": "ab"}, 'names: "ab" is a string, expected a list, each a string'),
    ({"seeds": [1, True]}, "seeds[1]: true is a boolean, expected an integer"),
    ({"inner": {"size": [224]}}, "inner.size: [224] is a list, expected a list of 2: an integer, an integer"),
    ({"inner": {"mode": "nearest"}}, 'inner.mode: "nearest" is a string, expected one of: "bilinear", "bicubic"'),
    ({"inner": 5}, "inner: 5 is an integer, expected a mapping of _Inner fields"),
    ({"ratio": "half"}, 'ratio: "half" is a string, expected a number or null'),
    ({"extra": {"lr": "x"}}, 'extra.lr: "x" is a string, expected a number'),
])
def test_containers_literals_nested_configs_and_unions_are_checked_item_by_item(data, said):
    with pytest.raises(ConfigError) as error:
        config.from_dict(_Outer, data, source="o.yaml")
    assert str(error.value) == f"o.yaml: {said}"


def test_lists_read_back_as_tuples_and_mappings_as_nested_configs():
    cfg = config.from_dict(_Outer, {"names": ["x"], "inner": {"size": [64, 86]}, "ratio": 1, "extra": {"lr": 2}})
    assert cfg == _Outer(names=("x",), inner=_Inner(size=(64, 86)), ratio=1.0, extra={"lr": 2.0})
    assert config.from_dict(_Outer, config.to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"^o\.yaml: unknown _Inner field\(s\): inner\.bogus$"):
        config.from_dict(_Outer, {"inner": {"bogus": 1}}, source="o.yaml")


def test_a_config_file_that_does_not_parse_is_one_line_saying_where(tmp_path):
    from kdiqa_edge.config import load_file
    from kdiqa_edge.errors import ConfigError

    bad = tmp_path / "profile.yaml"
    bad.write_text("target: onnx\nprecision: [int8\n")
    with pytest.raises(ConfigError) as info:
        load_file(bad)
    assert "\n" not in str(info.value) and "(line 3, column 1)" in str(info.value)
