"""Webdataset tars: the one writer and the one reader of their members.

Writing (:class:`TarWriter`, :func:`write_tar`, :func:`tar_header`): plain USTAR members, as
Python's ``tarfile`` writes them with ``format=USTAR_FORMAT``, ``mtime=0``, ``mode=0o444``,
uid/gid 0 and the given owner name (none by default), ended by two zero blocks padded to a
10240-byte record. Every field is fixed, so the same members give the same bytes: the pools
built from tables, the bundled sample pool, the demo's shards and the resharder's outputs are
all written here. A header is built from a cached template (a few us, where ``tarfile.addfile``
costs ~40-75 us per member), and USTAR without PAX headers is what webdataset reads fastest.

Reading (:func:`walk_tar`, :func:`group_samples`, :func:`scan_tar`, :func:`sample_members`):
tar *headers* are parsed here, not by ``tarfile``, so that a shard can be listed as samples with
byte ranges (the shard index), and one sample's members read from a byte range (the resharder).
A *sample* is a run of consecutive members sharing a key (webdataset's rule: key = member path
up to the first dot of its basename). USTAR, PAX (``x``) and GNU long-name (``L``) headers are
understood; a tar that ends inside a header, a member's data or padding, or before its two
end-of-archive blocks is reported as truncated (:meth:`ShardScan.truncation` names the offsets);
a PAX header that does not parse is a :class:`ShardError` naming shard and offset.
"""

from __future__ import annotations

import functools
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from curate.errors import CurateError

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile's record size: an archive's length is a multiple of it
_ZERO = bytes(BLOCK)
_PADS = [bytes(i) for i in range(BLOCK)]
_NULS = [bytes(i) for i in range(101)]
# webdataset's split of a member path into (key, extension): key ends at the basename's first dot
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class ShardError(CurateError):
    """A shard or shard directory that cannot be used as it is."""


class TarMemberError(ShardError, ValueError):
    """A member a plain USTAR header cannot hold (a name over 100 bytes, a size of 8 GiB or more)."""


# ------------------------------------------------------------------------------------- writing

@functools.lru_cache(maxsize=None)
def _template(owner: bytes) -> tuple[bytes, bytes, bytes, int]:
    """The fixed parts of a header for ``owner``: (mode/uid/gid, mtime, type flag to the end,
    byte sum of the whole template with the checksum field as spaces)."""
    h = bytearray(BLOCK)
    h[100:124] = b"0000444\x000000000\x000000000\x00"  # mode, uid, gid
    h[136:148] = b"00000000000\x00"  # mtime 0: integer, so no PAX header; fixed, so same bytes
    h[148:156] = b"        "  # the checksum field counts as spaces while summing
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"  # devmajor/devminor stay NUL for regular files, as tarfile writes them
    h[265:265 + len(owner)] = owner  # uname
    h[297:297 + len(owner)] = owner  # gname
    return bytes(h[100:124]), bytes(h[136:148]), bytes(h[156:]), sum(h)


def tar_header(name: str | bytes, size: int, owner: str = "") -> bytes:
    """The USTAR header of a regular file, as ``tarfile`` writes it (mtime 0, mode 0444, uid/gid 0).

    Raises :class:`TarMemberError` (a ``ValueError``) for what plain USTAR cannot hold.
    """
    if isinstance(name, str):
        name = name.encode("utf-8", "surrogateescape")  # tarfile's encoding of member names
    if len(name) > 100:
        raise TarMemberError(f"member name {name[:60]!r}... is longer than 100 bytes")
    if size >= 8 ** 11:
        raise TarMemberError(f"member {name!r}: {size} bytes do not fit a plain USTAR header (8 GiB or more)")
    mid, mtime, tail, base = _template(owner.encode())
    sz = b"%011o\x00" % size
    chk = b"%06o\x00 " % (base + sum(name) + sum(sz))
    return b"".join((name, _NULS[100 - len(name)], mid, sz, mtime, chk, tail))


def end_of_archive(length: int) -> bytes:
    """What ends an archive of ``length`` bytes: two zero blocks, padded to a whole record."""
    end = length + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % RECORD))


