"""Archives read in place: `.zip`, `.tar`, `.tar.gz`/`.tgz`, `.tar.bz2`, `.tar.xz`, and `.gz`.

Driven by `scratchlm.ingest.driver`, whose worker calls `members(path, opts)` and treats each
yielded member like a file: the member's bytes go to a temporary file named with the member's
extension, the usual extractor reads it, and documents are named `archive.zip!dir/file.md`.

Nothing is ever extracted to the member's own path (no path traversal), and each member is read
at most `max_file_bytes + 1` bytes, so a zip bomb costs one capped read per member. Nested
archives are skipped with a reason; so are vendored directories, lock files and paths that
`--include`/`--exclude` rule out, as in a walk.
"""

from __future__ import annotations

import gzip
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from scratchlm.ingest import code
from scratchlm.ingest.document import IngestOptions
from scratchlm.ingest.walk import matches

_CHUNK = 1 << 20


@dataclass
class Member:
    """One archive member: its name, declared size, and an opener (None when not to be read)."""

    name: str
    size: int
    open: object | None  # callable returning a binary stream, or None
    skip_reason: str | None = None


def _why_skip(name: str, size: int, opts: IngestOptions) -> str | None:
    parts = name.split("/")
    if any(code.is_vendored_dir(p) for p in parts[:-1]):
        return "vendored, build or tool directory"
    if opts.exclude and matches(opts.exclude, name):
        return "matches --exclude"
    if opts.include and not matches(opts.include, name):
        return "matches no --include"
    if code.is_metadata_file(parts[-1]):
        return "repository or tool metadata"
    if code.is_lock_file(parts[-1]):
        return "lock file"
    lower = name.lower()
    if lower.endswith((".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".gz")):
        return "nested archive (extract it first)"
    if size == 0:
        return "empty file"
    if size > opts.max_file_bytes:
        return f"larger than max_file_bytes ({opts.max_file_bytes})"
    return None


def members(path: Path, opts: IngestOptions) -> Iterator[Member]:
    """The archive's file members in stored order. Raises for a corrupt or unreadable archive."""
    lower = path.name.lower()
    if lower.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                reason = _why_skip(info.filename, info.file_size, opts)
                if info.flag_bits & 0x1:
                    reason = "encrypted zip member"
                yield Member(info.filename, info.file_size, None if reason else (lambda i=info: zf.open(i)), reason)
    elif lower.endswith(".gz") and not lower.endswith(".tar.gz"):
        inner = path.name[: -len(".gz")]
        reason = _why_skip(inner, 1, opts)
        yield Member(inner, -1, None if reason else (lambda: gzip.open(path, "rb")), reason)
    else:
        with tarfile.open(path, mode="r:*") as tf:
            for info in tf:  # streams: members are visited in stored order, never listed up front
                if not info.isfile():
                    continue
                name = info.name.removeprefix("./")
                reason = _why_skip(name, info.size, opts)
                yield Member(name, info.size, None if reason else (lambda i=info: tf.extractfile(i)), reason)


def copy_capped(src: IO[bytes], dst: IO[bytes], limit: int) -> int:
    """Copy at most limit+1 bytes; returns the number copied (limit+1 means: too large)."""
    total = 0
    while total <= limit:
        chunk = src.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        dst.write(chunk)
        total += len(chunk)
    return total

