"""The training ranks' console: rank 0 of each expert appends its progress lines to <run>/<expert>/console.log
(wanray.train.metrics; in an object store, uploaded again at most every 5 s), and the driver prints them as they
come."""

from __future__ import annotations

import contextlib
import threading

import pyarrow.fs as pafs

from wanray import storage


class Follow:
    """Print the lines appended to `paths` (the workers' console files) while the block runs, as `tail -f`
    would, from where each file ends at the start (a resumed run's old lines are not printed again)."""

    def __init__(self, paths: list[str], log=print, interval: float = 0.5):
        """paths: local files or URIs, polled every `interval` seconds (four times that in an object store)."""
        self.log = log
        self.interval = interval * (4 if any(storage.is_uri(p) for p in paths) else 1)
        self.offsets = {p: self._size(p) for p in paths}
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
            with contextlib.suppress(OSError):  # an object store's passing error: the next poll reads from here
                self._print_new()
        self._print_new()

    @staticmethod
    def _size(path: str) -> int:
        found = storage.info(path)
        return found.size if found.type == pafs.FileType.File else 0

    def _print_new(self) -> None:
        for path, offset in self.offsets.items():
            if self._size(path) <= offset:
                continue
            fs, inner = storage.filesystem(path)
            with fs.open_input_file(inner) as f:  # a ranged read in an object store
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
            self.offsets[path] = offset + len(complete)
            for line in complete.decode().splitlines():
                self.log(line)
