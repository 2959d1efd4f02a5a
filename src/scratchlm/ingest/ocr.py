"""OCR for images and for PDF pages without a text layer: Tesseract or RapidOCR.

Driven by the ingest driver (`scratchlm ingest`), which calls `extract(path, opts)` for png, jpg,
jpeg, gif, bmp, tif, tiff and webp files; `scratchlm.ingest.pdf` calls `ocr_image` on rendered
pages. Engines (`--ocr-engine`):

| engine      | how                                          | word recall, 10 pt page | CPU s/page |
|-------------|----------------------------------------------|-------------------------|------------|
| `tesseract` | the `tesseract` program, a subprocess per image | 0.998                 | ~2         |
| `rapidocr`  | `rapidocr-onnxruntime`: PP-OCRv4 ONNX models in the wheel, offline | 0.998 | ~10 |
| `auto`      | `tesseract` when the program is on PATH, else `rapidocr` |             |            |

(benchmarks/README.md, "PDF and OCR", has the measurements and commands.)

Parallelism comes from the driver's worker processes, so each engine runs single-threaded: on a
small machine a multi-threaded engine per worker oversubscribes the cores (Tesseract's OpenMP
runs ~10x slower that way).
"""

from __future__ import annotations

import functools
import io
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from scratchlm.errors import UserError
from scratchlm.ingest.document import Document, IngestOptions, Skip

if TYPE_CHECKING:  # PIL is an optional dependency (the `ingest` extra)
    from PIL.Image import Image

ENGINES = ("auto", "rapidocr", "tesseract")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
MIN_SIDE = 16  # px: smaller images (icons, bullets, spacers) cannot hold a legible line of text
MAX_SIDE = 4000  # px: larger images are downscaled first; OCR time grows with the area
TESSERACT_TIMEOUT_S = 300
TESSERACT_LANG = "eng"
PIP_PILLOW = "pip install pillow  (or: pip install 'scratchlm[ingest]')"
PIP_RAPIDOCR = "pip install rapidocr-onnxruntime  (or: pip install 'scratchlm[ingest]')"
APT_TESSERACT = "apt-get install tesseract-ocr  (Debian/Ubuntu; macOS: brew install tesseract)"


