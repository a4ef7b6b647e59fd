"""Files: write-then-rename (so a failed or killed command never leaves a half-written output),
and the one helper that hashes a file.

Outputs are written under a temporary name in the destination directory (same filesystem, so
the final ``os.replace`` is atomic) and renamed only once complete; on any exception the
temporary file is removed.

A process killed with ``kill -9`` cannot remove its temporary file, so the name says who wrote
it: ``.<name>.<pid>-<host>.<random><suffix>.tmp`` (``host``: 8 hex digits of a hash of the host
name). The next :func:`atomic_path` for the same destination removes the temporary files of
that destination whose writer ran on this host and is no longer alive (the first call in a
directory cleans the whole directory of such files, once per process); a live writer's (or
another host's, on shared storage) is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path

from curate.errors import CurateError

_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        return raw[raw.rindex(b")") + 2:][:1] != b"Z"
    except (OSError, ValueError):
        return True


# .<name>.<pid>-<host>.<8 random [a-z0-9_]><suffix>.tmp (mkstemp's random part)
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.[a-z0-9_]{8}[^/]*\.tmp\Z")
_CLEANED: set[tuple[int, str]] = set()  # (pid, directory) already cleaned by this process


def _stale(name: str) -> re.Match | None:
    m = _TEMP.match(name)
    if m and m.group("host") == _HOST and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
        return m
    return None


def stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Temporary files of ``dest`` left by writers on this host that are no longer alive."""
    dest = Path(dest)
    try:
        names = [e.name for e in os.scandir(dest.parent) if e.name.startswith(f".{dest.name}.")]
    except OSError:
        return []
    return sorted(dest.parent / n for n in names if (m := _stale(n)) and m.group("name") == dest.name)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left in ``directory`` when its writer was
    killed (writer on this host, no longer alive); returns what was removed."""
    removed = []
    try:
        names = [e.name for e in os.scandir(directory) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return removed
    for n in names:
        if _stale(n):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, n))
                removed.append(Path(directory, n))
    return sorted(removed)


def _clean_once(directory: Path) -> None:
    # once per process and directory: a directory of N outputs is listed once, not N times
    key = (os.getpid(), str(directory))
    if key not in _CLEANED:
        remove_stale_temps(directory)
        _CLEANED.add(key)


class OutputError(CurateError):
    """An output that cannot be written where it was asked for."""


def _why_not_writable(dest: Path, e: OSError) -> str:
    for p in reversed([dest.parent, *dest.parent.parents]):
        if p.exists() and not p.is_dir():
            return f"{p} is a file, not a directory"
    if dest.is_dir():
        return "it is a directory"
    if isinstance(e, PermissionError):
        return f"{dest.parent} is not writable: permission denied"
    return e.strerror or str(e)


def check_output(dest: str | os.PathLike) -> Path:
    """Fail now, in one line, if ``dest`` could not be written (before long work produces it):
    its directory is created if missing; an existing directory at ``dest`` is refused."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{dest}: cannot write the output ({_why_not_writable(dest, e)})") from None
    if dest.is_dir():
        raise OutputError(f"{dest}: cannot write the output (it is a directory)")
    if not os.access(dest.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{dest}: cannot write the output ({dest.parent} is not writable: permission denied)")
    return dest


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``dest``; rename it to ``dest`` if the block succeeds.

    Stale temporary files of ``dest`` (their writer was killed) are removed first. A ``dest``
    that cannot be written is an :class:`OutputError` naming it (one line, no traceback).
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _clean_once(dest.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}-{_HOST}.", suffix=suffix + ".tmp",
                                   dir=dest.parent)
    except OSError as e:
        raise OutputError(f"{dest}: cannot write the output ({_why_not_writable(dest, e)})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        try:
            os.replace(tmp, dest)
        except OSError as e:
            raise OutputError(f"{dest}: cannot write the output ({_why_not_writable(dest, e)})") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(dest: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def file_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, read in blocks (the one file-hash helper)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
