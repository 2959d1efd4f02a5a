"""Office-document extractors: DOCX (python-docx) and EPUB (zipfile + selectolax).

Driven by the ingest driver (`scratchlm ingest`), which calls `extract_docx(path, opts)` for
`.docx` and `extract_epub(path, opts)` for `.epub` files. Each yields one Document per file.

- DOCX: body paragraphs and tables in document order; paragraphs separated by a blank line,
  table rows one per line with cells joined by " | " (merged cells once). Headers, footers and
  comments are left out: they repeat on every page or are not the document's text.
- EPUB: a zip of XHTML chapters. The reading order is the OPF package's `<spine>` (found via
  `META-INF/container.xml`); each chapter's markup, scripts and styles are stripped, block
  elements become paragraphs. DRM-encrypted books are skipped with a reason.
"""

from __future__ import annotations

import posixpath
import re
import zipfile
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote
from xml.etree import ElementTree

from scratchlm.ingest.document import Document, IngestOptions, Skip
from scratchlm.ingest.web import NON_TEXT_TAGS, html_to_text

PIP_DOCX = "pip install python-docx  (or: pip install 'scratchlm[ingest]')"
XHTML_TYPES = ("application/xhtml+xml", "text/html")
_SELF_CLOSING = re.compile(
    r"<(?!(?:area|base|br|col|embed|hr|img|input|link|meta|source|track|wbr)\b)"
    r"([A-Za-z][\w:.-]*)([^<>]*?)/>")


# --- DOCX ---------------------------------------------------------------------------------

def extract_docx(path: Path, opts: IngestOptions) -> Iterator[Document]:
    """Yield one Document (type "docx") with the body's paragraphs and tables in order.

    Raises:
        ValueError: not a DOCX package (corrupt, a legacy .doc, or password-protected, which
            Word stores as an OLE file rather than a zip).
        Skip: the document has no text.
    """
    try:
        import docx
        from docx.opc.exceptions import PackageNotFoundError
        from docx.table import Table
    except ImportError as e:
        raise ImportError(f"DOCX ingestion needs python-docx: {PIP_DOCX}") from e
    try:
        document = docx.Document(str(path))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError("not a readable DOCX (corrupt, legacy .doc, or password-protected): "
                         f"{e}") from e
    blocks: list[str] = []
    for item in document.iter_inner_content():
        text = _table_text(item) if isinstance(item, Table) else item.text.strip()
        if text:
            blocks.append(text)
    if not blocks:
        raise Skip("DOCX has no text")
    meta: dict = {}
    title = (document.core_properties.title or "").strip()
    if title:
        meta["title"] = title
    yield Document(text="\n\n".join(blocks), type="docx", source=str(path),
                   extractor="python-docx", meta=meta)


def _table_text(table) -> str:
    rows = []
    for row in table.rows:
        cells: list[str] = []
        seen: set[int] = set()
        for cell in row.cells:
            # python-docx returns a merged cell once per grid column it spans.
            if id(cell._tc) in seen:
                continue
            seen.add(id(cell._tc))
            cells.append(" ".join(cell.text.split()))
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)


# --- EPUB ---------------------------------------------------------------------------------

def extract_epub(path: Path, opts: IngestOptions) -> Iterator[Document]:
    """Yield one Document (type "epub"): the spine's chapters in reading order.

    Raises:
        ValueError: not a zip, or no readable OPF package.
        Skip: DRM-encrypted chapters, or no text.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"not a readable EPUB (zip): {e}") from e
    with zf:
        opf_path = _opf_path(zf)
        opf = _parse_xml(zf, opf_path, opts.max_file_bytes)
        base = posixpath.dirname(opf_path)
        manifest = {}
        for item in _children(opf, "manifest", "item"):
            href = posixpath.normpath(posixpath.join(base, unquote(item.get("href", ""))))
            manifest[item.get("id")] = (href, item.get("media-type", ""))
        spine = [manifest[ref.get("idref")] for ref in _children(opf, "spine", "itemref")
                 if ref.get("idref") in manifest]
        chapters = [href for href, media in spine if media in XHTML_TYPES]
        _refuse_drm(zf, chapters)
        budget = opts.max_file_bytes  # a zip bomb cannot inflate past the per-file cap
        texts = []
        for href in chapters:
            try:
                info = zf.getinfo(href)
            except KeyError:
                continue  # a spine entry the zip lacks: common in hand-made books, not fatal
            budget -= info.file_size
            if budget < 0:
                raise ValueError(f"EPUB inflates to more than {opts.max_file_bytes} bytes")
            text = html_text(zf.read(info))
            if text:
                texts.append(text)
    if not texts:
        raise Skip("EPUB has no text")
    meta: dict = {"chapters": len(texts)}
    titles = (el.text.strip() for el in opf.iter() if _local(el.tag) == "title" and el.text)
    title = next(titles, "")
    if title:
        meta["title"] = title
    yield Document(text="\n\n".join(texts), type="epub", source=str(path),
                   extractor="selectolax", meta=meta)


def html_text(markup: bytes | str) -> str:
    """Visible text of an XHTML chapter, through the same routine as web pages."""
    if isinstance(markup, bytes):
        markup = markup.decode("utf-8", "replace")
    # XHTML allows <title/> and <div/>; an HTML parser reads them as open tags (a <title/> in
    # <head> swallows the whole body), so spell non-void self-closing tags out in full.
    markup = _SELF_CLOSING.sub(r"<\1\2></\1>", markup)
    return html_to_text(markup, drop=NON_TEXT_TAGS, main_only=False)[1]


def _opf_path(zf: zipfile.ZipFile) -> str:
    try:
        container = ElementTree.fromstring(zf.read("META-INF/container.xml"))
    except KeyError:
        # Not required by every reader; fall back to the only .opf in the zip.
        opfs = [n for n in zf.namelist() if n.endswith(".opf")]
        if len(opfs) == 1:
            return opfs[0]
        raise ValueError("EPUB has no META-INF/container.xml") from None
    except ElementTree.ParseError as e:
        raise ValueError(f"EPUB container.xml is not XML: {e}") from e
    for el in container.iter():
        if _local(el.tag) == "rootfile" and el.get("full-path"):
            return el.get("full-path")
    raise ValueError("EPUB container.xml names no rootfile")


def _parse_xml(zf: zipfile.ZipFile, name: str, limit: int) -> ElementTree.Element:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise ValueError(f"EPUB package file {name!r} is missing") from None
    if info.file_size > limit:
        raise ValueError(f"EPUB package file {name!r} is larger than {limit} bytes")
    try:
        # expat (>= 2.4.1, Python >= 3.10's) refuses entity-expansion bombs; no external entities.
        return ElementTree.fromstring(zf.read(info))
    except ElementTree.ParseError as e:
        raise ValueError(f"EPUB package file {name!r} is not XML: {e}") from e


def _refuse_drm(zf: zipfile.ZipFile, chapters: list[str]) -> None:
    """Skip books whose chapters are encrypted (font obfuscation alone is harmless)."""
    try:
        enc = ElementTree.fromstring(zf.read("META-INF/encryption.xml"))
    except (KeyError, ElementTree.ParseError):
        return
    encrypted = {unquote(el.get("URI", "")) for el in enc.iter()
                 if _local(el.tag) == "CipherReference"}
    if encrypted & set(chapters):
        raise Skip("EPUB chapters are DRM-encrypted")


def _children(root: ElementTree.Element, parent: str, child: str) -> list[ElementTree.Element]:
    out = []
    for el in root.iter():
        if _local(el.tag) == parent:
            out.extend(c for c in el if _local(c.tag) == child)
    return out


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
