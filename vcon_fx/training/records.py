"""The step records of a run: kept in memory, appended to a JSON-lines log, handed to `on_step`.

One JSON object per line, step 0 being the start. A resumed run keeps the log's lines up to its
checkpoint and drops those after it, so the log reads as one run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from ..io.atomic import write_text_atomic

__all__ = ["StepRecords"]


class StepRecords:
    """The history of a run, and its JSON-lines log (written only where `write` is true: rank 0).

    Args:
        log_path: the JSON-lines file, or None for no log.
        write: whether this process writes the log.
        on_step: called with each step's record (and `rank`) after every step > 0.
        rank: this process's rank, added to what `on_step` gets.
    """

    def __init__(self, log_path: Path | None, *, write: bool, on_step: Callable[[dict[str, Any]], None] | None,
                 rank: int):
        self.log_path, self.write, self.on_step, self.rank = log_path, write, on_step, rank
        self.history: list[dict[str, Any]] = []
        self._file = None

    def open(self, start: int) -> None:
        """Start the log (in place): empty, or, resuming at `start`, its lines up to that step."""
        if self.log_path is None or not self.write:
            return
        if start and self.log_path.is_file():
            kept = [line for line, row in _rows(self.log_path) if row.get("step", 0) <= start]
            write_text_atomic(self.log_path, "".join(f"{ln}\n" for ln in kept))
        else:
            write_text_atomic(self.log_path, "")
        self._file = self.log_path.open("a")

    def add(self, info: dict[str, Any]) -> None:
        """Record one step (in place): history, log line, `on_step`."""
        info = dict(info)
        self.history.append(info)
        if self._file is not None:
            self._file.write(json.dumps(info) + "\n")
            self._file.flush()
        if self.on_step is not None and info["step"] > 0:
            self.on_step(dict(info, rank=self.rank))

    def logged(self, upto: int) -> list[dict[str, Any]]:
        """The full records of steps 0..upto from an earlier run's log, if it has them all (pure)."""
        if self.log_path is None or not self.log_path.is_file():
            return []
        rows = [row for _, row in _rows(self.log_path) if row.get("step", -1) <= upto]
        return rows if [r.get("step") for r in rows] == list(range(upto + 1)) else []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, object) for each line of a JSON-lines file, up to the first that does not parse (a torn write)."""
    for line in path.read_text().splitlines():
        try:
            yield line, json.loads(line)
        except json.JSONDecodeError:
            return
