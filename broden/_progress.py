"""One progress-bar helper for the whole toolkit (every package), with a global quiet switch.

On a terminal (or in a notebook) `progress` is tqdm. When the stream is not a terminal
(a log file, CI, a pipe), tqdm's carriage-return redraws pile up into one unreadable
line; there a `LineProgress` writes one plain line when a bar finishes, and one every
LINE_INTERVAL_S seconds while a long one runs.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm.auto import tqdm

__all__ = ["set_quiet", "quieted", "progress", "LineProgress", "LINE_INTERVAL_S"]

_QUIET = False
LINE_INTERVAL_S = 60.0   # at most one line this often while a long bar runs (non-terminal output)
_clock = time.monotonic  # tests replace it: no timed tests


def set_quiet(quiet: bool) -> None:
    """Silence (True) or enable (False) every progress bar made by `progress`."""
    global _QUIET
    _QUIET = bool(quiet)


@contextlib.contextmanager
def quieted(quiet: bool) -> Iterator[None]:
    """Within: no progress bars when `quiet` (else the switch as it is); the switch comes back after."""
    global _QUIET
    before = _QUIET
    _QUIET = before or bool(quiet)
    try:
        yield
    finally:
        _QUIET = before


def _in_notebook() -> bool:
    # tqdm.auto picks its widget bar inside a Jupyter kernel, whose stderr is no terminal either
    return any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, **kwargs: Any) -> Any:
    """tqdm with the toolkit's quiet switch applied; plain lines (LineProgress) when output is not a terminal."""
    kwargs.setdefault("disable", _QUIET)
    if not kwargs["disable"] and not _in_notebook() and not _is_terminal(kwargs.get("file") or sys.stderr):
        return LineProgress(iterable, **kwargs)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def _amount(n: float, unit: str, scale: bool) -> str:
    if scale:  # bytes and the like: tqdm's own SI formatting, without carriage returns
        return f"{tqdm.format_sizeof(n, divisor=1024)}{unit}"
    return f"{int(n):,} {unit}" if float(n).is_integer() else f"{n:,.1f} {unit}"


class LineProgress:
    """The subset of tqdm the toolkit uses (iterate, update, close, context manager), as plain lines.

    A finished bar writes `desc: n/total unit in 12.3 s` (not when `leave` is False: the caller's
    own line reports it, e.g. cgl-train's epoch line); a bar running longer than
    LINE_INTERVAL_S writes `desc: n/total unit (p %), 61 s` at most that often.
    """

    def __init__(self, iterable: Iterable | None = None, desc: str | None = None, total: float | None = None,
                 leave: bool = True, file: TextIO | None = None, unit: str = "it", unit_scale: bool = False,
                 initial: float = 0, disable: bool = False, **_ignored: Any) -> None:
        self.iterable = iterable
        self.desc = desc or ""
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.leave = leave
        self.file = file
        self.unit = unit
        self.unit_scale = bool(unit_scale)
        self.n = initial
        self.disable = disable
        self._start = self._last = _clock()
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar has no iterable")
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def update(self, n: float = 1) -> None:
        """Count `n` more; write a progress line when LINE_INTERVAL_S have passed since the last."""
        self.n += n
        if self.disable or self._closed:
            return
        now = _clock()
        if now - self._last >= LINE_INTERVAL_S:
            self._last = now
            share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
            self._write(f"{self._counted()}{share}, {now - self._start:.0f} s")

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Accepted for tqdm compatibility; plain lines carry no postfix."""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        """Rename the bar (used in its next line)."""
        self.desc = desc or ""

    def close(self) -> None:
        """Write the final line once (unless `leave` is False)."""
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.leave:
            self._write(f"{self._counted()} in {_clock() - self._start:.1f} s")

    def _counted(self) -> str:
        head = f"{self.desc}: " if self.desc else ""
        done = _amount(self.n, self.unit, self.unit_scale)
        if self.total is None:
            return head + done
        return f"{head}{_amount(self.n, '', self.unit_scale).strip()}/{_amount(self.total, self.unit, self.unit_scale)}"

    def _write(self, line: str) -> None:
        stream = self.file or sys.stderr
        stream.write(line + "\n")
        stream.flush()
