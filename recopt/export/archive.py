"""Reading a zip archive strictly, and writing one recopt controls.

Different zip readers disagree on crafted files (Python's ``zipfile`` reads
the *last* of two entries with one name, torch's reader the *first*; data
can hide before the first entry or between entries). So recopt never hands
a received archive to another reader: :func:`read_strict` takes it apart
into ``{name: bytes}`` — refusing duplicate names, unsafe names (absolute,
``..``, backslashes, control characters), symlinks, directories, encrypted
or compressed-with-anything-but-deflate entries, unaccounted bytes and
oversize content — and after the checks the loader builds a fresh archive
with :func:`write` from exactly the checked bytes.
"""
from __future__ import annotations

import io
import re
import stat
import zipfile
from typing import Dict

from .errors import ArtifactError

MAX_ENTRIES = 100_000
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_name(name: str, path: str) -> None:
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts)
            or not all(_SAFE_PART.match(p) for p in parts)):
        raise ArtifactError(f"refusing to load {path}: unsafe entry name {name[:120]!r} (absolute, '..', "
                            "backslash or unusual characters)")


def read_strict(data: bytes, path: str, max_total: int) -> Dict[str, bytes]:
    """``{entry name: bytes}`` of a zip archive, or ArtifactError naming what is wrong with it."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as e:
        raise ArtifactError(f"refusing to load {path}: not a readable zip archive ({e}); the file is corrupted "
                            "or was not written by recopt.export") from None
    if len(infos) > MAX_ENTRIES:
        raise ArtifactError(f"refusing to load {path}: {len(infos)} entries (limit {MAX_ENTRIES})")
    names = [i.filename for i in infos]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ArtifactError(f"refusing to load {path}: duplicate entry names {dups[:3]} (zip readers disagree on "
                            "which copy they read); the archive was crafted or corrupted")
    total = sum(i.file_size for i in infos)
    if total > max_total:
        raise ArtifactError(f"refusing to load {path}: {total} bytes uncompressed (limit {max_total}; raise it "
                            "with max_bytes= if the model really is that large)")
    out: Dict[str, bytes] = {}
    expected_end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        name = info.filename
        check_name(name, path)
        mode = (info.external_attr >> 16) & 0xFFFF
        if info.is_dir() or stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise ArtifactError(f"refusing to load {path}: entry {name!r} is a directory, symlink or special "
                                "file")
        if info.flag_bits & 0x1:
            raise ArtifactError(f"refusing to load {path}: entry {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ArtifactError(f"refusing to load {path}: entry {name!r} uses compression method "
                                f"{info.compress_type}")
        if info.header_offset != expected_end:
            raise ArtifactError(f"refusing to load {path}: {info.header_offset - expected_end} unaccounted bytes "
                                f"before entry {name!r}; the archive was crafted or corrupted")
        try:
            blob = zf.read(info)
        except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError) as e:
            raise ArtifactError(f"refusing to load {path}: entry {name!r} is corrupted ({e})") from None
        if len(blob) != info.file_size:
            raise ArtifactError(f"refusing to load {path}: entry {name!r} has the wrong size")
        out[name] = blob
        # Where this entry's data ends: local header (30 bytes + name + extra) + compressed data (+ descriptor).
        local_extra = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
        local_name = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
        expected_end = info.header_offset + 30 + local_name + local_extra + info.compress_size
        if info.flag_bits & 0x8:
            desc = data[expected_end:expected_end + 4]
            expected_end += 16 if desc == b"PK\x07\x08" else 12
            if info.file_size >= 0xFFFFFFFF or info.compress_size >= 0xFFFFFFFF:
                expected_end += 8
    central = zf.start_dir
    if central != expected_end:
        raise ArtifactError(f"refusing to load {path}: {central - expected_end} unaccounted bytes before the zip "
                            "directory; the archive was crafted or corrupted")
    return out


def check_canonical(data: bytes, entries: Dict[str, bytes], path: str) -> None:
    """The archive must be byte for byte what :func:`write` makes of its entries (recopt writes every
    archive that way), so no header field, timestamp or padding can change unnoticed."""
    if write(entries) != data:
        raise ArtifactError(f"refusing to load {path}: the zip container is not the exact form recopt writes "
                            "(headers, order or padding differ); the archive was modified or corrupted after "
                            "export. Re-export it with recopt.export")


def write(entries: Dict[str, bytes]) -> bytes:
    """A plain zip (stored, no compression) of ``entries`` in the given order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, blob in entries.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, blob)
    return buf.getvalue()
