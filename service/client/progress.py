"""A one-line progress bar on stderr for ``pose-client`` folders and videos.

Hand-written (some forty lines) rather than tqdm to keep the client's dependencies to what the
wire and the pixels need. It draws only on a terminal, at most ten times a second, and other
stderr lines (failures, the summary) go through ``message`` so they do not tangle with it.
"""

from __future__ import annotations

import time
from typing import TextIO

_WIDTH = 24  # characters of the bar itself
_REFRESH_S = 0.1


class Progress:
    """``start`` a task, ``advance`` it, ``finish`` it; silent when ``enabled`` is False."""

    def __init__(self, stream: TextIO, *, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.label = ""
        self.total: int | None = None
        self.done = 0
        self.started = self.drawn_at = 0.0
        self.shown = False

    def start(self, label: str, total: int | None) -> None:
        """A new task of ``total`` steps (None: unknown, only the count and rate show)."""
        self.finish()
        self.label = label if len(label) <= 30 else "..." + label[-27:]
        self.total, self.done = total, 0
        self.started = time.monotonic()
        self.drawn_at = 0.0
        self._draw()

    def advance(self, steps: int = 1) -> None:
        """``steps`` more done; redrawn when the last drawing is old enough."""
        self.done += steps
        if time.monotonic() - self.drawn_at >= _REFRESH_S or self.done == self.total:
            self._draw()

    def message(self, line: str) -> None:
        """Write ``line`` (with its newline) above the bar."""
        self._clear()
        self.stream.write(line)
        self.stream.flush()
        if self.total is not None or self.done:
            self._draw()

    def finish(self) -> None:
        """Take the bar off the screen."""
        self._clear()
        self.total, self.done = None, 0

    def _draw(self) -> None:
        if not self.enabled or not self.label:
            return
        now = time.monotonic()
        rate = self.done / (now - self.started) if now > self.started else 0.0
        if self.total:
            filled = min(_WIDTH, _WIDTH * self.done // self.total)
            bar = f"[{'#' * filled}{'.' * (_WIDTH - filled)}] {self.done}/{self.total}"
        else:
            bar = f"{self.done} frames"
        self.stream.write(f"\r\x1b[K{self.label} {bar} {rate:.1f}/s")
        self.stream.flush()
        self.drawn_at, self.shown = now, True

    def _clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
