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


def file_in_the_way(path: Path) -> Path | None:
    """The existing non-directory among ``path`` and its ancestors, which stops a directory from
    being created there (at most one can exist: nothing exists below a file); None if none."""
    for p in [Path(path), *Path(path).parents]:
        if p.exists() and not p.is_dir():
            return p
    return None


def _why_not_writable(dest: Path, e: OSError) -> str:
    blocker = file_in_the_way(dest.parent)
    if blocker is not None:
        return f"{blocker} is a file, not a directory"
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


# -- output directories: build beside, swap in when complete ------------------------------------

def _building(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.curate-new")


def _old(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.curate-old")


def _rmtree(p: Path) -> None:
    import shutil  # lazy: only directory outputs need it

    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


def _recover_dir(dest: Path, entries: tuple[str, ...] | None) -> None:
    """Finish a swap a killed run left half done (the old one is moved aside only once the new
    one is complete), then drop the leftovers of a killed build."""
    new, old = _building(dest), _old(dest)
    if old.is_dir() and not old.is_symlink():
        if entries is None:
            if not dest.exists() and new.is_dir():
                new.rename(dest)
        else:
            for e in entries:
                if (new / e).exists() or (new / e).is_symlink():
                    if dest.joinpath(e).exists() and not (old / e).exists():
                        dest.joinpath(e).rename(old / e)
                    (new / e).rename(dest / e)
        _rmtree(old)
    if new.is_dir() and not new.is_symlink():
        _rmtree(new)


def foreign_entries(dest: str | os.PathLike, owned: re.Pattern, entries: tuple[str, ...] | None = None) -> list[str]:
    """The paths under ``dest`` (relative, ``/``-separated) that ``owned`` does not match: every
    file and link (directories are walked), or only those under the top-level ``entries``."""
    dest = Path(dest)
    tops = [dest / e for e in entries] if entries is not None else [dest]
    bad = []
    for top in tops:
        if top.is_symlink() or top.is_file():
            rel = top.relative_to(dest).as_posix()
            if not owned.fullmatch(rel) or top.is_symlink():
                bad.append(rel)
            continue
        if not top.is_dir():
            continue
        for root, dirs, files in os.walk(top):
            for n in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
                p = Path(root, n)
                rel = p.relative_to(dest).as_posix()
                if not owned.fullmatch(rel) or p.is_symlink():
                    bad.append(rel)
    return sorted(bad)


@contextlib.contextmanager
def replace_dir(dest: str | os.PathLike, owned: re.Pattern, *, entries: tuple[str, ...] | None = None,
                what: str = "curate", error: type[CurateError] = OutputError):
    """Yield an empty directory beside ``dest`` (``.<name>.curate-new``) to build a new output in;
    when the block succeeds it replaces ``dest``; when it fails it is removed and ``dest`` is left
    as it was (byte for byte).

    ``owned`` (a pattern over paths relative to ``dest``) says what the command writes: a ``dest``
    holding any other file (or a link) is refused before the block runs, in one line, so nothing
    curate did not write is ever removed. ``entries``: only these top-level names of ``dest`` are
    the output (replaced, or removed when the new output lacks them); everything else in ``dest``
    is left alone (e.g. ``curate tic export``'s directory, which also holds ``tic prepare``'s data
    dirs). Without ``entries`` the whole directory is swapped.

    A run killed during the swap is finished by the next call for the same ``dest`` (the old
    output is moved aside only once the new one is complete); a killed build is removed.
    """
    dest = Path(dest)
    dest = dest.parent.resolve() / dest.name if dest.name else dest.resolve()
    if dest.is_symlink():
        dest = dest.resolve()
    if dest.exists() and not dest.is_dir():
        raise error(f"{dest}: exists and is not a directory")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _recover_dir(dest, entries)
    except OSError as e:
        raise error(f"{dest}: cannot write the output ({_why_not_writable(dest / 'x', e)})") from None
    bad = foreign_entries(dest, owned, entries) if dest.is_dir() else []
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise error(f"{dest}: {bad[0]}{more} was not written by {what}; nothing was changed: move it away or "
                    f"choose another output directory")
    new, old = _building(dest), _old(dest)
    try:
        new.mkdir()
    except OSError as e:
        raise error(f"{new}: cannot create the new output beside the old one ({_why_not_writable(new, e)})") from None
    try:
        yield new
    except BaseException:
        _rmtree(new)
        raise
    try:
        if entries is None:
            if dest.exists():
                dest.rename(old)
            new.rename(dest)
        else:
            dest.mkdir(exist_ok=True)
            old.mkdir()
            for e in entries:
                if (dest / e).exists() or (dest / e).is_symlink():
                    (dest / e).rename(old / e)
            for e in entries:
                if (new / e).exists() or (new / e).is_symlink():
                    (new / e).rename(dest / e)
        _rmtree(old)
        _rmtree(new)
    except OSError as e:
        raise error(f"{dest}: cannot replace the output ({e.strerror or e}); run the command again") from None
