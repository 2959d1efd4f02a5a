"""PDF extractor: the text layer via pypdfium2, OCR for pages that have none.

Driven by the ingest driver (`scratchlm ingest`), which calls `extract(path, opts)` for `.pdf`
files in worker processes (PDFium is not thread-safe; every document is closed before return).

One Document per PDF (type "pdf"):
- `text`: the pages in order, separated by a form feed `\\f` (the `pdftotext` convention), so
  `text.split("\\f")[i]` is page i+1;
- `source`: `PATH#pages=1-N`;
- `meta`: `pages`, `page_starts` (character offset of each page in `text`), and where they apply
  `ocr_pages` + `ocr_engine`, `no_text_pages` (needed OCR while OCR was off), `failed_pages`,
  `title`.

Per page: the text layer comes first (fast, exact: 600-1,200 pages/s per core on the manuals in
/usr/share/doc). A page whose layer is (nearly) empty but which draws something, or whose
layer is mostly unmapped glyphs, is a scan: it is rendered at 300 dpi and OCR'd with
`scratchlm.ingest.ocr.ocr_image`, unless `opts.ocr` is False. Text comes in PDFium's order,
which follows the content stream; that is the reading order for the PDFs that LaTeX, Word,
LibreOffice and browsers write (a layout model, as docling has, would fix the rest at ~1 s/page).
Password-protected PDFs are skipped with a reason; corrupt ones fail with PDFium's reason.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Iterator

from scratchlm.ingest.document import Document, IngestOptions, Skip
from scratchlm.ingest.ocr import MAX_SIDE, ocr_image, resolve_engine

PAGE_BREAK = "\f"
MIN_PAGE_CHARS = 8  # fewer visible characters than this on a page that draws something: a scan
GARBLED_RATIO = 0.5  # more unmapped glyphs (U+FFFD, private use) than this: the layer is junk
OCR_DPI = 300  # what Tesseract is trained for; RapidOCR rescales anyway
PIP_PYPDFIUM2 = "pip install pypdfium2  (or: pip install 'scratchlm[ingest]')"

# PDFium marks a hyphen it judged to be a line-end word break as U+FFFE and has already joined
# the halves ("DIS\ufffeCLAIMED"): dropping it restores the word. Other C0 controls are glyphs of
# math fonts with no Unicode mapping (TeX's cmsy): noise for a language model.
_JUNK = re.compile(r"[\ufffe\x00-\x08\x0b-\x1f\x7f]")
_SPACE = re.compile(r"\s+")
# Glyphs PDFium could not map to Unicode: U+FFFD and the private-use areas.
_UNMAPPED = re.compile("[\ufffd\ue000-\uf8ff\U000f0000-\U0010ffff]")


def extract(path: Path, opts: IngestOptions) -> Iterator[Document]:
    """Yield one Document for the PDF at `path` (see the module docstring for its layout).

    Raises:
        Skip: password-protected, no pages, no text, or only scanned pages while OCR is off.
        ValueError: the file is not a readable PDF (PDFium's reason in the message).
    """
    pdfium = _pdfium()
    try:
        doc = pdfium.PdfDocument(path)
    except pdfium.PdfiumError as e:
        code = getattr(e, "err_code", None)
        if code == pdfium.raw.FPDF_ERR_PASSWORD:
            raise Skip("encrypted PDF: needs a password (decrypt it first, e.g. "
                       "`qpdf --decrypt --password=PW in.pdf out.pdf`)") from e
        if code == pdfium.raw.FPDF_ERR_SECURITY:
            raise Skip("encrypted PDF: unsupported security handler") from e
        raise ValueError(f"corrupt or unreadable PDF: {e}") from e
    with doc:  # closed before the Document leaves this process's hands
        document = _extract_doc(doc, path, opts, pdfium)
    yield document


def _extract_doc(doc, path: Path, opts: IngestOptions, pdfium) -> Document:
    n = len(doc)
    if n == 0:
        raise Skip("PDF has no pages")
    pages: list[str] = []
    ocr_pages: list[int] = []
    no_text_pages: list[int] = []
    failed_pages: list[dict] = []
    engine: str | None = None
    for number in range(1, n + 1):
        text = ""
        try:
            page = doc[number - 1]
        except pdfium.PdfiumError as e:  # one broken page object must not lose the whole file
            failed_pages.append({"page": number, "reason": str(e)})
            pages.append(text)
            continue
        try:
            text = page_text(page)
            if _needs_ocr(page, text, pdfium):
                if not opts.ocr:
                    no_text_pages.append(number)
                    text = ""
                else:
                    # Configuration errors (engine missing) raise here and fail the file.
                    engine = engine or resolve_engine(opts.ocr_engine)
                    try:
                        # _JUNK also drops any form feed: "\f" must only ever mean a page break.
                        text = _JUNK.sub("", ocr_image(render_page(page), engine))
                        ocr_pages.append(number)
                    except RuntimeError as e:  # the engine failed on this page only
                        failed_pages.append({"page": number, "reason": str(e)})
                        text = ""
        except pdfium.PdfiumError as e:  # PdfiumError is a RuntimeError: text or render failed
            failed_pages.append({"page": number, "reason": str(e)})
            text = ""
        finally:
            page.close()
        pages.append(text)

    if not any(p.strip() for p in pages):
        if no_text_pages:
            raise Skip("scanned PDF (no text layer) and OCR is off (--no-ocr)")
        if failed_pages:
            raise ValueError(f"no page could be read: page {failed_pages[0]['page']}: "
                             f"{failed_pages[0]['reason']}")
        raise Skip("PDF has no text")

    starts, pos = [], 0
    for p in pages:
        starts.append(pos)
        pos += len(p) + len(PAGE_BREAK)
    meta: dict = {"pages": n, "page_starts": starts}
    if ocr_pages:
        meta.update(ocr_pages=ocr_pages, ocr_engine=engine)
    if no_text_pages:
        meta["no_text_pages"] = no_text_pages
    if failed_pages:
        meta["failed_pages"] = failed_pages
    title = (doc.get_metadata_value("Title") or "").strip()
    if title:
        meta["title"] = title
    return Document(
        text=PAGE_BREAK.join(pages),
        type="pdf",
        source=f"{path}#pages=1-{n}",
        extractor=f"pypdfium2+{engine}" if ocr_pages else "pypdfium2",
        meta=meta,
    )


def page_text(page) -> str:
    """The text layer of a pypdfium2 page: newlines normalised, hyphenation markers and
    unmapped control glyphs removed."""
    textpage = page.get_textpage()
    try:
        raw = textpage.get_text_range()
    finally:
        textpage.close()
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    return _JUNK.sub("", text).strip()


def _needs_ocr(page, text: str, pdfium) -> bool:
    # Regexes rather than a per-character loop: this runs on every page, and a Python loop
    # over the characters cost as much as PDFium's own extraction.
    visible = len(_SPACE.sub("", text))
    if visible < MIN_PAGE_CHARS:
        # A page that draws nothing is blank, not scanned: no need to render it.
        return pdfium.raw.FPDFPage_CountObjects(page.raw) > 0
    return len(_UNMAPPED.findall(text)) / visible > GARBLED_RATIO


def render_page(page, dpi: int = OCR_DPI):
    """Render a pypdfium2 page to a grayscale PIL image at `dpi`, longest side <= MAX_SIDE px."""
    width, height = page.get_size()  # points: 1/72 inch
    scale = min(dpi / 72, MAX_SIDE / max(width, height, 1))
    bitmap = page.render(scale=scale, grayscale=True)
    try:
        return bitmap.to_pil().copy()  # copy: the bitmap's buffer is freed on close
    finally:
        bitmap.close()


def make_text_pdf(path: Path, pages: list[str], font_size: float = 11.0) -> None:
    """Write a PDF with a real text layer: one page per string, one line per text line.

    Uses PDFium's page-object API with the standard Helvetica font (Latin-1 text only). A
    fixture for the tests, `benchmarks/bench_ocr_pdf.py` and the docs' examples.
    """
    pdfium = _pdfium()
    raw = pdfium.raw
    doc = pdfium.PdfDocument.new()
    try:
        font = raw.FPDFText_LoadStandardFont(doc.raw, b"Helvetica")
        leading = font_size * 1.3
        for content in pages:
            page = doc.new_page(612, 792)  # US Letter, points
            y = 792 - 72.0
            for line in content.split("\n"):
                if not line:  # no empty text objects: an empty string makes a truly blank page
                    y -= leading
                    continue
                obj = raw.FPDFPageObj_CreateTextObj(doc.raw, font, font_size)
                wide = ctypes.create_string_buffer((line + "\0").encode("utf-16-le"))
                raw.FPDFText_SetText(obj, ctypes.cast(wide, raw.FPDF_WIDESTRING))
                raw.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 72, y)
                raw.FPDFPage_InsertObject(page.raw, obj)  # the page now owns obj
                y -= leading
            if not raw.FPDFPage_GenerateContent(page.raw):
                raise RuntimeError("PDFium could not generate the page content stream")
            page.close()
        doc.save(str(path))
    finally:
        doc.close()


def _pdfium():
    try:
        import pypdfium2
        import pypdfium2.raw  # noqa: F401  (the FPDF_* constants and C functions)
    except ImportError as e:
        raise ImportError(f"PDF ingestion needs pypdfium2: {PIP_PYPDFIUM2}") from e
    return pypdfium2
