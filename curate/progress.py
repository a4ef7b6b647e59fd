"""Progress of long work: a live bar at a terminal, plain log lines everywhere else.

Every long step shows its progress through :class:`Progress`, a :class:`tqdm.tqdm` with the same
arguments (``desc``, ``total``, ``unit``, ``initial``, ``disable``, ...). Where standard error is a
terminal it is tqdm's bar. Where it is not (a log file, a pipe, a batch job, CI) a bar would be
one endless line of carriage returns, so it writes a plain line instead, at the start, at most
every :func:`interval` seconds while the count moves, and at the end, as datatrove and
img2dataset log::

    text_features: 400,000/1,000,000 captions (40%) 81,203/s elapsed 5s ETA 7s
    text_features: 1,000,000/1,000,000 captions (100%) 80,950/s elapsed 12s done

(the rate is the average since the start; without a known total the line is
``pool: 400,000 rows 81,203/s elapsed 5s``).

Environment:

* ``CURATE_PROGRESS_INTERVAL``: seconds between two log lines of one bar (default 5; 0 logs
  every update, as the tests do).
* ``CURATE_PROGRESS``: ``auto`` (default: bar at a terminal, lines elsewhere), ``log`` (lines
  even at a terminal) or ``off`` (no progress output; :func:`enabled` is False).

Commands pass ``progress=enabled()`` (:func:`curate.cli.options.progress`) to library functions,
which create their bars with ``disable=not progress``. DuckDB's own progress bar writes to
standard *output*, so it is only turned on for a person at a terminal: :func:`duckdb_bar`.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

from curate.errors import CurateError

DEFAULT_INTERVAL = 5.0
MODES = ("auto", "log", "off")


def mode() -> str:
    """``$CURATE_PROGRESS`` (auto, log or off)."""
    m = (os.environ.get("CURATE_PROGRESS") or "auto").strip().lower()
    if m not in MODES:
        raise CurateError(f"CURATE_PROGRESS={m}: not one of {', '.join(MODES)}")
    return m


def interval() -> float:
    """``$CURATE_PROGRESS_INTERVAL``: seconds between log lines (default 5)."""
    raw = os.environ.get("CURATE_PROGRESS_INTERVAL")
    if raw is None or not raw.strip():
        return DEFAULT_INTERVAL
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not v >= 0:  # also NaN
        raise CurateError(f"CURATE_PROGRESS_INTERVAL={raw}: not a number of seconds (>= 0)")
    return v


def enabled() -> bool:
    """Whether commands show progress at all (bar or lines): everywhere unless ``CURATE_PROGRESS=off``."""
    return mode() != "off"


def _isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def at_terminal(file=None) -> bool:
    """Whether progress goes to a person at a terminal (a live bar) rather than to a log."""
    return mode() == "auto" and _isatty(file if file is not None else sys.stderr)


def duckdb_bar(progress) -> bool:
    """The value for DuckDB's ``enable_progress_bar``: only with ``progress`` and at a terminal
    (DuckDB draws its bar on standard output, which a pipe or a file would keep)."""
    return bool(progress) and at_terminal()


def _count(x) -> str:
    if isinstance(x, float) and not x.is_integer():
        return f"{x:,.1f}"
    return f"{int(x):,}"


def _rate(r: float) -> str:
    if r >= 100:
        return f"{r:,.0f}"
    if r >= 1:
        return f"{r:.1f}"
    return f"{r:.2g}"


def _duration(s: float) -> str:
    if s < 10:
        return f"{s:.1f}s"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def log_line(desc: str | None, n, total, unit: str, elapsed: float, initial=0, postfix: str | None = None,
             final: bool = False) -> str:
    """One progress line: ``desc: done/total unit (pct%) rate/s elapsed Ns ETA Ns`` (see module doc)."""
    parts = [f"{desc}:"] if desc else []
    if total:
        parts.append(f"{_count(n)}/{_count(total)} {unit} ({100 * n / total:.0f}%)")
    else:
        parts.append(f"{_count(n)}/{_count(total)} {unit}" if total == 0 else f"{_count(n)} {unit}")
    rate = (n - initial) / elapsed if elapsed > 0 and n > initial else None
    if rate:
        parts.append(f"{_rate(rate)}/s")
    if elapsed > 0 or final:
        parts.append(f"elapsed {_duration(elapsed)}")
    if final:
        parts.append("done")
    elif total and rate and n < total:
        parts.append(f"ETA {_duration((total - n) / rate)}")
    line = " ".join(parts)
    return f"{line}, {postfix}" if postfix else line


class Progress(tqdm):
    """tqdm's bar at a terminal; elsewhere plain lines (start, every :func:`interval` s, end).

    Takes tqdm's arguments. ``mininterval``/``miniters`` given by a caller apply to the bar
    only; the lines follow ``$CURATE_PROGRESS_INTERVAL``.
    """

    def __init__(self, iterable=None, *args, **kwargs):
        if mode() == "off":
            kwargs["disable"] = True
        file = kwargs.get("file")
        self._lines = not kwargs.get("disable") and not at_terminal(file)
        self._every = interval()
        self._logged_t: float | None = None  # when the last line was written
        self._closing = False
        if self._lines:
            kwargs["mininterval"] = self._every
            kwargs["miniters"] = 1  # check the clock on every update: no line is held back by a stale estimate
            kwargs["delay"] = 0
        super().__init__(iterable, *args, **kwargs)

    def _write_line(self, final: bool = False) -> None:
        d = self.format_dict
        line = log_line(self.desc, d["n"], d["total"], d["unit"], d["elapsed"], d["initial"] or 0,
                        d["postfix"], final)
        self._logged_t = time.monotonic()
        try:
            self.fp.write(line + "\n")
            self.fp.flush()
        except (ValueError, OSError):  # stderr closed under us: progress is not worth an error
            pass

    def display(self, msg=None, pos=None):
        if not self._lines:
            return super().display(msg, pos)
        if self._closing:
            return None
        if self._logged_t is None or time.monotonic() - self._logged_t >= self._every:
            self._write_line()
        return None

    def clear(self, nolock=False):
        if not self._lines:
            return super().clear(nolock)

    def close(self):
        if not getattr(self, "_lines", False) or getattr(self, "disable", True):
            return super().close()
        self._write_line(final=True)
        self._closing = True
        self.leave = False  # nothing to leave or erase: the lines are already written
        super().close()


class DuckDBProgress:
    """Lines for a long DuckDB query when standard error is not a terminal (where DuckDB's own
    bar, drawn on standard output, is off): a thread polls ``con.query_progress()`` (DuckDB tracks
    it with ``enable_progress_bar`` on and ``enable_progress_bar_print`` off, see
    :func:`duckdb_settings`) and writes ``desc: 40/100 % ...`` lines. A no-op at a terminal or
    without ``progress``. Use as a context manager around the execution and fetch."""

    def __init__(self, con, desc: str, progress):
        self.con, self.desc = con, desc
        self.active = bool(progress) and enabled() and not at_terminal()
        self._stop = None

    def __enter__(self):
        if self.active:
            import threading  # lazy: only when logging

            self._stop = threading.Event()
            self._bar = Progress(total=100, desc=self.desc, unit="%")
            self._thread = threading.Thread(target=self._poll, daemon=True, name="curate-duckdb-progress")
            self._thread.start()
        return self

    def _poll(self) -> None:
        seen = 0.0
        while not self._stop.wait(0.2):
            try:
                p = float(self.con.query_progress())
            except Exception:  # noqa: BLE001 - the connection is closing: progress is not worth an error
                return
            if p > seen:
                self._bar.update(min(p, 100.0) - seen)
                seen = min(p, 100.0)

    def __exit__(self, exc_type, *_):
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            if exc_type is None and self._bar.n < 100:
                self._bar.update(100 - self._bar.n)
            self._bar.close()
        return False


def duckdb_settings(progress) -> dict:
    """DuckDB settings for a query run with ``progress``: its bar at a terminal, otherwise progress
    tracked without printing, for :class:`DuckDBProgress`."""
    if not progress or not enabled():
        return {"enable_progress_bar": False}
    if at_terminal():
        return {"enable_progress_bar": True}
    return {"enable_progress_bar": True, "enable_progress_bar_print": False}
