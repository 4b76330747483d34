"""The training ranks' console: rank 0 of each expert appends its progress lines to <run>/<expert>/console.log
(wanray.train.metrics), and the driver prints them as they come."""

from __future__ import annotations

import threading
from pathlib import Path


class Follow:
    """Print the lines appended to `paths` (the workers' console files) while the block runs, as `tail -f`
    would, from where each file ends at the start (a resumed run's old lines are not printed again)."""

    def __init__(self, paths: list[Path], log=print, interval: float = 0.5):
        self.log, self.interval = log, interval
        self.offsets = {p: p.stat().st_size if p.exists() else 0 for p in paths}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="console")

    def __enter__(self) -> Follow:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.done.wait(self.interval):
            self._print_new()
        self._print_new()

    def _print_new(self) -> None:
        for path, offset in self.offsets.items():
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
            self.offsets[path] = offset + len(complete)
            for line in complete.decode().splitlines():
                self.log(line)
