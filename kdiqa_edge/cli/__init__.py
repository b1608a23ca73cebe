"""The `kdiqa-edge` command line: one thin module per command over plain library functions.

Command modules import their heavy dependencies (torch, onnx...) inside the command body, so that
`score` and `bench` run where torch is not installed.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys

import typer

from kdiqa_edge.errors import KdiqaError

app = typer.Typer(
    name="kdiqa-edge",
    help="Distil a CLIP image-quality teacher into small students and ship them to ONNX, TensorRT, CoreML, "
         "ExecuTorch and OpenVINO.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module defines `register(app)`. The order is the order of `--help`.
COMMAND_MODULES = ("data", "teacher", "distill", "export", "score", "bench", "demo", "reproduce")


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        module_name = f"kdiqa_edge.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # a command not built yet is simply absent
                continue
            raise
        module.register(app)


_register_commands()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        from kdiqa_edge import __version__

        typer.echo(f"kdiqa-edge {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def main(argv: list[str] | None = None) -> None:
    """Entry point: known errors become one line on stderr and a non-zero exit code."""
    with _terminate_as_interrupt():
        _main(argv)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`, a container's stop) stops the command as Ctrl-C does: the finally
    blocks run (scored rows committed, trackers ended, child processes stopped, libraries' /tmp folders
    removed at exit), exit 130. Its default ended the process on the spot, as SIGKILL does. Only where no
    other handler is set. A forked worker gets the default back as it starts: a Python handler runs only
    between bytecodes, so a worker blocked in native code would outlive the SIGTERM its pool ends it with."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    global _FORK_HOOK
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=_default_sigterm)
        _FORK_HOOK = True
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


_FORK_HOOK = False  # os.register_at_fork(_default_sigterm) done in this process


def _interrupt(signum, frame):
    raise KeyboardInterrupt("terminated (SIGTERM)")


def _default_sigterm() -> None:
    import signal

    if signal.getsignal(signal.SIGTERM) is _interrupt:
        with contextlib.suppress(ValueError):  # not the main thread: a fork's child has no other
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(argv: list[str] | None) -> None:
    try:
        app(args=argv, prog_name="kdiqa-edge")
    except SystemExit as exc:  # typer turns a Ctrl-C into a silent exit 130: say why the command stopped
        if exc.code == 130 and exc.__context__ is not None and isinstance(exc.__context__.__cause__,
                                                                          KeyboardInterrupt):
            typer.secho("interrupted", err=True)
        raise
    except KdiqaError as exc:
        if os.environ.get("KDIQA_DEBUG"):
            raise
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # the machine's answer (a folder not writable, a full disk), not a bug of ours
        if os.environ.get("KDIQA_DEBUG") or not (exc.filename or exc.errno in (errno.ENOSPC, errno.EDQUOT)):
            raise
        typer.secho(f"error: {_os_error(exc)} (KDIQA_DEBUG=1 shows where)", err=True, fg="red")
        sys.exit(1)


def _os_error(exc: OSError) -> str:
    """'cannot use PATH: REASON', naming the folder for an atomic write's temporary (its name means nothing
    to the user)."""
    from kdiqa_edge.io import is_temporary

    why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
    if not exc.filename:
        return why
    path = os.fsdecode(exc.filename)
    if exc.errno == errno.EEXIST and not os.path.isdir(path):  # mkdir where a file is
        why = "it is a file, not a folder"
    elif exc.errno == errno.ENOTDIR:
        why = "part of the path is a file, not a folder"
    if is_temporary(os.path.basename(path)):
        return f"cannot write in {os.path.dirname(path) or '.'}: {why}"
    return f"cannot use {path}: {why}"
