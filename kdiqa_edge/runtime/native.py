"""What native runtimes print on their own (ExecuTorch's C++ log, ONNX Runtime's default logger), captured
around the call that prints it, so the user reads our one line and not theirs."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile


@contextlib.contextmanager
def captured_stderr():
    """Collect what reaches file descriptor 2 and `sys.stderr` while the block runs, raised or not, into the
    yielded list of lines (filled when the block ends). C++ code logs to the descriptor, Python bindings to
    sys.stderr; none of it reaches the terminal: the caller passes on what the user should see."""
    lines: list[str] = []
    python_side = io.StringIO()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a GUI or service process): nothing native reaches a terminal anyway
        saved = None
    with tempfile.TemporaryFile() as capture:
        if saved is not None:
            os.dup2(capture.fileno(), 2)
        try:
            with contextlib.redirect_stderr(python_side):
                yield lines
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace") + python_side.getvalue()
            lines.extend(text.splitlines(keepends=True))
