"""What the machine refuses (a file where a folder must be, a full disk) is one line naming the path and the
reason, exit code 1, not a traceback; KDIQA_DEBUG=1 keeps the traceback."""

from __future__ import annotations

import errno

import pytest
from cli_helpers import run_cli


def test_a_file_where_the_output_folder_must_be_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("the user's file")
    code, _, err = run_cli(["data", "synth", tmp_path / "taken" / "synthetic", "--refs", "1"], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: cannot use {tmp_path / 'taken'}: it is a file, not a folder "
                                        "(KDIQA_DEBUG=1 shows where)"]
    assert (tmp_path / "taken").read_text() == "the user's file"


def test_a_full_disk_names_the_folder_not_the_temporary(tmp_path, capsys, monkeypatch):
    from kdiqa_edge import io

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    monkeypatch.setattr(io.os, "replace", full)
    code, _, err = run_cli(["data", "synth", tmp_path / "synthetic", "--refs", "1", "--size", "32x24"], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1] == (f"error: cannot write in {tmp_path}: the disk is full "
                                            "(KDIQA_DEBUG=1 shows where)")
    monkeypatch.setenv("KDIQA_DEBUG", "1")
    with pytest.raises(OSError):
        run_cli(["data", "synth", tmp_path / "synthetic", "--refs", "1", "--size", "32x24"], capsys)
