"""^C during fine-tuning: finish the step in progress, save a checkpoint, then stop.

The handler only sets a flag; the loop agrees on it across ranks (so every rank stops after the
same step), saves, and raises the KeyboardInterrupt that `interruption` words.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["sigint_flag", "interruption"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def sigint_flag(on_signal: Callable[[], None]) -> Iterator[None]:
    """Within the block, the first SIGINT calls `on_signal` instead of raising; a second ^C stops at once.

    Outside the main thread (where signals cannot be caught) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        on_signal()
        signal.signal(signal.SIGINT, previous)

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interruption(t: int, checkpoint: Path | None) -> KeyboardInterrupt:
    """The KeyboardInterrupt a run stopped at step t raises, naming the checkpoint to resume from (None: none saved)."""
    if checkpoint is not None:
        log.warning("interrupted at step %d: checkpoint %s", t, checkpoint)
        return KeyboardInterrupt(f"interrupted at step {t}; resume from {checkpoint}")
    log.warning("interrupted at step %d: no checkpoint_dir, nothing saved", t)
    return KeyboardInterrupt(f"interrupted at step {t} (no checkpoint_dir: nothing saved)")
