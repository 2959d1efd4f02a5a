"""Tests for the PDF, OCR and office extractors (`scratchlm.ingest.pdf`, `.ocr`, `.office`).

Every input is a real file made here: text PDFs (PDFium's page-object API and matplotlib), a
scanned PDF (an image of rendered text, no text layer), a mixed one, a truncated one, an
RC4-encrypted one written byte by byte, PNG/JPEG/TIFF images of rendered text, a DOCX made with
python-docx and an EPUB made with zipfile. OCR is scored by word recall against the rendered text.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import zipfile
from pathlib import Path

import pytest

from scratchlm.errors import UserError
from scratchlm.ingest.document import IngestOptions, Skip

pdfium = pytest.importorskip("pypdfium2")
PIL_Image = pytest.importorskip("PIL.Image")
from PIL import ImageDraw, ImageFont  # noqa: E402

from scratchlm.ingest import ocr, office, pdf  # noqa: E402

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
HAS_TESSERACT = shutil.which("tesseract") is not None
NO_TESSERACT = "tesseract is not installed (Debian: apt-get install tesseract-ocr)"
LINES = [
    "Language models learn from the documents",
    "you give them, so clean input matters.",
    "Seventy quiet wizards judge vexing puzzles",
    "while brown foxes jump over lazy dogs.",
]
TEXT = "\n".join(LINES)


def one(gen):
    docs = list(gen)
    assert len(docs) == 1
    return docs[0]


def render_text(lines: list[str] = LINES, size: int = 26, mode: str = "L"):
    """A clean image of `lines` in DejaVu Sans, black on white (or on transparent for RGBA)."""
    if not FONT.exists():
        pytest.skip(f"font {FONT} missing (Debian: apt-get install fonts-dejavu-core)")
    font = ImageFont.truetype(str(FONT), size)
    width = int(max(font.getlength(line) for line in lines)) + 80
    bg = (0, 0, 0, 0) if mode == "RGBA" else "white"
    img = PIL_Image.new(mode, (width, 40 + int(size * 1.6) * len(lines)), bg)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((40, 20 + int(size * 1.6) * i), line, font=font, fill="black")
    return img


# --- PDF: text layer ------------------------------------------------------------------------

def test_text_pdf_one_document_with_page_markers(tmp_path):
    pages = [f"Page {i} says: " + LINES[i % 4] + "\n" + LINES[(i + 1) % 4] for i in range(1, 4)]
    path = tmp_path / "three.pdf"
    pdf.make_text_pdf(path, pages)
    doc = one(pdf.extract(path, IngestOptions()))
    assert doc.type == "pdf" and doc.extractor == "pypdfium2"
    assert doc.source == f"{path}#pages=1-3"
    got = doc.text.split(pdf.PAGE_BREAK)
    assert len(got) == 3 and doc.meta["pages"] == 3
    for want, have, start in zip(pages, got, doc.meta["page_starts"]):
        assert ocr.word_recall(want, have) == 1.0
        assert have.splitlines()[0] == want.splitlines()[0]  # lines in reading order
        assert doc.text[start:].startswith(have)
    assert "\r" not in doc.text


def test_blank_page_keeps_its_place_and_is_not_ocrd(tmp_path):
    path = tmp_path / "blank.pdf"
    pdf.make_text_pdf(path, ["first page", "", "third page"])
    doc = one(pdf.extract(path, IngestOptions(ocr=True)))
    assert doc.text.split("\f") == ["first page", "", "third page"]
    assert "ocr_pages" not in doc.meta and doc.meta["page_starts"] == [0, 11, 12]


def test_matplotlib_pdf_with_embedded_truetype(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    path = tmp_path / "mpl.pdf"
    with matplotlib.rc_context({"pdf.fonttype": 42}), PdfPages(path) as out:
        for line in LINES[:2]:
            fig = plt.figure(figsize=(8.5, 11))
            fig.text(0.1, 0.9, line)
            out.savefig(fig)
            plt.close(fig)
    doc = one(pdf.extract(path, IngestOptions()))
    assert [ocr.word_recall(w, h) for w, h in zip(LINES, doc.text.split("\f"))] == [1.0, 1.0]


# --- PDF: scans, OCR fallback ---------------------------------------------------------------

def scanned_pdf(path: Path) -> Path:
    """A PDF page that is only an image of text (what a scanner writes): no text layer."""
    render_text().save(path, "PDF", resolution=150)
    return path


def test_scanned_pdf_is_ocrd(tmp_path):
    path = scanned_pdf(tmp_path / "scan.pdf")
    with pdfium.PdfDocument(path) as check:  # really no text layer
        assert pdf.page_text(check[0]) == ""
    doc = one(pdf.extract(path, IngestOptions(ocr=True, ocr_engine="auto")))
    assert doc.meta["ocr_pages"] == [1]
    assert doc.extractor == f"pypdfium2+{doc.meta['ocr_engine']}"
    assert ocr.word_recall(TEXT, doc.text) >= 0.85


def test_scanned_pdf_without_ocr_is_skipped(tmp_path):
    path = scanned_pdf(tmp_path / "scan.pdf")
    with pytest.raises(Skip, match="OCR is off"):
        list(pdf.extract(path, IngestOptions(ocr=False)))


def test_mixed_pdf_ocrs_only_pages_without_text(tmp_path):
    text_pdf = tmp_path / "text.pdf"
    pdf.make_text_pdf(text_pdf, ["A page with a real text layer\nand a second line"])
    scan = scanned_pdf(tmp_path / "scan.pdf")
    mixed = pdfium.PdfDocument.new()
    for part in (text_pdf, scan):
        with pdfium.PdfDocument(part) as src:
            mixed.import_pages(src)
    path = tmp_path / "mixed.pdf"
    mixed.save(str(path))
    mixed.close()

    off = one(pdf.extract(path, IngestOptions(ocr=False)))
    assert off.meta["no_text_pages"] == [2] and "ocr_pages" not in off.meta
    assert off.text.split("\f") == ["A page with a real text layer\nand a second line", ""]

    on = one(pdf.extract(path, IngestOptions(ocr=True)))
    assert on.meta["ocr_pages"] == [2] and on.source.endswith("#pages=1-2")
    assert ocr.word_recall(TEXT, on.text.split("\f")[1]) >= 0.85


# --- PDF: bad input -------------------------------------------------------------------------

def test_truncated_and_non_pdf_fail_with_reason(tmp_path):
    good = tmp_path / "good.pdf"
    pdf.make_text_pdf(good, ["some text"] * 3)
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.pdf"
    garbage.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 4)
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty):
        with pytest.raises(ValueError, match="corrupt or unreadable PDF"):
            list(pdf.extract(path, IngestOptions()))


PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def rc4(key: bytes, data: bytes) -> bytes:
    s, j = list(range(256)), 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def encrypted_pdf(path: Path, user_pw: bytes, words: str) -> None:
    """A PDF encrypted with the Standard security handler, revision 2 (RC4-40, PDF 1.3 §3.5),
    built byte by byte: pypdf is not a dependency, and this keeps the test self-contained."""
    def padded(pw: bytes) -> bytes:
        return (pw + PAD)[:32]

    perms, file_id = -44, hashlib.md5(b"scratchlm").digest()
    o_entry = rc4(hashlib.md5(padded(b"owner")).digest()[:5], padded(user_pw))
    key = hashlib.md5(padded(user_pw) + o_entry + struct.pack("<i", perms) + file_id).digest()[:5]
    u_entry = rc4(key, PAD)
    content = f"BT /F1 12 Tf 72 720 Td ({words}) Tj ET".encode()
    obj_key = hashlib.md5(key + (4).to_bytes(3, "little") + b"\0\0").digest()[:10]
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + rc4(obj_key, content) + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>"
        % (o_entry.hex().encode(), u_entry.hex().encode(), perms),
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += (b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 6 0 R /ID [<%s> <%s>] >>\n"
            % (len(objects) + 1, file_id.hex().encode(), file_id.hex().encode()))
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    path.write_bytes(bytes(out))


def test_encrypted_pdf_is_skipped_with_reason(tmp_path):
    path = tmp_path / "locked.pdf"
    encrypted_pdf(path, b"secret", "confidential quarterly numbers")
    # The file is genuinely encrypted: it opens, and reads, with the right password only.
    with pdfium.PdfDocument(path, password="secret") as unlocked:
        assert pdf.page_text(unlocked[0]) == "confidential quarterly numbers"
    with pytest.raises(Skip, match="encrypted PDF: needs a password"):
        list(pdf.extract(path, IngestOptions()))


# --- OCR: images ----------------------------------------------------------------------------

ENGINES = [
    pytest.param("tesseract", 0.95, marks=pytest.mark.skipif(not HAS_TESSERACT, reason=NO_TESSERACT)),
    pytest.param("rapidocr", 0.85),
]


@pytest.mark.parametrize("engine,min_recall", ENGINES)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_ocr_word_recall(tmp_path, engine, min_recall, fmt):
    path = tmp_path / f"page.{fmt.lower()}"
    render_text().save(path, fmt)
    doc = one(ocr.extract(path, IngestOptions(ocr_engine=engine)))
    assert doc.type == "image" and doc.extractor == engine and doc.source == str(path)
    assert ocr.word_recall(TEXT, doc.text) >= min_recall, doc.text
    # Reading order: the first rendered line is recognised before the last one.
    low = doc.text.casefold()
    assert low.find("language") < low.find("lazy")


def test_transparent_png_is_flattened_onto_white(tmp_path):
    path = tmp_path / "transparent.png"
    render_text(mode="RGBA").save(path)
    doc = one(ocr.extract(path, IngestOptions(ocr_engine="auto")))
    assert ocr.word_recall(TEXT, doc.text) >= 0.85


def test_multipage_tiff_pages(tmp_path):
    path = tmp_path / "scan.tiff"
    first, second = render_text(LINES[:2]), render_text(LINES[2:])
    first.save(path, "TIFF", save_all=True, append_images=[second])
    doc = one(ocr.extract(path, IngestOptions(ocr_engine="auto")))
    assert doc.source == f"{path}#pages=1-2" and doc.meta["pages"] == 2
    page1, page2 = doc.text.split("\f")
    assert ocr.word_recall("\n".join(LINES[:2]), page1) >= 0.85
    assert ocr.word_recall("\n".join(LINES[2:]), page2) >= 0.85


def test_truncated_image_fails_clearly(tmp_path):
    whole = tmp_path / "whole.png"
    render_text().save(whole)
    for suffix, data in ((".png", whole.read_bytes()[:300]), (".jpg", b"\xff\xd8\xff\xe0garbage")):
        bad = tmp_path / f"bad{suffix}"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="cannot decode image"):
            list(ocr.extract(bad, IngestOptions(ocr_engine="rapidocr")))


def test_images_skipped_when_ocr_off_tiny_or_blank(tmp_path):
    text_img = tmp_path / "text.png"
    render_text().save(text_img)
    with pytest.raises(Skip, match="OCR is off"):
        list(ocr.extract(text_img, IngestOptions(ocr=False)))
    icon = tmp_path / "icon.png"
    PIL_Image.new("RGB", (12, 12), "red").save(icon)
    with pytest.raises(Skip, match="too small"):
        list(ocr.extract(icon, IngestOptions(ocr_engine="rapidocr")))
    blank = tmp_path / "blank.png"
    PIL_Image.new("RGB", (300, 200), "white").save(blank)
    with pytest.raises(Skip, match="no text"):
        list(ocr.extract(blank, IngestOptions(ocr_engine="rapidocr")))


def test_engine_names():
    with pytest.raises(UserError, match="unknown OCR engine"):
        ocr.resolve_engine("easyocr")
    assert ocr.resolve_engine("auto") == ("tesseract" if HAS_TESSERACT else "rapidocr")
    assert ocr.resolve_engine("rapidocr") == "rapidocr"


def test_reading_order_groups_boxes_into_lines():
    boxes = [  # shuffled; the second line's boxes sit a little higher/lower than each other
        ((300, 52, 380, 70), "line"), ((10, 10, 90, 30), "first"), ((100, 12, 200, 29), "row"),
        ((10, 50, 120, 68), "second"), ((130, 49, 290, 71), "text"), ((10, 140, 90, 160), "after"),
    ]
    assert ocr.reading_order(boxes) == "first row\nsecond text line\n\nafter"


def test_word_recall_is_multiset_recall():
    assert ocr.word_recall("the cat, the hat", "The cat hat") == 0.75
    assert ocr.word_recall("", "anything") == 1.0


# --- Office: DOCX and EPUB ------------------------------------------------------------------

def test_docx_paragraphs_and_tables_in_order(tmp_path):
    docx = pytest.importorskip("docx")
    d = docx.Document()
    d.core_properties.title = "Quarterly notes"
    d.add_heading("Introduction to widgets", level=1)
    d.add_paragraph("Widgets are small.")
    table = d.add_table(rows=3, cols=3)
    for r, row in enumerate([["name", "size", "colour"], ["alpha", "2", "red"], ["beta", "", ""]]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    merged = table.cell(2, 1).merge(table.cell(2, 2))
    merged.text = "unknown"
    d.add_paragraph("")  # empty paragraphs are dropped
    d.add_paragraph("After the table comes the end.")
    path = tmp_path / "notes.docx"
    d.save(path)

    doc = one(office.extract_docx(path, IngestOptions()))
    assert doc.type == "docx" and doc.extractor == "python-docx" and doc.meta["title"] == "Quarterly notes"
    assert doc.text == ("Introduction to widgets\n\nWidgets are small.\n\n"
                        "name | size | colour\nalpha | 2 | red\nbeta | unknown\n\n"
                        "After the table comes the end.")


def test_corrupt_docx_fails_clearly(tmp_path):
    pytest.importorskip("docx")
    bad = tmp_path / "bad.docx"
    bad.write_bytes(b"\xd0\xcf\x11\xe0 an OLE file, as Word writes for password-protected documents")
    with pytest.raises(ValueError, match="not a readable DOCX"):
        list(office.extract_docx(bad, IngestOptions()))


def make_epub(path: Path) -> None:
    """A minimal EPUB 3: the spine lists chapter two first, unlike the zip and the manifest."""
    chapter = ('<?xml version="1.0" encoding="utf-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml">'
               "<head><title/><style>p {{ color: red }}</style></head><body>{}</body></html>")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        z.writestr("META-INF/container.xml",
                   '<?xml version="1.0"?><container version="1.0" '
                   'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
                   '<rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
                   "</rootfiles></container>")
        z.writestr("OEBPS/content.opf",
                   '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0">'
                   '<metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>A Tiny Book</dc:title>'
                   "</metadata><manifest>"
                   '<item id="nav" href="nav.xhtml" media-type="application/xhtml+xml" properties="nav"/>'
                   '<item id="c1" href="text/one.xhtml" media-type="application/xhtml+xml"/>'
                   '<item id="c2" href="text/chapter%20two.xhtml" media-type="application/xhtml+xml"/>'
                   '<item id="css" href="style.css" media-type="text/css"/>'
                   '</manifest><spine><itemref idref="c2"/><itemref idref="c1"/></spine></package>')
        z.writestr("OEBPS/nav.xhtml", chapter.format("<nav><ol><li>Table of contents</li></ol></nav>"))
        z.writestr("OEBPS/text/one.xhtml", chapter.format(
            "<h1>Chapter One</h1><p>The <em>second</em> chapter in reading order.</p>"
            "<script>alert('no')</script>"))
        z.writestr("OEBPS/text/chapter two.xhtml", chapter.format(
            "<h1>Prologue</h1><p>It begins here,<br/>on a new line.</p>"))
        z.writestr("OEBPS/style.css", "p { margin: 0 }")


def test_epub_follows_spine_and_strips_markup(tmp_path):
    path = tmp_path / "tiny.epub"
    make_epub(path)
    doc = one(office.extract_epub(path, IngestOptions()))
    assert doc.type == "epub" and doc.meta == {"chapters": 2, "title": "A Tiny Book"}
    # Chapters are joined by a blank line; blocks inside a chapter by a newline (as web pages).
    assert doc.text == ("Prologue\nIt begins here,\non a new line.\n\n"
                        "Chapter One\nThe second chapter in reading order.")


def test_bad_epubs(tmp_path):
    notzip = tmp_path / "bad.epub"
    notzip.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a readable EPUB"):
        list(office.extract_epub(notzip, IngestOptions()))
    drm = tmp_path / "drm.epub"
    make_epub(drm)
    with zipfile.ZipFile(drm, "a") as z:
        z.writestr("META-INF/encryption.xml",
                   '<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
                   'xmlns:enc="http://www.w3.org/2001/04/xmlenc#"><enc:EncryptedData><enc:CipherData>'
                   '<enc:CipherReference URI="OEBPS/text/one.xhtml"/></enc:CipherData>'
                   "</enc:EncryptedData></encryption>")
    with pytest.raises(Skip, match="DRM"):
        list(office.extract_epub(drm, IngestOptions()))
