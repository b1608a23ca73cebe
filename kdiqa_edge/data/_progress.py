"""One rich progress bar for long data work (decoding, generating), or nothing when disabled."""

from __future__ import annotations


class Progress:
    """A rich progress bar (or nothing): `with Progress(on, total, label) as advance: advance(n)`."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled, total, label

    def __enter__(self):
        if not self.enabled:
            return lambda n=1: None
        from rich import progress as rp

        self._bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                rp.TimeRemainingColumn(), transient=True)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda n=1: self._bar.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.stop()
