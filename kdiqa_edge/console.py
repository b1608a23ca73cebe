"""What the user sees: our own progress, and other programs' output kept out of it (torch-free).

- `Progress`: the one progress display of every long stage (training, cache builds, calibration, bench).
  In a terminal it is a rich bar; in a log file, a pipe or CI it is a plain line at most every few seconds
  (stage, step/total, images/s, ETA), from the first step done to the last, because a live bar written to a
  file comes out as truncated junk.
- `capture_output(log)`: everything written to file descriptors 1 and 2 while a block runs goes to `log`:
  C/C++ libraries and tqdm write to the descriptors directly, so swapping `sys.stdout` alone would miss them.
  Python warnings and `print` go there too. Our own output keeps the terminal: `stream()` and `Progress`
  write to the descriptors saved when the capture began.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TextIO

PLAIN_INTERVAL_S = 5.0  # at most one plain progress line this often (a log stays readable)

# While a capture holds fds 1 and 2: the streams our own output goes to (the terminal, or the caller's file).
_user_streams: list[dict[str, TextIO]] = []
_silenced = [0]  # > 0 inside quiet_progress(): every Progress shows nothing


def stream(name: str = "stderr") -> TextIO:
    """The stream for our own output: sys.stdout / sys.stderr, or the saved ones while a capture is on."""
    if _user_streams:
        return _user_streams[-1][name]
    return getattr(sys, name)


def is_terminal(file: TextIO) -> bool:
    """Does `file` show a live display (a terminal, or rich's FORCE_COLOR / Jupyter rules say so)?"""
    from rich.console import Console

    return Console(file=file).is_terminal


@contextlib.contextmanager
def quiet_logger(name: str | None = None, level: int = logging.ERROR):
    """Inside the block, logger `name` (the root logger by default) drops messages below `level`: a
    library's chatter that a user cannot act on. Its own level comes back afterwards."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def quiet_progress(quiet: bool = True):
    """Every Progress inside the block shows nothing: `--quiet` reaching code that takes no progress flag
    (a calibration data reader that ONNX Runtime drives)."""
    _silenced[0] += int(quiet)
    try:
        yield
    finally:
        _silenced[0] -= int(quiet)


def plural(count: int, word: str) -> str:
    """'1 file', '3 files'."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`with Progress("train", total, unit="steps") as bar: bar.advance(1, images=16)`.

    - `advance(n, images=None)`: n more units done (steps, images, models); `images` counts images for the
      images/s rate when a unit is not one image. The object is also callable: `bar(n)` = `bar.advance(n)`.
    - `update(info)`: what is being done now (an epoch's metrics, the model being benched); it trails the line.
    - `print(text)`: an event line (an epoch's metrics), above the bar in a terminal.
    - `enabled=False` shows nothing; `stream` is "stderr" or "stdout" (training reports on stdout).
    """

    def __init__(self, label: str, total: int | None, *, unit: str = "steps", enabled: bool = True,
                 stream: str = "stderr", completed: int = 0, transient: bool = False,
                 interval: float = PLAIN_INTERVAL_S):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.stream_name, self.transient, self.interval = stream, transient, interval
        self.completed, self.info = completed, ""
        self._start_completed = completed
        self._images = 0
        self._counts_images = unit == "images"  # the rate is images/s (else units/s)
        self._bar = self._task = self._file = None
        self._started, self._last_line = 0.0, -float("inf")  # the first step done prints at once

    # -- context ------------------------------------------------------------------------------------------
    def __enter__(self):
        self.enabled = self.enabled and not _silenced[0]
        if not self.enabled:
            return self
        self._file = stream(self.stream_name)
        self._started = time.perf_counter()
        if is_terminal(self._file):
            from rich import progress as rp
            from rich.console import Console

            self._bar = rp.Progress(rp.TextColumn("[bold]{task.description}"), rp.BarColumn(),
                                    rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), rp.TimeRemainingColumn(),
                                    rp.TextColumn("{task.fields[info]}"), console=Console(file=self._file),
                                    transient=self.transient)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.completed, info="")
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and exc_type is None and self.completed > self._start_completed:
            self._line(final=True)  # a stage that had nothing to do (a calibration cache hit) says nothing

    # -- updates ------------------------------------------------------------------------------------------
    def __call__(self, n: int = 1) -> None:
        self.advance(n)

    def advance(self, n: int = 1, images: int | None = None) -> None:
        if not self.enabled:
            return
        self.completed += n
        self._images += n if images is None else images
        self._counts_images = self._counts_images or images is not None
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif time.perf_counter() - self._last_line >= self.interval:
            self._line()

    def update(self, info: str) -> None:
        if not self.enabled:
            return
        self.info = info
        if self._bar is not None:
            self._bar.update(self._task, info=info)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            self._write(text)

    # -- plain lines --------------------------------------------------------------------------------------
    def _line(self, final: bool = False) -> None:
        now = time.perf_counter()
        self._last_line = now
        elapsed = now - self._started
        done = self.completed - self._start_completed
        count = f"{self.completed}/{self.total}" if self.total is not None else f"{self.completed}"
        parts = [f"{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.completed / self.total:.0f}%)"
        if done and elapsed > 0:
            rate, rate_unit = (self._images, "images") if self._counts_images else (done, self.unit)
            parts.append(f"{rate / elapsed:.1f} {rate_unit}/s")
        if final:
            parts.append(f"done in {_duration(elapsed)}")
        elif done and self.total is not None:
            parts.append(f"ETA {_duration(elapsed / done * (self.total - self.completed))}")
        text = f"{self.label}: {', '.join(parts)}" + (f" | {self.info}" if self.info else "")
        self._write(text)

    def _write(self, text: str) -> None:
        try:
            self._file.write(text + "\n")
            self._file.flush()
        except (OSError, ValueError):  # a closed pipe must not stop the work it reports on
            pass


# ----------------------------------------------------------------------------------------------------------
# Other programs' output


def _flush_c_stdio() -> None:
    """C stdio buffers what a library printf()s to a file: flush it before fds 1/2 change hands."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no libc (Windows): nothing buffered we could reach
        pass


def _flush(*files) -> None:
    for file in files:
        with contextlib.suppress(Exception):
            file.flush()


def _own_stream(current: TextIO, fd: int, saved_fd: int) -> TextIO:
    """Where our own output goes during a capture: `current` itself unless it writes to `fd`, which the
    capture takes; then a stream on the saved copy of `fd`."""
    try:
        backed = current.fileno() == fd
    except (AttributeError, OSError, ValueError):  # a StringIO, pytest's capture: not on the fd
        backed = False
    if not backed:
        return current
    return open(os.dup(saved_fd), "w", buffering=1, encoding=getattr(current, "encoding", None) or "utf-8",
                errors="replace", closefd=True)


@contextlib.contextmanager
def capture_output(log_path: str | os.PathLike, echo: bool = False):
    """Send fds 1 and 2, `sys.stdout`/`sys.stderr` and Python warnings to `log_path` while the block runs;
    with `echo` also stream them to our stderr (`--verbose`). Everything is restored on the way out,
    exceptions included. Yields the log's path."""
    log_path = Path(log_path)
    previous = (sys.stdout, sys.stderr)
    _flush(*previous, sys.__stdout__, sys.__stderr__)
    _flush_c_stdio()
    log = open(log_path, "wb", buffering=0)  # noqa: SIM115 - closed in the finally below
    saved = {1: os.dup(1), 2: os.dup(2)}
    own: dict[str, TextIO] = dict(_user_streams[-1]) if _user_streams else {
        "stdout": _own_stream(previous[0], 1, saved[1]), "stderr": _own_stream(previous[1], 2, saved[2])}
    opened = [] if _user_streams else [s for s, cur in zip((own["stdout"], own["stderr"]), previous) if s is not cur]
    pump = None
    if echo:  # a pipe, copied to the log and to our stderr by a thread
        read_fd, sink_fd = os.pipe()
        pump = threading.Thread(target=_pump, args=(read_fd, log, own["stderr"]), daemon=True, name="kdiqa-echo")
        pump.start()
    else:
        sink_fd = os.dup(log.fileno())
    sink = open(sink_fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=True)  # noqa: SIM115
    forwards = ()
    try:
        os.dup2(sink_fd, 1)
        os.dup2(sink_fd, 2)
        forwards = (_Forward(sink), _Forward(sink))
        sys.stdout, sys.stderr = forwards
        _user_streams.append(own)
        with warnings.catch_warnings():
            warnings.showwarning = _warning_writer(sink)
            yield log_path
    finally:
        _flush(sink, sys.__stdout__, sys.__stderr__, *previous)
        _flush_c_stdio()
        if _user_streams and _user_streams[-1] is own:
            _user_streams.pop()
        sys.stdout, sys.stderr = previous
        for forward, stream_before in zip(forwards, previous):  # whoever kept one writes where it wrote before
            forward.target = stream_before
        os.dup2(saved[1], 1)
        os.dup2(saved[2], 2)
        os.close(saved[1])
        os.close(saved[2])
        sink.close()  # the last write end of the pipe: the pump reads to its end and stops
        if pump is not None:
            pump.join(timeout=10)
        log.close()
        for file in opened:
            _flush(file)
            with contextlib.suppress(OSError):
                file.close()


class _Forward(io.TextIOBase):
    """sys.stdout / sys.stderr during a capture: writes go to `target`, the log while the capture lasts, and
    afterwards the stream that was there before. A logging handler or progress bar a library creates during
    the capture keeps a working stream instead of a closed one."""

    def __init__(self, target: TextIO):
        super().__init__()
        self.target = target

    def write(self, text: str) -> int:
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self):
        return getattr(self.target, "encoding", "utf-8")

    @property
    def buffer(self):
        return self.target.buffer

    def close(self) -> None:  # the target is not ours to close
        pass


def _pump(read_fd: int, log, echo: TextIO) -> None:
    with open(read_fd, "rb", buffering=0, closefd=True) as pipe:
        while chunk := pipe.read(65536):
            log.write(chunk)
            with contextlib.suppress(Exception):
                echo.write(chunk.decode("utf-8", errors="replace"))
                echo.flush()


def _warning_writer(sink: TextIO):
    """warnings.showwarning into the log: the warnings a converter raises belong with its other output."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        sink.write(warnings.formatwarning(message, category, filename, lineno, line))

    return showwarning