class TarWriter:
    """Appends regular members to a binary file; :meth:`close` ends the archive (not the file).

    A buffered file (``open(p, "wb")``, ``BytesIO``) gets plain writes; an unbuffered one
    (``open(p, "wb", buffering=0)``) gets one ``writev`` per batch of members, so large bodies
    (memoryviews of input tars) are not copied. ``offset`` is the number of bytes written.
    """

    def __init__(self, f, owner: str = ""):
        self.f = f
        self.owner = owner
        self.offset = 0
        self._fd = f.fileno() if isinstance(f, io.RawIOBase) else None
        self._iov: list = []
        self._pending = 0

    def add(self, name: str | bytes, data) -> None:
        """Append one member (``data``: bytes, bytearray or memoryview)."""
        n = len(data)
        pad = -n % BLOCK
        header = tar_header(name, n, self.owner)
        self.offset += BLOCK + n + pad
        if self._fd is None:
            self.f.write(header)
            self.f.write(data)
            if pad:
                self.f.write(_PADS[pad])
            return
        self._iov += (header, data, _PADS[pad])
        self._pending += BLOCK + n + pad
        if len(self._iov) >= 900 or self._pending >= 1 << 22:
            self.flush()

    def flush(self) -> None:
        """Write what is batched (unbuffered files only; buffered files are written directly)."""
        if self._iov:
            done = os.writev(self._fd, self._iov)
            if done != self._pending:  # a short write: finish the rest plainly
                rest = b"".join(bytes(b) for b in self._iov)[done:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
            self._iov, self._pending = [], 0

    def close(self) -> None:
        """End the archive: two zero blocks, padded to a whole record as ``tarfile`` does."""
        self.flush()
        end = end_of_archive(self.offset)
        self.offset += len(end)
        if self._fd is None:
            self.f.write(end)
            return
        while end:
            end = end[os.write(self._fd, end):]


def write_tar(path: str | os.PathLike, members, owner: str = "") -> None:
    """Write a whole tar of ``(name, data)`` members at ``path`` (use ``atomic_path`` for atomicity)."""
    with open(path, "wb", buffering=1 << 20) as f:
        tar = TarWriter(f, owner)
        for name, data in members:
            tar.add(name, data)
        tar.close()


# ------------------------------------------------------------------------------------- reading

def _octal(field: bytes, where: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    s = field.split(b"\0", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        raise ShardError(f"{where}: corrupt tar header (size field {field!r})") from None


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """The ``length key=value\n`` records of a PAX header body; ``where`` names shard and offset."""
    out, pos = {}, 0
    while pos < len(data):
        if not data[pos:].strip(b"\0"):
            break  # NUL padding after the last record
        sp = data.find(b" ", pos)
        field_ = data[pos:sp] if sp >= 0 else data[pos:pos + 20]
        if sp < 0 or not field_.isdigit():
            raise ShardError(f"{where}: corrupt PAX header (record length {field_[:20]!r} is not a number)")
        length = int(field_)
        if length <= sp - pos + 1 or pos + length > len(data):
            raise ShardError(f"{where}: corrupt PAX header (record length {length} does not fit the header)")
        rec = data[sp + 1 : pos + length - 1]
        k, _, v = rec.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
    return out


@dataclass
class TarEntry:
    """One regular member: its name, where its header chain starts and where its data is."""

    name: str
    start: int  # offset of the first header block belonging to it (PAX / GNU long name included)
    data: int  # offset of its data
    size: int

    @property
    def end(self) -> int:  # end of its data padded to a block
        return self.data + -(-self.size // BLOCK) * BLOCK


def walk_tar(read, start: int, end: int, where: str, check: bool = True):
    """Yield the regular members of tar bytes in ``[start, end)``; ``read(offset, n)`` gives bytes.

    Stops at the end-of-archive blocks or at ``end``. ``check=False`` skips header checksums (for
    bytes already checked when the shard was indexed). Returns (as the generator's value) the
    offset where parsing stopped and whether the archive is truncated: the data runs out inside a
    header, a member's data or its padding, or (for a whole tar) before the two zero blocks that
    end an archive. Walking a byte range of whole members (one sample) ends at ``end`` instead;
    its callers ignore that value.
    """
    pos = start
    pending_name, chain_start = None, None
    pax: dict[str, str] = {}
    while pos + BLOCK <= end:
        h = bytes(read(pos, BLOCK))
        if len(h) < BLOCK:
            return pos, True
        if h == _ZERO:
            # end of archive: two zero blocks; a lone one at the end of the file is a cut archive
            if pos + 2 * BLOCK > end or bytes(read(pos + BLOCK, BLOCK)) != _ZERO:
                return pos, pos + 2 * BLOCK > end
            return pos, False
        at = f"{where} at byte {pos}"
        if check and _octal(h[148:156], at) != sum(h) - sum(h[148:156]) + 256:
            raise ShardError(f"{where}: corrupt tar header at byte {pos} (bad checksum)")
        size = _octal(h[124:136], at)
        flag = h[156:157]
        data = pos + BLOCK
        nxt = data + -(-size // BLOCK) * BLOCK
        if chain_start is None:
            chain_start = pos
        if flag in (b"x", b"L", b"g"):
            if nxt > end:
                return chain_start, True
            body = bytes(read(data, size))
            if flag == b"x":
                pax = _pax_records(body, at)
            elif flag == b"L":
                pending_name = body.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                chain_start = None  # a global header belongs to no member
            pos = nxt
            continue
        name = h[0:100].split(b"\0", 1)[0]
        if h[257:262] == b"ustar":
            prefix = h[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        name = pending_name or pax.get("path") or name.decode("utf-8", "replace")
        if "size" in pax:
            if not pax["size"].isdigit():
                raise ShardError(f"{at}: corrupt PAX header (size {pax['size'][:20]!r} is not a number)")
            size = int(pax["size"])
            nxt = data + -(-size // BLOCK) * BLOCK
        if nxt > end:  # the data or its padding is cut off
            return chain_start, True
        if flag in (b"0", b"\0", b"7"):
            yield TarEntry(name, chain_start, data, size)
        pending_name, chain_start, pax = None, None, {}
        pos = nxt
    return pos, True


def split_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's (key, extension) of a member path; (None, None) if it has no extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def group_samples(entries):
    """Group consecutive members with the same key into samples: yields (key, [(TarEntry, ext)])."""
    key, members = None, []
    for e in entries:
        k, ext = split_key(e.name)
        if k is None or os.path.basename(e.name).startswith("__"):
            continue
        if k != key and members:
            yield key, members
            members = []
        key = k
        members.append((e, ext))
    if members:
        yield key, members


@dataclass
class ShardScan:
    """The samples of one tar: keys, byte ranges (first header to the end of the last member's
    padded data), whether each has a json member and where that json's data is."""

    path: Path
    size: int
    mtime_ns: int
    keys: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    has_json: list = field(default_factory=list)
    json_at: list = field(default_factory=list)  # (data offset, size) of the json member or None
    truncated: bool = False
    truncated_at: int | None = None  # where the incomplete member (or the missing end) starts

    def truncation(self) -> str:
        """One line naming the shard and the byte offsets of a truncated tar."""
        return (f"{self.path}: truncated at byte {self.size} (incomplete member or missing end-of-archive "
                f"blocks from byte {self.truncated_at}); its last sample is left out")


def scan_tar(path: str | os.PathLike) -> ShardScan:
    """Read the headers of one tar and list its samples with their byte ranges."""
    path = Path(path)
    st = path.stat()
    scan = ShardScan(path, st.st_size, st.st_mtime_ns)
    with open(path, "rb") as f:
        fd = f.fileno()

        def read(off, n):
            return os.pread(fd, n, off)

        gen = walk_tar(read, 0, st.st_size, str(path))
        entries = []
        try:
            while True:
                entries.append(next(gen))
        except StopIteration as stop:
            at, scan.truncated = stop.value if stop.value else (0, False)
            scan.truncated_at = at if scan.truncated else None
    samples = list(group_samples(entries))
    if scan.truncated and samples:
        # the member the tar ends in belongs to the next sample or to the last one we saw; a
        # sample whose later members were cut off must not be copied as if complete
        samples.pop()
    for key, members in samples:
        js = next((m for m, ext in members if ext == "json"), None)
        scan.keys.append(key)
        scan.offsets.append(members[0][0].start)
        scan.lengths.append(members[-1][0].end - members[0][0].start)
        scan.has_json.append(js is not None)
        scan.json_at.append((js.data, js.size) if js is not None else None)
    return scan


def sample_members(data: bytes, base: int, off: int, length: int, path: str) -> list:
    """(ext, body) for each member of the sample at ``off`` inside ``data`` (which starts at
    byte ``base`` of the tar at ``path``); bodies are memoryviews of ``data``.

    Plain USTAR members (what img2dataset and we write) are parsed inline; anything else (PAX or
    GNU long-name headers) goes through the general :func:`walk_tar`.
    """
    out = []
    buf = memoryview(data)
    p, end = off - base, off - base + length
    while p < end:
        if data[p + 156] not in (48, 0) or data[p + 345] != 0 or data[p + 124] & 0x80:
            return _sample_members_general(buf, base, off, length, f"{path} at byte {off}")
        nul = data.find(b"\0", p + 124, p + 136)
        size = int(data[p + 124 : nul if nul >= 0 else p + 136].strip() or b"0", 8)
        nul = data.find(b"\0", p, p + 100)
        name_end = nul if nul >= 0 else p + 100
        leaf = data.rfind(b"/", p, name_end) + 1 or p
        dot = data.find(b".", leaf, name_end)
        start = p + BLOCK
        if dot > leaf and data[leaf : leaf + 2] != b"__":
            out.append((data[dot + 1 : name_end].decode("utf-8", "replace"), buf[start : start + size]))
        p = start + size + (-size % BLOCK)
    return out


def _sample_members_general(buf: memoryview, base: int, off: int, length: int, where: str) -> list:
    def read(o, n):
        return buf[o - base : o - base + n]

    out = []
    for e in walk_tar(read, off, off + length, where, check=False):
        _, ext = split_key(e.name)
        if ext is not None:
            out.append((ext, buf[e.data - base : e.data - base + e.size]))
    return out
