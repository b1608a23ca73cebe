"""A rich progress bar on stderr for long data work (decoding, generating)."""

from __future__ import annotations


class Progress:
    """A rich progress bar on stderr, or nothing: `with Progress(on, total, label) as advance: advance(n)`.

    Off when stderr is not a terminal, so piped output (`data info --json | jq`) stays clean.
    """

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich import progress as rp
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal:
                self._bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(),
                                        rp.MofNCompleteColumn(), rp.TimeRemainingColumn(),
                                        console=console, transient=True)
        if self._bar is None:
            return lambda n=1: None
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda n=1: self._bar.advance(task, n)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
