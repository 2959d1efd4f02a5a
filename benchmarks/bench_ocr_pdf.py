"""Benchmark the PDF and OCR extractors: PDF text pages/s, OCR word recall and seconds per page.

    python benchmarks/bench_ocr_pdf.py                 # all three parts, 2 workers
    python benchmarks/bench_ocr_pdf.py --part pdf      # or: ocr, survey
    python benchmarks/bench_ocr_pdf.py --workers 2 --generated-pages 2000 --ocr-pages 3

Parts (results go into benchmarks/README.md, section "PDF and OCR"):
- pdf:    `scratchlm.ingest.pdf.extract` over the PDF manuals Debian installs in /usr/share/doc
          (`.pdf` and `.pdf.gz`, unpacked to a temp dir) plus generated many-page text PDFs, one
          file per task in a pool of worker processes, as the ingest driver runs them.
          Target: >= 300 pages/s with 2 workers.
- ocr:    `scratchlm.ingest.ocr.ocr_image` per engine on (a) full pages of clean prose rendered
          in DejaVu Sans at 300 dpi (reference: the prose) and (b) real manual pages rendered at
          300 dpi (reference: their text layer). Targets: word recall >= 0.95 Tesseract, >= 0.85
          RapidOCR.
- survey: every extractor on every PDF and image under /usr/share/doc: status, reason, chars.
"""

from __future__ import annotations

import argparse
import gzip
import resource
import shutil
import statistics
import tempfile
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from scratchlm.ingest import ocr, pdf
from scratchlm.ingest.document import IngestOptions, Skip

DOC_ROOT = Path("/usr/share/doc")
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
PROSE = Path("/usr/share/common-licenses/GPL-3")
PIL_FORMATS = ("png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp")


def find_doc_pdfs(out_dir: Path) -> list[Path]:
    """Copy (or gunzip) every PDF under /usr/share/doc into out_dir; the driver reads .gz in place,
    the extractor itself takes a plain file."""
    found = []
    for src in sorted(DOC_ROOT.rglob("*")):
        name = src.name
        if not src.is_file() or not (name.endswith(".pdf") or name.endswith(".pdf.gz")):
            continue
        dest = out_dir / ("_".join(src.relative_to(DOC_ROOT).parts).removesuffix(".gz"))
        if name.endswith(".gz"):
            with gzip.open(src) as fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(src, dest)
        found.append(dest)
    return found


def _pages_of(path: Path) -> tuple[int, int]:
    """One ingest task: (pages, chars) of a text PDF, OCR off as for a text-only corpus."""
    doc = next(pdf.extract(path, IngestOptions(ocr=False)))
    return doc.meta["pages"], len(doc.text)


