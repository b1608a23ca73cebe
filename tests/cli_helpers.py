"""Running `kdiqa-edge` in the test's own process, as a user's terminal sees it."""

from __future__ import annotations

import pytest


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `kdiqa-edge ARGS` through the real entry point (its one-line errors and
    exit codes included); `args` may hold paths."""
    from kdiqa_edge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err
