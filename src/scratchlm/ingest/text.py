"""Plain text, Markdown, reStructuredText and logs; plus `read_text`, the one byte decoder.

Driven by `scratchlm.ingest.driver`, which calls `extract(path, opts)` for `.txt`, `.md`, `.rst`,
`.log`, ... and for extension-less files that sniff as text. Every text-like extractor (code,
HTML, JSON, CSV) reads its file through `read_text`, so binary detection and the UTF-8 policy live
in one place:

- a NUL byte in the first 8 KiB, or more than 10% control bytes there, means binary: `Skip`;
- a UTF-8 / UTF-16 byte-order mark is honoured;
- otherwise the bytes are decoded as UTF-8 with U+FFFD replacement, and kept when at most 1% of
  the characters were undecodable (a stray Latin-1 byte in an otherwise UTF-8 file); above that
  the file is skipped as "not UTF-8", because decoding a foreign encoding as UTF-8 produces
  mojibake that only teaches the model noise.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

from scratchlm.ingest.document import Document, IngestOptions, Skip

SNIFF_BYTES = 8192
MAX_REPLACEMENT_FRACTION = 0.01

# Bytes that never occur in text: C0 controls other than \t \n \f \r and ESC (ANSI logs).
_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27))

TEXT_TYPES = {
    ".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".mdx": "markdown",
    ".rst": "rst", ".adoc": "text", ".asciidoc": "text", ".org": "text", ".log": "log",
}


def looks_binary(head: bytes) -> bool:
    """True when the first bytes of a file cannot be text (NUL bytes or many control bytes)."""
    if not head:
        return False
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False  # UTF-16 text is full of NULs
    if b"\x00" in head:
        return True
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    return controls > 0.1 * len(head)


def decode(data: bytes) -> tuple[str, int]:
    """Decode file bytes to text; returns (text, number of U+FFFD replacements). Raises Skip."""
    if looks_binary(data[:SNIFF_BYTES]):
        raise Skip("binary content")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16", errors="replace")
        return text, text.count("\ufffd")
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad > MAX_REPLACEMENT_FRACTION * max(len(text), 1):
        raise Skip(f"not UTF-8 ({bad / max(len(text), 1):.0%} undecodable)")
    return text, bad


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR become LF; nothing else about whitespace changes."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: Path, opts: IngestOptions) -> str:
    """Read a file as text under the size cap and the UTF-8 policy above. Raises Skip."""
    with open(path, "rb") as f:
        data = f.read(opts.max_file_bytes + 1)
    if len(data) > opts.max_file_bytes:
        raise Skip(f"larger than max_file_bytes ({opts.max_file_bytes})")
    if not data:
        raise Skip("empty file")
    text, _ = decode(data)
    return normalize_newlines(text)


def extract(path: Path, opts: IngestOptions) -> Iterator[Document]:
    """One document per text file; the type comes from the extension (text by default)."""
    text = read_text(path, opts)
    kind = TEXT_TYPES.get(path.suffix.lower(), "text")
    yield Document(text=text, type=kind, source=str(path), extractor="plain")
