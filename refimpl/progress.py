"""Progress of long work on stderr (convert, prepare, and any step others want to report).

    with progress.reporting(progress.Progress("convert")):
        ...
        prog = progress.current()
        prog.stage("writing 145 tensors (1.42 GB)", total=nbytes, unit="B")
        prog.update(n)

On a terminal each stage is a tqdm bar with rate and ETA; otherwise (a pipe, a log file)
each stage is one line, `convert: writing 145 tensors (1.42 GB)`, and the last line says
how long the whole took. `Progress(quiet=True)` (the CLI's `--quiet`, and the default for
library calls) prints nothing. Notes (`note`) are one-line messages that are not stages,
e.g. how much disk space `prepare` is about to use.

Only work that takes a while is reported: nothing appears before the command has run for
`DELAY` seconds (a stage still running then is announced at that moment; later stages at
once), so quick commands, and errors found early, print nothing but their result.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time

from .files import printable

DELAY = 1.0                  # seconds of silence before progress is shown


class Progress:
    """Stages of one command, reported on `stream` (default stderr)."""

    def __init__(self, name: str = "refimpl", quiet: bool = False, stream=None, bar: bool | None = None,
                 delay: float | None = None):
        self.name, self.quiet = name, quiet
        self.delay = DELAY if delay is None else delay
        self._lock = threading.Lock()
        self._timer = None
        self._shown = False          # whether anything was printed (then `done` says how long it took)
        self.stream = stream if stream is not None else sys.stderr
        if bar is None:
            try:
                bar = self.stream.isatty()
            except (AttributeError, ValueError):
                bar = False
        self.bar = bar and not quiet
        self._tqdm = None
        self.t0 = time.perf_counter()
        self.stages: list[str] = []
        self.notes: list[str] = []
        self._pending = None

    def _print(self, text: str) -> None:
        self._shown = True
        try:
            print(printable(text), file=self.stream, flush=True)
        except (OSError, ValueError):
            pass

    def _later(self, text: str) -> None:
        """Print now if the command has run for `delay` seconds, else when it has (if still current)."""
        with self._lock:
            self._cancel()
            wait = self.delay - (time.perf_counter() - self.t0)
            if wait <= 0:
                self._print(text)
                return
            token = object()
            self._pending = token

            def fire():
                with self._lock:
                    if self._pending is token:
                        self._pending = None
                        self._print(text)
            self._timer = threading.Timer(wait, fire)
            self._timer.daemon = True
            self._timer.start()

    def _cancel(self) -> None:
        self._pending = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stage(self, what: str, total: float | None = None, unit: str = "it") -> "Progress":
        """Start a stage (closing the previous one's bar)."""
        self._close_bar()
        self.stages.append(what)
        if self.quiet:
            return self
        if self.bar and total:
            try:
                from tqdm import tqdm
            except ImportError:          # pragma: no cover - tqdm is a dependency
                self._later(f"{self.name}: {what}")
                return self
            with self._lock:
                self._cancel()
            delay = max(0.0, self.delay - (time.perf_counter() - self.t0))
            self._tqdm = tqdm(total=total, desc=f"{self.name}: {what}", unit=unit, unit_scale=unit == "B",
                              unit_divisor=1024 if unit == "B" else 1000, file=self.stream, leave=False,
                              dynamic_ncols=True, delay=delay)
            self._shown = self._shown or delay == 0
        else:
            self._later(f"{self.name}: {what}")
        return self

    def update(self, n: float = 1) -> None:
        if self._tqdm is not None:
            self._tqdm.update(n)

    def note(self, text: str) -> None:
        """A one-line message that is not a stage (unless quiet; shown under the same delay)."""
        self.notes.append(text)
        if not self.quiet:
            self._close_bar()
            self._later(f"{self.name}: {text}")

    def done(self, text: str | None = None) -> None:
        """Close the last stage; say how long the whole took (if anything was shown)."""
        self._close_bar()
        with self._lock:
            self._cancel()
            if not self.quiet and self._shown:
                self._print(f"{self.name}: {text or 'done'} ({time.perf_counter() - self.t0:.1f} s)")

    def _close_bar(self) -> None:
        if self._tqdm is not None:
            if getattr(self._tqdm, "n", 0) and not getattr(self._tqdm, "disable", False):
                self._shown = self._shown or (time.perf_counter() - self.t0) >= self.delay
            self._tqdm.close()
            self._tqdm = None

    def close(self) -> None:
        self._close_bar()
        with self._lock:
            self._cancel()


QUIET = Progress(quiet=True)
_CURRENT: contextvars.ContextVar[Progress] = contextvars.ContextVar("refimpl_progress", default=QUIET)


def current() -> Progress:
    """The progress reporter of the running command (QUIET unless one is installed)."""
    return _CURRENT.get()


@contextlib.contextmanager
def reporting(p: Progress):
    """Install `p` as the current reporter for the block."""
    token = _CURRENT.set(p)
    try:
        yield p
    finally:
        p.close()
        _CURRENT.reset(token)
