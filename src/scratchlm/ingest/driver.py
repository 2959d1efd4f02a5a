"""The ingest driver: dispatch, worker processes, ordered writing of shards and manifest, resume.

Driven by `scratchlm.ingest.ingest` (`scratchlm ingest SOURCE... --out CORPUS_DIR`). The flow:

    walk (main process, lazy)  ->  batches of Items  ->  workers: extract + clean + hash
        ->  main process, in walk order: dedup, write shard lines, manifest lines, progress

- Dispatch (`extractor_for`) is by file name and extension, then by content: magic bytes
  (`%PDF`, PNG, JPEG, ...), a `#!` line, `<html`; unknown text is plain text.
- Workers are processes (`--workers N`); with one worker everything runs inline. At most
  `3 * workers` batches are in flight, and results are consumed in submission order, so the
  corpus is byte-identical whatever `--workers` is, and memory stays bounded.
- A worker's result larger than `SPOOL_BYTES` (a big archive or database) goes through a spool
  file in `CORPUS_DIR/.ingest/spool/` instead of memory.
- Output (`shards.py`): shards are renamed into place only when complete, and an input's
  manifest line is appended only after its documents are in a final shard, so an interrupted
  run never leaves a manifest that claims work which is not in the corpus.
- Resume: an input whose (source, size, mtime) has an `ok` or `skipped` manifest line is not
  redone; failed inputs are retried. The exact-dedup set is reloaded from `.ingest/*.sha256`
  so a resumed run does not re-add duplicates.
"""

from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.ingest import archive, code, database, structured, text, web
from scratchlm.ingest.clean import CleanStats, Deduplicator, clean_document, minhash_signature, sha256_text
from scratchlm.ingest.document import Document, IngestOptions, Skip
from scratchlm.ingest.shards import MANIFEST, STATE_DIR, Manifest, ShardWriter, load_resume_state, resume_key
from scratchlm.ingest.walk import Item, Record, display, walk

Extractor = Callable[[Path, IngestOptions], Iterable[Document]]

SPOOL_BYTES = 32 * 1024 * 1024
BATCH_FILES = 64
BATCH_BYTES = 8 * 1024 * 1024