def resolve_engine(engine: str) -> str:
    """Return the concrete engine ("tesseract" or "rapidocr") that `engine` stands for.

    Raises UserError for an unknown name or when Tesseract is asked for but not installed, so the
    driver can check `--ocr-engine` once, before any file is read.
    """
    if engine not in ENGINES:
        raise UserError(f"unknown OCR engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "tesseract" if shutil.which("tesseract") else "rapidocr"
    if engine == "tesseract" and not shutil.which("tesseract"):
        raise UserError("--ocr-engine tesseract: the tesseract program is not on PATH; "
                        + APT_TESSERACT)
    return engine


def ocr_image(image: Image, engine: str) -> str:
    """Recognise the text in a PIL image, lines in reading order, paragraphs split by a blank line.

    Args:
        image: any PIL image (any mode; transparency is flattened onto white).
        engine: "auto", "tesseract" or "rapidocr".
    Returns:
        The text (may be empty when the image holds none).
    Example:
        >>> ocr_image(PIL.Image.open("scan.png"), "auto")
    """
    image = _prepare(image)
    if resolve_engine(engine) == "tesseract":
        return _tesseract(image)
    return _rapidocr(image)


def extract(path: Path, opts: IngestOptions) -> Iterator[Document]:
    """One Document (type "image") per image file; frames of a multi-page TIFF are pages.

    Raises Skip when OCR is off, the image is too small to hold text, or OCR finds no text;
    a truncated or undecodable image raises ValueError (the input is marked failed).
    """
    if not opts.ocr:
        raise Skip("image needs OCR and OCR is off (--no-ocr)")
    Image, ImageSequence = _pil()
    engine = resolve_engine(opts.ocr_engine)
    # PIL reports truncated or corrupt data as OSError or SyntaxError (sic); only decoding is
    # guarded, so an error of the OCR engine itself keeps its own message.
    bad_image = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
    pages: list[str] = []
    try:
        im = Image.open(path)
    except bad_image as e:
        raise ValueError(f"cannot decode image: {e}") from e
    with im:
        if max(im.size) < MIN_SIDE * 2 or min(im.size) < MIN_SIDE:
            raise Skip(f"image too small to hold text ({im.size[0]}x{im.size[1]} px)")
        # Multi-page TIFFs are scans of documents; GIF/WebP animations repeat themselves.
        frames = iter(ImageSequence.Iterator(im) if im.format == "TIFF" else [im])
        while True:
            try:
                frame = next(frames, None)
                if frame is None:
                    break
                frame.load()  # decode now, so a truncated file fails here with PIL's reason
            except bad_image as e:
                raise ValueError(f"cannot decode image: {e}") from e
            pages.append(ocr_image(frame, engine).strip())
    if not any(pages):
        raise Skip(f"OCR ({engine}) found no text")
    meta: dict = {"ocr_engine": engine}
    source = str(path)
    if len(pages) > 1:
        source += f"#pages=1-{len(pages)}"
        meta["pages"] = len(pages)
    yield Document(text="\f".join(pages), type="image", source=source, extractor=engine, meta=meta)


def word_recall(reference: str, hypothesis: str) -> float:
    """Fraction of the reference's words (case-folded, punctuation stripped) found in `hypothesis`.

    Counts are matched as multisets, so a word the reference holds twice must be recognised twice.
    Used by the tests and `benchmarks/bench_ocr_pdf.py` to score OCR against known text.
    """
    ref, hyp = Counter(_words(reference)), Counter(_words(hypothesis))
    total = sum(ref.values())
    return sum((ref & hyp).values()) / total if total else 1.0


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def _pil():
    try:
        from PIL import Image, ImageSequence
    except ImportError as e:
        raise ImportError(f"OCR needs Pillow: {PIP_PILLOW}") from e
    return Image, ImageSequence


def _prepare(image: Image) -> Image:
    """Flatten to 8-bit RGB on white, downscale huge images, add a white margin.

    Transparent PNGs are usually dark text on nothing: flattened on black they would be blank.
    Both engines detect text touching the border poorly, hence the margin.
    """
    Image, _ = _pil()
    from PIL import ImageOps

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    return ImageOps.expand(image, border=32, fill=(255, 255, 255))


def _tesseract(image: Image) -> str:
    """Run the tesseract program on a PNG piped through stdin; its layout analysis orders lines."""
    exe = shutil.which("tesseract")
    if exe is None:
        raise RuntimeError(f"the tesseract program is not on PATH; {APT_TESSERACT}")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    # OpenMP in Tesseract spins on every core; with one worker per core that is ~10x slower.
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    # --dpi: rendered pages are 300 dpi and most scans are; it silences a guess that can be off.
    argv = [exe, "stdin", "stdout", "-l", TESSERACT_LANG, "--psm", "3", "--dpi", "300"]
    try:
        proc = subprocess.run(argv, input=buf.getvalue(), capture_output=True, env=env,
                              timeout=TESSERACT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"tesseract took more than {TESSERACT_TIMEOUT_S} s on one image") from e
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"tesseract failed (exit {proc.returncode}): {msg[-1] if msg else ''}")
    text = proc.stdout.decode("utf-8", "replace").replace("\f", "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@functools.lru_cache(maxsize=1)
def _rapidocr_engine():
    """The RapidOCR engine, built once per process on first use (loading the models takes ~0.1 s
    and ~100 MB, so it is never built in processes that do not OCR)."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:
        raise ImportError(f"OCR with rapidocr needs rapidocr-onnxruntime: {PIP_RAPIDOCR}") from e
    one_thread = {f"{part}_{k}": 1 for part in ("det", "cls", "rec")
                  for k in ("intra_op_num_threads", "inter_op_num_threads")}
    # The default (scale the SHORT side up to 736 px) blows small images up ~4x: slow, and it
    # missed whole lines in our tests; the long side capped at 1600 px is 3-5x faster. The
    # default box margin (unclip 1.6) crops words so tightly that the recogniser drops the
    # spaces between them on JPEG'd text ("Languagemodelslearn"): word recall 0.27 -> 1.0 at 2.0.
    # The 180-degree line classifier flipped ~1 in 5 upright lines of a clean 10 pt page, which
    # then read as garbage (recall 0.80 -> 1.00 without it); documents are upright.
    return RapidOCR(use_cls=False, det_limit_type="max", det_limit_side_len=1600,
                    det_unclip_ratio=2.0, **one_thread)


def _rapidocr(image: Image) -> str:
    import numpy as np

    result, _elapsed = _rapidocr_engine()(np.asarray(image))
    boxes = [(_bbox(points), text) for points, text, _score in (result or []) if text.strip()]
    return reading_order(boxes)


def _bbox(points: list[list[float]]) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def reading_order(boxes: list[tuple[tuple[float, float, float, float], str]]) -> str:
    """Join OCR boxes ((x0, y0, x1, y1), text) into lines top-to-bottom, left-to-right.

    A box joins a line when its vertical middle falls inside the line's vertical extent; a gap
    between lines larger than 1.5 line heights starts a new paragraph (blank line).
    """
    lines: list[list] = []  # [y0, y1, [(x0, text), ...]]
    for (x0, y0, x1, y1), text in sorted(boxes, key=lambda b: (b[0][1], b[0][0])):
        mid = (y0 + y1) / 2
        line = next((ln for ln in reversed(lines) if ln[0] <= mid <= ln[1]), None)
        if line is None:
            lines.append([y0, y1, [(x0, text)]])
        else:
            line[2].append((x0, text))
    lines.sort(key=lambda ln: ln[0])
    heights = sorted(ln[1] - ln[0] for ln in lines)
    typical = heights[len(heights) // 2] if heights else 0.0
    out: list[str] = []
    prev_bottom = None
    for y0, y1, words in lines:
        if prev_bottom is not None and y0 - prev_bottom > 1.5 * typical:
            out.append("")
        out.append(" ".join(t.strip() for _, t in sorted(words)))
        prev_bottom = y1
    return "\n".join(out)
