"""Where distributed runs read and write: local paths or object-storage URLs through fsspec.

Every path the Ray engine touches (pool parquet files, feature files, its work directory, the
subset it writes) may be a local path or a URL such as ``s3://bucket/pool/x.parquet``. Local
paths keep the house rule "write a temporary name, then rename" (:mod:`curate.atomic`). Object
stores have no rename, but an upload becomes visible only when it completes, so a remote output
is written straight to its key and discarded (never committed) if writing fails; a killed
process leaves an unfinished multipart upload, never a partial object.

DuckDB reads remote files through the same fsspec filesystem object
(:func:`register_filesystems`), so no DuckDB extension (``httpfs`` cannot be installed offline)
is needed. fsspec (the ``ray`` extra) is imported only when a URL is used: local paths never
need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from curate.atomic import atomic_path
from curate.errors import CurateError


class StorageError(CurateError):
    """A remote path that cannot be read or written."""


def is_url(path) -> bool:
    """True for ``proto://...`` paths other than ``file://``."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def local_path(path) -> Path:
    s = str(path)
    return Path(s[len("file://"):]) if s.startswith("file://") else Path(s)


def filesystem(url: str, storage_options: dict | None = None):
    """The fsspec filesystem and in-filesystem path for a URL."""
    try:
        import fsspec.core  # lazy: optional extra [ray]; only remote URLs need it
    except ImportError:
        raise StorageError(f"{url}: reading or writing URLs needs fsspec (pip install 'curate[ray]')") from None
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise StorageError(f"{url}: no filesystem for this URL ({e})") from None
    return fs, path


#: what botocore raises when no credentials were found (not imported: botocore is optional)
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")


@contextlib.contextmanager
def _credentials(url):
    """One ``error: URL: no credentials ...`` line instead of botocore's traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - matched by name below, everything else re-raised
        if type(e).__name__ not in _NO_CREDENTIALS:
            raise
        raise StorageError(f"{url}: no credentials to read it ({e}); pass --storage-options JSON "
                           f"(e.g. '{{\"key\": ..., \"secret\": ...}}'), set $CURATE_STORAGE_OPTIONS or the AWS "
                           f"environment variables") from None


def join(base, *parts: str) -> str:
    """Join path parts onto a local path or a URL."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(local_path(base).joinpath(*parts))


def exists(path, storage_options: dict | None = None) -> bool:
    if not is_url(path):
        return local_path(path).exists()
    fs, p = filesystem(path, storage_options)
    with _credentials(path):
        return fs.exists(p)


@contextlib.contextmanager
def open_output(path, storage_options: dict | None = None):
    """A binary file to write ``path`` into, visible under its name only once complete."""
    if not is_url(path):
        with atomic_path(local_path(path)) as tmp:
            with open(tmp, "wb") as f:
                yield f
        return
    fs, p = filesystem(path, storage_options)
    f = fs.open(p, "wb")
    try:
        yield f
    except BaseException:
        # closing would commit the partial upload; discard aborts it instead
        discard = getattr(f, "discard", None)
        if discard is not None:
            discard()
        raise
    try:
        f.close()
    except Exception as e:  # noqa: BLE001 - report the remote failure as the user's path
        raise StorageError(f"{path}: upload failed ({e})") from None


def open_input(path, storage_options: dict | None = None):
    if not is_url(path):
        return open(local_path(path), "rb")
    fs, p = filesystem(path, storage_options)
    with _credentials(path):
        return fs.open(p, "rb")