PDF_EXT = {".pdf"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
HTML_EXT = {".html", ".htm", ".xhtml", ".shtml"}
JSON_EXT = {".json", ".jsonl", ".ndjson"}
CSV_EXT = {".csv", ".tsv"}
BINARY_EXT = frozenset(
    ".pyc .pyo .o .obj .a .lib .so .dylib .dll .exe .class .jar .war .whl .egg .deb .rpm .msi .dmg"
    " .iso .img .bin .dat .db .sqlite .sqlite3 .mdb .pkl .pickle .npy .npz .pt .pth .ckpt .safetensors"
    " .onnx .h5 .hdf5 .parquet .arrow .feather .mp3 .mp4 .m4a .wav .flac .ogg .avi .mov .mkv .webm"
    " .ttf .otf .woff .woff2 .eot .ico .icns .psd .ai .xcf .7z .rar .bz2 .xz .zst .lz4 .br .swf .doc"
    " .xls .ppt .xlsx .pptx .odt .ods .odp .svg .svgz .map .ipynb .gguf .tflite .pb .ps .eps .dvi".split()
)
# Binary formats with a better route than being skipped: the skip reason says which.
_SKIP_HINTS = {
    ".db": "if it is SQLite, ingest it as sqlite:///PATH with --table and --column",
    ".sqlite": "ingest it as sqlite:///PATH with --table and --column",
    ".sqlite3": "ingest it as sqlite:///PATH with --table and --column",
    ".ipynb": "export notebooks first, e.g. `jupyter nbconvert --to markdown`",
    ".doc": "convert legacy .doc files to .docx",
}
_MAGIC: list[tuple[bytes, str]] = [
    (b"%PDF", "pdf"), (b"\x89PNG", "image"), (b"\xff\xd8\xff", "image"), (b"GIF8", "image"),
    (b"BM", "image"), (b"II*\x00", "image"), (b"MM\x00*", "image"),
]  # fmt: skip


# --- dispatch -------------------------------------------------------------------------------
# The PDF/OCR/office extractors belong to another module set and pull in heavy libraries, so
# they are imported only when a file of theirs is met; a missing one fails that input only.
def _pdf(path: Path, opts: IngestOptions) -> Iterable[Document]:
    from scratchlm.ingest import pdf

    return pdf.extract(path, opts)


def _image(path: Path, opts: IngestOptions) -> Iterable[Document]:
    if not opts.ocr:
        raise Skip("image, and OCR is off (--no-ocr)")
    from scratchlm.ingest import ocr

    return ocr.extract(path, opts)


def _docx(path: Path, opts: IngestOptions) -> Iterable[Document]:
    from scratchlm.ingest import office

    return office.extract_docx(path, opts)


def _epub(path: Path, opts: IngestOptions) -> Iterable[Document]:
    from scratchlm.ingest import office

    return office.extract_epub(path, opts)


def extractor_for(path: Path, head: bytes) -> Extractor:
    """The extractor for a file from its name, then its first bytes. Raises Skip."""
    ext = path.suffix.lower()
    if ext in PDF_EXT:
        return _pdf
    if ext in IMAGE_EXT:
        return _image
    if ext == ".docx":
        return _docx
    if ext == ".epub":
        return _epub
    if ext in BINARY_EXT:
        hint = _SKIP_HINTS.get(ext)
        raise Skip(f"unsupported binary format ({ext})" + (f": {hint}" if hint else ""))
    if ext in HTML_EXT:
        return web.extract
    if ext in JSON_EXT:
        return structured.extract_json
    if ext in CSV_EXT:
        return structured.extract_csv
    if ext in text.TEXT_TYPES:
        return text.extract
    if code.language_for(path):
        return code.extract
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return _pdf if kind == "pdf" else _image
    if code.shebang_language(head):
        return code.extract
    if text.looks_binary(head):
        raise Skip("binary content")
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return web.extract
    return text.extract


# --- worker side ----------------------------------------------------------------------------
@dataclass
class DocLine:
    """A cleaned document ready for the main process: hash, near-dup signature, JSON line."""

    sha256: str
    signature: bytes | None
    type: str
    chars: int
    line: str


@dataclass
class ItemResult:
    """What a worker returns for one input: its manifest record and its documents."""

    record: Record
    docs: list[DocLine] = field(default_factory=list)
    spool: str | None = None  # when set, the documents are in this file instead of `docs`
    secrets: int = 0


class _Sink:
    """Collects DocLines in memory, moving to a spool file past SPOOL_BYTES (bounded memory)."""

    def __init__(self, spool_dir: str) -> None:
        self.spool_dir = spool_dir
        self.docs: list[DocLine] = []
        self.size = 0
        self.file: io.TextIOWrapper | None = None
        self.path: str | None = None

    def add(self, d: DocLine) -> None:
        if self.file is None:
            self.docs.append(d)
            self.size += len(d.line)
            if self.size > SPOOL_BYTES:
                os.makedirs(self.spool_dir, exist_ok=True)
                fd, self.path = tempfile.mkstemp(dir=self.spool_dir, suffix=".spool")
                self.file = open(fd, "w", encoding="utf-8")
                for old in self.docs:
                    self._write(old)
                self.docs = []
        else:
            self._write(d)

    def _write(self, d: DocLine) -> None:
        sig = d.signature.hex() if d.signature is not None else "-"
        assert self.file is not None
        self.file.write(f"{d.sha256}\t{sig}\t{d.type}\t{d.chars}\t{d.line}\n")

    def finish(self, result: ItemResult) -> ItemResult:
        if self.file is not None:
            self.file.close()
            result.spool = self.path
        else:
            result.docs = self.docs
        return result

    def discard(self) -> None:
        self.docs = []
        if self.file is not None:
            self.file.close()
            os.unlink(self.path)  # type: ignore[arg-type]
            self.file = None


def _iter_docs(result: ItemResult) -> Iterator[DocLine]:
    """The documents of a result, from memory or from its spool file (deleted afterwards)."""
    if result.spool is None:
        yield from result.docs
        return
    try:
        with open(result.spool, encoding="utf-8") as f:
            for raw in f:
                sha, sig, kind, chars, line = raw.rstrip("\n").split("\t", 4)
                yield DocLine(sha, None if sig == "-" else bytes.fromhex(sig), kind, int(chars), line)
    finally:
        os.unlink(result.spool)


def _doc_line(doc: Document, license: str | None, near: bool) -> DocLine:
    """Serialise one cleaned document; the id is a stable hash of its source."""
    doc.source = display(doc.source)
    digest = sha256_text(doc.text)
    obj: dict[str, object] = {
        "id": hashlib.sha256(doc.source.encode("utf-8", errors="replace")).hexdigest()[:24],
        "sha256": digest, "text": doc.text, "source": doc.source, "type": doc.type,
        "extractor": doc.extractor,
    }  # fmt: skip
    if doc.language:
        obj["language"] = doc.language
    if doc.license or license:
        obj["license"] = doc.license or license
    if doc.meta:
        obj["meta"] = doc.meta
    line = json.dumps(obj, ensure_ascii=False)
    return DocLine(digest, minhash_signature(doc.text) if near else None, doc.type, len(doc.text), line)


def _extract_into(sink: _Sink, docs: Iterable[Document], opts: IngestOptions, stats: CleanStats,
                  license: str | None, rename: tuple[str, str] | None) -> int:
    """Clean and serialise an extractor's documents into the sink; returns how many were kept."""
    kept = 0
    for doc in docs:
        if rename is not None and doc.source.startswith(rename[0]):
            doc.source = rename[1] + doc.source[len(rename[0]):]
        cleaned = clean_document(doc, opts, stats)
        if cleaned is not None:
            sink.add(_doc_line(cleaned, license, opts.dedup == "near"))
            kept += 1
    return kept


def _file_docs(path: Path, opts: IngestOptions) -> Iterable[Document]:
    with open(path, "rb") as f:
        head = f.read(text.SNIFF_BYTES)
    return extractor_for(path, head)(path, opts)


def _outcome(record: Record, stats: CleanStats, kept: int) -> None:
    """Status and reason of an input whose extractor finished."""
    if kept:
        record.status = "ok"
        if stats.dropped:
            record.reason = f"{stats.dropped} documents dropped (first: {stats.first_drop_reason})"
    else:
        record.status = "skipped"
        record.reason = stats.first_drop_reason or "no text extracted"


def _failure(e: BaseException) -> tuple[str, str]:
    if isinstance(e, Skip):
        return "skipped", str(e)
    if isinstance(e, FileNotFoundError):
        return "failed", "vanished before it was read"
    if isinstance(e, PermissionError):
        return "failed", "permission denied"
    if isinstance(e, ImportError):
        missing = getattr(e, "name", None) or str(e)
        return "failed", f"extractor unavailable ({missing} is not installed): pip install 'scratchlm[ingest]'"
    message = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return "failed", f"{type(e).__name__}: {message}" if message else type(e).__name__


def process_item(item: Item | Record, opts: IngestOptions, spool_dir: str) -> list[ItemResult]:
    """Run one input in a worker. Never raises for bad input: failures become records."""
    if isinstance(item, Record):
        return [ItemResult(item)]
    if item.kind == "archive":
        return _process_archive(item, opts, spool_dir)
    t0 = time.perf_counter()
    record = Record(item.source, "ok", size=item.size, mtime_ns=item.mtime_ns, bytes_in=item.size or 0)
    stats, sink = CleanStats(), _Sink(spool_dir)
    try:
        if item.kind == "database":
            docs: Iterable[Document] = database.extract(item.path, opts)
            rename = None
        else:
            docs = _file_docs(Path(item.path), opts)
            rename = (item.path, item.source) if item.path != item.source else None
        kept = _extract_into(sink, docs, opts, stats, item.license, rename)
        _outcome(record, stats, kept)
    except Exception as e:  # any extractor error is this input's failure, never the run's
        sink.discard()
        record.status, record.reason = _failure(e)
    record.seconds = time.perf_counter() - t0
    return [sink.finish(ItemResult(record, secrets=stats.secrets))]


def _process_archive(item: Item, opts: IngestOptions, spool_dir: str) -> list[ItemResult]:
    """Members become inputs named `archive!member`; the archive itself gets the last record."""
    t0 = time.perf_counter()
    top = Record(item.source, "ok", size=item.size, mtime_ns=item.mtime_ns, bytes_in=item.size or 0)
    results: list[ItemResult] = []
    sink = _Sink(spool_dir)  # one sink for the archive: members' documents stay in order
    counts: Counter[str] = Counter()
    secrets = 0
    try:
        with tempfile.TemporaryDirectory(prefix="scratchlm-member-") as tmp:
            for member in archive.members(Path(item.path), opts):
                source = f"{item.source}!{member.name}"
                rec = Record(source, "ok", bytes_in=max(member.size, 0), walk_level=True, member=True)
                m0 = time.perf_counter()
                if member.skip_reason or member.open is None:
                    rec.status, rec.reason = "skipped", member.skip_reason or "not readable"
                else:
                    stats = CleanStats()
                    base = Path(member.name).name  # a bare name: nothing is written outside tmp
                    tmp_path = Path(tmp) / (base if base not in ("", ".", "..") else "member")
                    try:
                        with member.open() as src, open(tmp_path, "wb") as dst:  # type: ignore[operator]
                            n = archive.copy_capped(src, dst, opts.max_file_bytes)
                        rec.bytes_in = n
                        if n > opts.max_file_bytes:
                            raise Skip(f"larger than max_file_bytes ({opts.max_file_bytes})")
                        if n == 0:
                            raise Skip("empty file")
                        rec.documents = _extract_into(sink, _file_docs(tmp_path, opts), opts, stats,
                                                      item.license, (str(tmp_path), source))
                        _outcome(rec, stats, rec.documents)
                        top.documents += rec.documents
                        secrets += stats.secrets
                    except Exception as e:  # one bad member never stops the archive
                        rec.status, rec.reason = _failure(e)
                rec.seconds = time.perf_counter() - m0
                counts[rec.status] += 1
                results.append(ItemResult(rec))
    except Exception as e:  # corrupt, truncated or unreadable archive
        status, reason = _failure(e)
        top.status, top.reason = status, f"corrupt or unreadable archive: {reason}" if status == "failed" else reason
    else:
        top.reason = "archive: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if counts else "archive: no files"
        if not top.documents:
            top.status = "skipped"
    top.seconds = time.perf_counter() - t0
    # the archive's documents travel with its own record; member records carry counts only
    results.append(sink.finish(ItemResult(top, secrets=secrets)))
    return results


def run_batch(batch: list[Item | Record], opts: IngestOptions, spool_dir: str) -> list[ItemResult]:
    """A worker's unit of work: a few inputs, results in the same order."""
    out: list[ItemResult] = []
    for item in batch:
        out.extend(process_item(item, opts, spool_dir))
    return out


def _init_worker() -> None:
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # Tesseract is ~10x slower with threads here
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# --- main side: ordered execution -----------------------------------------------------------
def _batches(events: Iterable[Item | Record]) -> Iterator[list[Item | Record]]:
    """Group inputs so each worker call amortises its IPC; archives and databases go alone."""
    batch: list[Item | Record] = []
    size = 0
    for ev in events:
        heavy = isinstance(ev, Item) and ev.kind in ("archive", "database")
        if heavy and batch:
            yield batch
            batch, size = [], 0
        batch.append(ev)
        size += ev.size or 0
        if heavy or len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def run_ordered(events: Iterable[Item | Record], opts: IngestOptions, spool_dir: str) -> Iterator[ItemResult]:
    """Results in input order, from `opts.workers` processes with a bounded window in flight.

    A worker that dies (a segfault in a native library, the OOM killer) breaks the whole pool;
    the batches that were in flight are then re-run one input at a time so that only the input
    that kills its process is marked failed, and the run goes on with a fresh pool.
    """
    if opts.workers <= 1:
        for ev in events:
            yield from process_item(ev, opts, spool_dir)
        return
    pool = _pool(opts.workers)
    window: deque[tuple[list[Item | Record], cf.Future[list[ItemResult]]]] = deque()

    def drain_one() -> Iterator[ItemResult]:
        nonlocal pool
        batch, fut = window.popleft()
        try:
            yield from fut.result()
        except BrokenProcessPool:
            pending = [batch] + [b for b, _ in window]
            window.clear()
            pool.shutdown(wait=False, cancel_futures=True)
            for b in pending:
                yield from _isolated(b, opts, spool_dir)
            pool = _pool(opts.workers)

    try:
        for batch in _batches(events):
            window.append((batch, pool.submit(run_batch, batch, opts, spool_dir)))
            if len(window) >= 3 * opts.workers:
                yield from drain_one()
        while window:
            yield from drain_one()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    # forkserver: workers start from a clean interpreter, not a fork of a threaded parent
    ctx = multiprocessing.get_context("forkserver")
    return cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)


