"""What every ingest extractor produces and receives: `Document`, `Skip` and `IngestOptions`.

An extractor is a function `extract(path: Path, opts: IngestOptions) -> Iterator[Document]`.
It raises `Skip(reason)` for an input that is deliberately not used (a binary file, a lock
file, a PDF page with no text while OCR is off, ...); any other exception marks the input
`failed` in the manifest with the exception's message. One bad input never stops a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    """One training document before cleaning; the driver adds `id` and `sha256`."""

    text: str
    type: str  # text, markdown, code, html, pdf, image, docx, epub, json, csv, database, ...
    source: str  # path or URI, plus "#page=N" / "#row=N" where it applies
    extractor: str  # e.g. "pypdfium2", "tesseract", "rapidocr", "selectolax", "plain"
    language: str | None = None  # for code
    license: str | None = None  # SPDX-like id when known (git repositories)
    meta: dict = field(default_factory=dict)


class Skip(Exception):
    """The input is deliberately not used; the message is the manifest's reason."""


@dataclass
class IngestOptions:
    """Options shared by the driver and every extractor (from `scratchlm ingest` flags)."""

    workers: int = 1
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    ocr: bool = True
    ocr_engine: str = "auto"  # auto | rapidocr | tesseract
    min_chars: int = 1
    dedup: str = "exact"  # exact | near | none
    licenses: list[str] = field(default_factory=list)  # empty: keep all
    text_field: str | None = None  # JSON dotted path
    text_column: str | None = None  # CSV/TSV column
    max_file_bytes: int = 64 * 1024 * 1024
    scrub_secrets: bool = True
    quality_filter: bool = True  # prose heuristics in clean.py; code is never filtered
    compression: str = "none"  # none | gz | zst: shards part-NNNNN.jsonl[.gz|.zst]
    shard_bytes: int = 128 * 1024 * 1024  # uncompressed bytes per shard before rotating
    git_cache: str | None = None  # where URLs are cloned; default ~/.cache/scratchlm/git
    progress: bool = True  # tqdm bar on stderr (hidden when stderr is not a terminal)
    # database sources
    table: str | None = None
    column: str | None = None
    where_column: str | None = None
    where_value: str | None = None
    query: str | None = None