def read_range(path, start: int, stop: int, storage_options: dict | None = None) -> bytes:
    """Bytes ``[start, stop)`` of a file (a ranged GET on object storage)."""
    if stop <= start:
        return b""
    if not is_url(path):
        with open(local_path(path), "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    fs, p = filesystem(path, storage_options)
    with _credentials(path):
        return fs.cat_file(p, start=start, end=stop)


def write_json(path, obj, storage_options: dict | None = None) -> None:
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode()
    with open_output(path, storage_options) as f:
        f.write(data)


def read_json(path, storage_options: dict | None = None):
    with open_input(path, storage_options) as f:
        return json.loads(f.read())


def remove_tree(path, storage_options: dict | None = None) -> None:
    """Delete a work directory (local or remote); missing is fine."""
    if not is_url(path):
        shutil.rmtree(local_path(path), ignore_errors=True)
        return
    fs, p = filesystem(path, storage_options)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def copy(src, dest, storage_options: dict | None = None) -> None:
    """Copy one file between any two locations (streamed, atomic at the destination)."""
    with open_input(src, storage_options) as fin, open_output(dest, storage_options) as fout:
        while chunk := fin.read(1 << 24):
            fout.write(chunk)


def register_filesystems(con, paths, storage_options: dict | None = None) -> None:
    """Let DuckDB read the remote ``paths`` (``read_parquet('s3://...')``) through fsspec, so
    that it never needs (or tries to download) its ``httpfs`` extension. A protocol already
    registered on ``con`` is kept as it is (DuckDB refuses to register one twice). Registering
    gives no access by itself: a sandboxed connection still reads only its allowed paths."""
    done = set(_registered(con))
    for p in paths:
        if p is None or not is_url(p):
            continue
        proto = str(p).split("://", 1)[0]
        if proto in done:
            continue
        fs, _ = filesystem(p, storage_options)
        con.register_filesystem(_without_dot_segments(fs, storage_options))
        done.add(proto)
        done.update(fs.protocol if isinstance(fs.protocol, (tuple, list)) else [fs.protocol])


#: what a registered filesystem says of a path with a ``..`` segment (:func:`dot_segment_url`)
DOT_SEGMENT = "a '..' segment is not allowed in a URL"
_GUARDED: dict = {}


def _without_dot_segments(fs, storage_options: dict | None):
    """``fs`` as a filesystem that refuses every path with a ``..`` segment. DuckDB's sandbox
    compares URLs as text (``s3://pool/meta/../other/x`` starts with ``s3://pool/meta/``); S3
    keeps such keys literally, but a store or proxy that normalises paths would read outside the
    allowed prefix, so such paths never reach the store."""
    cls = type(fs)
    guarded = _GUARDED.get(cls)
    if guarded is None:
        def _strip_protocol(klass, path):
            for one in ([path] if isinstance(path, str) else path):
                if ".." in str(one).split("/"):
                    raise PermissionError(f"{one}: {DOT_SEGMENT}")
            return super(guarded, klass)._strip_protocol(path)

        guarded = type(f"NoDotSegments{cls.__name__}", (cls,), {"_strip_protocol": classmethod(_strip_protocol)})
        _GUARDED[cls] = guarded
    try:
        return guarded(**(storage_options or {}))
    except Exception:  # noqa: BLE001 - a filesystem that cannot be re-created so: refuse nothing extra
        return fs


def dot_segment_url(message: str) -> str | None:
    """The URL a registered filesystem refused for its ``..`` segment, from an error message."""
    marker = f": {DOT_SEGMENT}"
    if marker not in message:
        return None
    head = message.split(marker, 1)[0]
    return head.rsplit(" ", 1)[-1]


def _registered(con) -> list[str]:
    try:
        return list(con.list_filesystems())
    except Exception:  # noqa: BLE001 - an old DuckDB without list_filesystems: nothing known
        return []


def url_size(path, storage_options: dict | None = None) -> int:
    """Size in bytes of a local file or an object (a HEAD request on object storage)."""
    if not is_url(path):
        return local_path(path).stat().st_size
    fs, p = filesystem(path, storage_options)
    with _credentials(path):
        return int(fs.size(p))


def parse_storage_options(raw: str | None, source: str) -> dict | None:
    """fsspec options given as a JSON object (``source`` names where the text came from)."""
    if not raw:
        return None
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StorageError(f"{source}: not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(opts, dict):
        raise StorageError(f"{source}: must be a JSON object of fsspec options")
    return opts


#: the ``--storage-options`` of the command running now (innermost last; see :func:`options_given`)
_GIVEN: list[dict] = []


def storage_options_from_env() -> dict | None:
    """The default fsspec options of every reader not handed its own: the command line's
    ``--storage-options`` while a command runs with them (:func:`options_given`), else
    ``$CURATE_STORAGE_OPTIONS`` (a JSON object of fsspec options), if set."""
    if _GIVEN:
        return _GIVEN[-1]
    return parse_storage_options(os.environ.get("CURATE_STORAGE_OPTIONS"), "$CURATE_STORAGE_OPTIONS")


@contextlib.contextmanager
def options_given(storage_options: dict | None):
    """While the block runs, :func:`storage_options_from_env` returns ``storage_options`` (a
    command's ``--storage-options``) instead of reading the environment, so the steps that take
    their options from there (feature builds for a pool in object storage, the catalog's
    filesystems) use what the command line gave. ``None``: no change."""
    if storage_options is None:
        yield
        return
    _GIVEN.append(storage_options)
    try:
        yield
    finally:
        _GIVEN.pop()