def bench_pdf(workers: int, generated_pages: int, repeats: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_pdf_"))
    try:
        real = find_doc_pdfs(tmp)
        # Several generated files so that a pool of workers can share them as it shares a corpus.
        lines = PROSE.read_text().splitlines() if PROSE.exists() else ["lorem ipsum dolor"] * 60
        per_file = 250
        generated = []
        for f in range(max(1, generated_pages // per_file)):
            pages = ["\n".join(lines[(p * 50) % len(lines):(p * 50) % len(lines) + 50])
                     for p in range(f * per_file, (f + 1) * per_file)]
            path = tmp / f"generated_{f}.pdf"
            pdf.make_text_pdf(path, pages, font_size=10)
            generated.append(path)
        results = {}
        for name, files in (("doc manuals", real), ("generated", generated),
                            ("all", real + generated)):
            rates = []
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_pages_of, files[:workers]))  # start the workers, import pdfium
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    # Largest first, as a scheduler that knows sizes would: keeps both cores busy.
                    done = list(pool.map(_pages_of, sorted(files, key=lambda p: -p.stat().st_size)))
                    seconds = time.perf_counter() - t0
                    rates.append(sum(p for p, _ in done) / seconds)
            results[name] = {"files": len(files), "pages": sum(p for p, _ in done),
                             "chars": sum(c for _, c in done),
                             "pages_per_s_median": statistics.median(rates),
                             "pages_per_s_all": [round(r) for r in rates]}
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rendered_prose_pages(n: int):
    """n full US-Letter pages at 300 dpi of clean prose, 10 pt DejaVu Sans: (image, text)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(FONT), 42)  # 42 px at 300 dpi = 10 pt
    words = PROSE.read_text().split() if PROSE.exists() else ("the quick brown fox " * 2000).split()
    lines = textwrap.wrap(" ".join(words), width=80)
    per_page = 50
    pages = []
    for i in range(n):
        chunk = lines[(i + 3) * per_page:(i + 4) * per_page]  # skip the title block
        img = Image.new("L", (2550, 3300), 255)
        draw = ImageDraw.Draw(img)
        for j, line in enumerate(chunk):
            draw.text((225, 225 + j * 56), line, font=font, fill=0)
        pages.append((img, "\n".join(chunk)))
    return pages


def manual_pages(n: int):
    """n pages of real manuals rendered at 300 dpi, with their text layer as the reference."""
    import pypdfium2

    tmp = Path(tempfile.mkdtemp(prefix="bench_ocr_"))
    try:
        pdfs = find_doc_pdfs(tmp)
        picked = []
        for path in pdfs:
            if len(picked) >= n:
                break
            with pypdfium2.PdfDocument(path) as doc:
                page = doc[min(5, len(doc) - 1)]  # past the title page and the table of contents
                picked.append((pdf.render_page(page), pdf.page_text(page), path.name))
                page.close()
        return picked
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (tesseract runs as a child): unlike
    wall time it does not grow when other jobs share the cores."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_ocr(n_pages: int) -> dict:
    engines = ["rapidocr"] + (["tesseract"] if shutil.which("tesseract") else [])
    sets = {"rendered prose (10 pt, 300 dpi)": rendered_prose_pages(n_pages),
            "real manual pages (300 dpi)": [(img, ref) for img, ref, _ in manual_pages(n_pages)]}
    first_page = sets["real manual pages (300 dpi)"][0][0]
    ocr.ocr_image(first_page.crop((0, 0, 400, 200)), "rapidocr")  # load the models, untimed
    results = {}
    for engine in engines:
        for name, pages in sets.items():
            recalls, seconds, cpu = [], [], []
            for img, ref in pages:
                t0, c0 = time.perf_counter(), _cpu_seconds()
                text = ocr.ocr_image(img, engine)
                seconds.append(time.perf_counter() - t0)
                cpu.append(_cpu_seconds() - c0)
                recalls.append(ocr.word_recall(ref, text))
            results[f"{engine} / {name}"] = {
                "pages": len(pages), "word_recall_mean": statistics.mean(recalls),
                "word_recall_min": min(recalls), "s_per_page": statistics.mean(seconds),
                "cpu_s_per_page": statistics.mean(cpu)}
    return results


def survey() -> list[dict]:
    """Every PDF and image under /usr/share/doc through its extractor, OCR on (auto engine)."""
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_survey_"))
    try:
        inputs = [(p, pdf.extract) for p in find_doc_pdfs(tmp)]
        inputs += [(p, ocr.extract) for p in sorted(DOC_ROOT.rglob("*"))
                   if p.is_file() and p.suffix.lower().lstrip(".") in PIL_FORMATS]
        for path, extractor in inputs:
            t0 = time.perf_counter()
            try:
                docs = list(extractor(path, IngestOptions(ocr=True, ocr_engine="auto")))
                status, reason = "ok", ""
                chars = sum(len(d.text) for d in docs)
                pages = sum(d.meta.get("pages", 1) for d in docs)
            except Skip as e:
                status, reason, chars, pages = "skipped", str(e), 0, 0
            except Exception as e:  # noqa: BLE001 -- the survey records every failure, like the driver
                status, reason, chars, pages = "failed", f"{type(e).__name__}: {e}", 0, 0
            name = str(path.relative_to(DOC_ROOT)) if path.is_relative_to(DOC_ROOT) else path.name
            rows.append({"file": name, "status": status, "reason": reason, "pages": pages,
                         "chars": chars, "seconds": round(time.perf_counter() - t0, 2),
                         "preview": (docs[0].text[:60].replace("\n", " ") if status == "ok" else "")})
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "pdf", "ocr", "survey"], default="all")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--generated-pages", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ocr-pages", type=int, default=3, help="pages per OCR set and engine")
    args = ap.parse_args()
    if args.part in ("all", "pdf"):
        print(f"## PDF text extraction, {args.workers} worker processes\n")
        print("| set | files | pages | chars | pages/s (median) | runs |\n|---|---|---|---|---|---|")
        for name, r in bench_pdf(args.workers, args.generated_pages, args.repeats).items():
            print(f"| {name} | {r['files']} | {r['pages']} | {r['chars']} | "
                  f"{r['pages_per_s_median']:.0f} | {r['pages_per_s_all']} |")
    if args.part in ("all", "ocr"):
        print("\n## OCR word recall\n")
        print("| engine / set | pages | word recall (mean) | min | wall s/page | CPU s/page |\n"
              "|---|---|---|---|---|---|")
        for name, r in bench_ocr(args.ocr_pages).items():
            print(f"| {name} | {r['pages']} | {r['word_recall_mean']:.3f} | "
                  f"{r['word_recall_min']:.3f} | {r['s_per_page']:.1f} | {r['cpu_s_per_page']:.1f} |")
    if args.part in ("all", "survey"):
        print("\n## /usr/share/doc survey\n")
        print("| file | status | reason | pages | chars | s | first characters |\n|---|---|---|---|---|---|---|")
        for r in survey():
            print(f"| {r['file']} | {r['status']} | {r['reason']} | {r['pages']} | {r['chars']} | "
                  f"{r['seconds']} | {r['preview'].replace('|', '/')} |")


if __name__ == "__main__":
    main()