def _isolated(batch: list[Item | Record], opts: IngestOptions, spool_dir: str) -> Iterator[ItemResult]:
    """Run each input of a batch in its own single-worker pool; a crash fails that input only."""
    for item in batch:
        with _pool(1) as pool:
            try:
                yield from pool.submit(process_item, item, opts, spool_dir).result()
            except BrokenProcessPool:
                assert isinstance(item, Item)  # records never crash
                yield ItemResult(Record(item.source, "failed", "worker process died (native crash or out of memory)",
                                        bytes_in=item.size or 0, size=item.size, mtime_ns=item.mtime_ns))


# --- the run --------------------------------------------------------------------------------
@dataclass
class Summary:
    """Counts for `--json` and the exit code (non-zero only when `documents` is 0)."""

    out_dir: str
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    resumed: int = 0
    documents: int = 0  # in the corpus after this run, previous runs included
    documents_written: int = 0  # by this run
    types: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    chars_out: int = 0
    duplicates_removed: int = 0
    secrets_scrubbed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, record: Record) -> None:
        setattr(self, record.status, getattr(self, record.status) + 1)
        if not record.member:
            self.bytes_in += record.bytes_in
        if record.status != "ok":
            key = f"{record.status}: {record.reason.split(' (')[0].split(':')[0]}"
            if len(self.reasons) < 200 or key in self.reasons:  # bounded, whatever the reasons
                self.reasons[key] += 1

    def to_json(self) -> dict:
        return {
            "out_dir": self.out_dir, "documents": self.documents,
            "documents_written": self.documents_written, "ok": self.ok, "skipped": self.skipped,
            "failed": self.failed, "resumed": self.resumed, "types": dict(sorted(self.types.items())),
            "bytes_in": self.bytes_in, "chars_out": self.chars_out,
            "duplicates_removed": self.duplicates_removed, "secrets_scrubbed": self.secrets_scrubbed,
            "reasons": dict(self.reasons.most_common(15)), "shards": self.shards,
            "seconds": round(self.seconds, 3),
        }  # fmt: skip


