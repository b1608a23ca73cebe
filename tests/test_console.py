"""kdiqa_edge.console: progress that reads well in a log, and third-party output captured at the fd level."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from kdiqa_edge.console import Progress, capture_output, quiet_logger, stream

BAR_GLYPHS = re.compile("[━─█▏▎▍▌▋▊▉…\r]")  # rich and tqdm bars, their ellipsis, carriage returns

PROGRESS_SNIPPET = """
import time
from kdiqa_edge.console import Progress
with Progress("train", 30, unit="steps", stream="stdout", interval=0.2) as bar:
    for step in range(30):
        time.sleep(0.02)
        bar.advance(1, images=16)
        bar.update(info=f"loss {1 / (step + 1):.3f}")
    bar.print("epoch 1/1 loss 0.0333")
"""


def _run(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, **kwargs)


def test_progress_is_plain_periodic_lines_in_a_subprocess_that_is_not_a_terminal():
    result = _run(PROGRESS_SNIPPET)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert not BAR_GLYPHS.search(result.stdout), result.stdout
    progress = [line for line in lines if line.startswith("train: ")]
    # the first step, at most one per 0.2 s of the ~0.6 s of work, and the final one
    assert 3 <= len(progress) <= 8, lines
    assert re.fullmatch(r"train: 1/30 steps \(3%\), [\d.]+ images/s, ETA \d:\d\d:\d\d", progress[0])
    assert re.fullmatch(r"train: \d+/30 steps \(\d+%\), [\d.]+ images/s, ETA \d:\d\d:\d\d \| loss [\d.]+", progress[1])
    assert re.fullmatch(r"train: 30/30 steps \(100%\), [\d.]+ images/s, done in 0:00:0\d \| loss 0\.033", progress[-1])
    assert "epoch 1/1 loss 0.0333" in lines


def test_progress_is_a_rich_bar_in_a_terminal():
    pty = pytest.importorskip("pty")
    parent, child = pty.openpty()
    try:
        process = subprocess.Popen([sys.executable, "-c", PROGRESS_SNIPPET], stdout=child, stderr=child,
                                   env={**os.environ, "COLUMNS": "100"})
        os.close(child)
        output = b""
        while True:
            try:
                chunk = os.read(parent, 65536)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=60) == 0
    finally:
        os.close(parent)
    text = output.decode("utf-8", errors="replace")
    assert "━" in text and "30/30" in text and "epoch 1/1 loss 0.0333" in text
    assert "train: 0/30 steps" not in text  # no plain lines in a terminal


def test_the_data_command_reports_plain_lines_when_piped(tmp_path):
    """A real command, stdout and stderr both files: the synthetic-set generation reports in plain lines."""
    result = subprocess.run([sys.executable, "-m", "kdiqa_edge", "data", "synth", str(tmp_path / "set"), "--refs", "1",
                             "--size", "48x36"], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert not BAR_GLYPHS.search(result.stdout + result.stderr), result.stderr
    assert re.search(r"^generating the synthetic set: 30/30 images \(100%\), [\d.]+ images/s, done in",
                     result.stderr, re.MULTILINE), result.stderr


@pytest.mark.slow
def test_distill_redirected_to_a_file_logs_plain_progress_lines(tmp_path):
    """`kdiqa-edge distill ... > log 2>&1`: no truncated bars, just plain progress and epoch lines."""
    pytest.importorskip("torch")
    from kdiqa_edge.data.synthetic import generate

    root = generate(tmp_path / "set", refs=2, size=(86, 64))
    log = tmp_path / "log"
    with open(log, "w") as handle:
        result = subprocess.run(
            [sys.executable, "-m", "kdiqa_edge", "distill", "--dataset", "synthetic", "--root", str(root),
             "--teacher", "tiny", "--teacher-epochs", "1", "--epochs", "1", "--batch-size", "32",
             "--student", "test_resnet", "--no-pretrained", "--out", str(tmp_path / "run")],
            check=False, stdout=handle, stderr=subprocess.STDOUT, timeout=600, env={**os.environ, "KDIQA_CACHE": str(tmp_path)})
    text = log.read_text()
    assert result.returncode == 0, text
    assert not BAR_GLYPHS.search(text), text
    for stage in ("decoding images", "teacher train", "student train", "teacher features"):
        assert re.search(rf"^{stage}: \d+/\d+ (images|steps) \(100%\), [\d.]+ images/s, done in \d:\d\d:\d\d",
                         text, re.MULTILINE), (stage, text)
    assert re.search(r"^student train: epoch 1/1 loss [\d.]+ test PLCC", text, re.MULTILINE), text


def test_disabled_progress_and_a_stage_with_nothing_done_print_nothing(capsys):
    with Progress("bench", 3, unit="models", enabled=False) as bar:
        bar.advance()
        bar.update("x")
        bar.print("event")
    with Progress("calibration", 32, unit="images"):  # e.g. the calibration cache had the ranges
        pass
    assert capsys.readouterr() == ("", "")


def test_capture_takes_fds_prints_warnings_and_tqdm_and_restores_them_on_error(tmp_path, capfd):
    tqdm = pytest.importorskip("tqdm").tqdm
    log = tmp_path / "export.log"
    before = (os.fstat(1).st_ino, os.fstat(2).st_ino)
    with pytest.raises(RuntimeError, match="converter crashed"), capture_output(log):
        print("python print")
        os.write(1, b"C-level stdout\n")
        os.write(2, b"C-level stderr\n")
        warnings.warn("a converter's UserWarning", UserWarning, stacklevel=1)
        for _ in tqdm(range(3), desc="Running MIL default pipeline"):
            pass
        with Progress("calibration", 2, unit="images") as bar:  # our own progress keeps the terminal
            bar.advance(2)
        stream().write("our own line\n")
        raise RuntimeError("converter crashed")
    assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == before
    assert sys.stdout is not None and sys.stderr is not None
    print("after the capture")
    out, err = capfd.readouterr()
    text = log.read_text()
    for line in ("python print", "C-level stdout", "C-level stderr", "UserWarning: a converter's UserWarning",
                 "Running MIL default pipeline"):
        assert line in text and line not in out + err, line
    assert "calibration: 2/2 images" in err and "our own line" in err and "calibration" not in text
    assert "after the capture" in out


def test_capture_with_echo_streams_the_output_too(tmp_path, capfd):
    log = tmp_path / "export.log"
    with capture_output(log, echo=True):
        os.write(2, b"C-level stderr\n")
        warnings.warn("echoed warning", UserWarning, stacklevel=1)
    _, err = capfd.readouterr()
    assert "C-level stderr" in log.read_text() and "C-level stderr" in err
    assert "echoed warning" in log.read_text() and "echoed warning" in err


def test_a_stream_taken_during_a_capture_still_works_after_it(tmp_path, capfd):
    """A library that builds a logging handler while its import is captured keeps a live stream."""
    import logging

    with capture_output(tmp_path / "export.log"):
        handler = logging.StreamHandler()  # binds sys.stderr as it is now
        handler.stream.write("during\n")
    logger = logging.getLogger("kdiqa-test-late-handler")
    logger.addHandler(handler)
    try:
        logger.warning("after the capture")
    finally:
        logger.removeHandler(handler)
    _, err = capfd.readouterr()
    assert "after the capture" in err and "Logging error" not in err
    assert "during" in (tmp_path / "export.log").read_text()


def test_quiet_logger_drops_a_libraries_chatter_and_restores_the_level(caplog):
    chatty = logging.getLogger("kdiqa-test-chatty")
    chatty.setLevel(logging.INFO)
    with caplog.at_level(logging.INFO, logger="kdiqa-test-chatty"):
        with quiet_logger("kdiqa-test-chatty"):
            chatty.warning("per-tensor chatter")
            chatty.error("a real failure")
        chatty.warning("after the block")
    assert [r.getMessage() for r in caplog.records] == ["a real failure", "after the block"]
    assert chatty.level == logging.INFO


def test_ctrl_c_in_a_command_says_interrupted_and_exits_130(tmp_path, monkeypatch, capsys):
    """typer turns a KeyboardInterrupt into a silent exit 130: the command stopped without a word."""
    from cli_helpers import run_cli

    from kdiqa_edge.data import synthetic

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate", interrupted)
    code, _out, err = run_cli(["data", "synth", tmp_path / "set", "--refs", "1"], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted"
