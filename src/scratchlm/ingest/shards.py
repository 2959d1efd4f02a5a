"""Corpus output: JSON Lines shards, the manifest, and the resume state a previous run left.

Driven by `scratchlm.ingest.driver.run`. Layout of CORPUS_DIR:

    part-NNNNN.jsonl[.gz|.zst]   documents; written as hidden `.part-NNNNN....tmp`, renamed when full
    manifest.jsonl               one line per input; appended only once its documents are final
    .ingest/part-NNNNN....sha256 the shard's document hashes, 32 bytes each (exact dedup on resume)

`open_shard_for_reading` reads any shard; `scratchlm prepare` reads `part-*.jsonl*`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.ingest.clean import Deduplicator
from scratchlm.ingest.walk import Record

STATE_DIR = ".ingest"
MANIFEST = "manifest.jsonl"
SHARD_SUFFIX = {"none": ".jsonl", "gz": ".jsonl.gz", "zst": ".jsonl.zst"}


# --- main side: output ----------------------------------------------------------------------
def _open_shard(path: Path, compression: str) -> io.TextIOBase:
    if compression == "gz":
        # mtime=0 keeps the bytes reproducible: same input, same shard
        return io.TextIOWrapper(gzip.GzipFile(path, "wb", compresslevel=6, mtime=0), encoding="utf-8")
    if compression == "zst":
        try:
            import zstandard
        except ImportError:
            raise UserError("zstd shards need zstandard: pip install zstandard") from None

        raw = open(path, "wb")
        return io.TextIOWrapper(zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=True), encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def open_shard_for_reading(path: Path) -> io.TextIOBase:
    """Read a shard of any compression (used by resume; `prepare` may use it too)."""
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if path.name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), encoding="utf-8")
    return open(path, encoding="utf-8")


class ShardWriter:
    """Writes `part-NNNNN.jsonl*` through hidden temp files; `rotate()` makes a shard final."""

    def __init__(self, out: Path, compression: str, shard_bytes: int, index: int, on_final: Callable[[], None]) -> None:
        if compression not in SHARD_SUFFIX:
            raise ValueError(f"compression {compression!r}: expected none, gz or zst")
        self.out, self.compression, self.shard_bytes, self.index = out, compression, shard_bytes, index
        self.on_final = on_final
        self.file: io.TextIOBase | None = None
        self.bytes = 0
        self.hashes = bytearray()
        self.written: list[str] = []

    def name(self) -> str:
        return f"part-{self.index:05d}{SHARD_SUFFIX[self.compression]}"

    def write(self, line: str, sha256_hex: str) -> None:
        if self.file is None:
            self.file = _open_shard(self.out / f".{self.name()}.tmp", self.compression)
        self.file.write(line)
        self.file.write("\n")
        self.bytes += len(line) + 1
        self.hashes += bytes.fromhex(sha256_hex)
        if self.bytes >= self.shard_bytes:
            self.rotate()

    def rotate(self) -> None:
        """Close the open shard, write its hash list, rename it into place, then notify."""
        if self.file is not None:
            self.file.close()
            name = self.name()
            with open(self.out / STATE_DIR / f"{name}.sha256", "wb") as f:
                f.write(self.hashes)
            os.replace(self.out / f".{name}.tmp", self.out / name)
            self.written.append(name)
            self.file, self.bytes, self.hashes = None, 0, bytearray()
            self.index += 1
        self.on_final()


class Manifest:
    """Appends manifest lines, holding back those whose documents are not yet in a final shard."""

    MAX_PENDING = 10_000  # past this, the driver closes the open shard early to bound memory

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")
        self.pending: list[str] = []

    def add(self, record: Record) -> None:
        self.pending.append(json.dumps(record.to_json(), ensure_ascii=False))

    def flush(self) -> None:
        if self.pending:
            self.file.write("\n".join(self.pending) + "\n")
            self.file.flush()
            self.pending = []

    def close(self) -> None:
        self.flush()
        self.file.close()


def resume_key(source: str, size: int | None, mtime_ns: int | None, reason: str = "") -> bytes:
    """16-byte digest identifying one version of one input (or one walk-level decision)."""
    return hashlib.blake2b(f"{source}\0{size}\0{mtime_ns}\0{reason}".encode("utf-8", "replace"), digest_size=16).digest()


@dataclass
class ResumeState:
    """What a previous run left in CORPUS_DIR."""

    done: set[bytes] = field(default_factory=set)
    next_index: int = 0
    documents: int = 0


def load_resume_state(out: Path, dedup: Deduplicator) -> ResumeState:
    """Read manifest.jsonl and the shards' hash lists; remove temp files of an interrupted run."""
    state = ResumeState()
    for tmp in out.glob(".part-*.tmp"):
        tmp.unlink()
    manifest = out / MANIFEST
    if manifest.exists():
        with open(manifest, encoding="utf-8") as f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash
                if rec.get("status") in ("ok", "skipped"):
                    if "size" in rec:
                        state.done.add(resume_key(rec["source"], rec["size"], rec["mtime_ns"]))
                    else:
                        state.done.add(resume_key(rec["source"], None, None, rec.get("reason", "")))
    for shard in sorted(out.glob("part-*.jsonl*")):
        number = shard.name.split(".")[0].removeprefix("part-")
        if number.isdigit():
            state.next_index = max(state.next_index, int(number) + 1)
        hashes = out / STATE_DIR / f"{shard.name}.sha256"
        if hashes.exists():
            data = hashes.read_bytes()
            digests = (data[i:i + 32].hex() for i in range(0, len(data), 32))
        else:  # shards from elsewhere: read their sha256 fields
            digests = (json.loads(line)["sha256"] for line in open_shard_for_reading(shard) if line.strip())
        for digest in digests:
            dedup.add_known(digest)
            state.documents += 1
    return state