def _progress(enabled: bool):
    from tqdm import tqdm

    return tqdm(unit=" inputs", desc="ingest", disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True)


def run(sources: list[str], out: Path, opts: IngestOptions) -> Summary:
    """Ingest `sources` into `out`; see the module docstring. Returns the summary."""
    t0 = time.perf_counter()
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    spool_dir = str(out / STATE_DIR / "spool")
    summary = Summary(out_dir=str(out))
    dedup = Deduplicator(opts.dedup)
    state = load_resume_state(out, dedup)
    summary.documents = state.documents
    manifest = Manifest(out / MANIFEST)
    writer = ShardWriter(out, opts.compression, opts.shard_bytes, state.next_index, manifest.flush)

    def fresh(events: Iterable[Item | Record]) -> Iterator[Item | Record]:
        """Drop inputs a previous run finished (same source, size, mtime)."""
        for ev in events:
            if isinstance(ev, Record) and ev.walk_level:
                key = resume_key(ev.source, None, None, ev.reason)
            else:
                key = resume_key(ev.source, ev.size, ev.mtime_ns)
            if key in state.done and (ev.size is not None or isinstance(ev, Record)):
                if isinstance(ev, Item) or not ev.walk_level:
                    summary.resumed += 1
                continue
            yield ev

    bar = _progress(opts.progress)
    last = 0.0
    try:
        for result in run_ordered(fresh(walk(sources, opts, set(), out)), opts, spool_dir):
            rec = result.record
            kept = dups = chars = 0
            for d in _iter_docs(result):
                if dedup.is_duplicate(d.sha256, d.signature):
                    dups += 1
                    continue
                writer.write(d.line, d.sha256)
                summary.types[d.type] += 1
                kept += 1
                chars += d.chars
            if result.docs or result.spool or rec.status == "ok" and not rec.walk_level:
                rec.documents, rec.chars_out = kept, chars
                if dups and not kept and rec.status == "ok":
                    rec.status, rec.reason = "skipped", "duplicate of an earlier document"
                elif dups:
                    rec.reason = "; ".join(filter(None, [rec.reason, f"{dups} duplicate documents removed"]))
            summary.duplicates_removed += dups
            summary.documents_written += kept
            summary.chars_out += chars
            summary.secrets_scrubbed += result.secrets
            summary.count(rec)
            manifest.add(rec)
            if writer.file is None:  # no open shard: nothing of this record is unwritten
                manifest.flush()
            elif len(manifest.pending) >= Manifest.MAX_PENDING:
                writer.rotate()
            bar.update(1)
            now = time.perf_counter()
            if now - last > 0.5:
                bar.set_postfix_str(f"{summary.bytes_in / 1e6 / max(now - t0, 1e-9):.1f} MB/s, {summary.documents_written} docs")
                last = now
    finally:
        bar.close()
        writer.rotate()  # finalises the open shard, then flushes the manifest
        manifest.close()
        shutil.rmtree(spool_dir, ignore_errors=True)
    summary.documents += summary.documents_written
    summary.shards = writer.written
    summary.seconds = time.perf_counter() - t0
    return summary
