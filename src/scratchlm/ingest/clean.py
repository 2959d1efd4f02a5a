"""Cleaning, quality filtering, secret scrubbing and deduplication of extracted documents.

Driven by `scratchlm.ingest.driver`: worker processes call `clean_document` on every extracted
document (normalise, scrub, filter) and `minhash_signature` when near-dedup is on; the main
process owns one `Deduplicator`, which sees documents in output order so the result does not
depend on `--workers`.

Order of operations for each document (see docs/ingest.md for the reasoning):
1. Unicode NFC; CRLF/CR -> LF; C0/C1 control characters removed except tab, newline, form feed.
2. Secrets replaced by `<SECRET>` (on by default; `scrub_secrets=False` turns it off).
3. `min_chars` on the stripped text.
4. Quality heuristics, for prose only (code, logs and data rows are exempt, so code is never
   dropped for being code): too many duplicated lines, too few alphabetic characters, or one
   character repeated over most of the text.
5. Exact dedup by sha256 of the final text; near dedup with MinHash LSH (`datasketch`) over
   word 5-gram shingles, Jaccard threshold 0.8, 128 permutations.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass

from scratchlm.errors import UserError
from scratchlm.ingest.document import Document, IngestOptions

SECRET_PLACEHOLDER = "<SECRET>"

# C0 and C1 controls except \t \n \f; also U+FEFF (stray BOMs) and lone surrogates.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0d-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_ASCII_CONTROL = bytes([*range(0, 9), 0x0B, *range(0x0D, 0x20), 0x7F])  # the same, for ASCII text

# Each pattern starts with a literal (`AKIA`, `ghp_`...) so the regex engine's prefix search skips
# through text without secrets quickly; the few that cannot carry "needles", plain substrings of
# which one must occur before the regex runs. Together: ~100 MB/s on text with no secrets.
# Group 1, when present, is the secret part (its context is kept); else the whole match goes.
SECRET_PATTERNS: list[tuple[str, tuple[str, ...], re.Pattern[str]]] = [
    ("private_key", (), re.compile(
        r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END[A-Z0-9 ]*PRIVATE KEY"
        r"(?: BLOCK)?-----")),
    ("aws_access_key_id", (), re.compile(r"AKIA[0-9A-Z]{16}(?![0-9A-Z])")),
    ("aws_temporary_key_id", (), re.compile(r"ASIA[0-9A-Z]{16}(?![0-9A-Z])")),
    ("aws_secret_access_key", ("ecret_access_key", "ECRET_ACCESS_KEY", "ecretAccessKey"), re.compile(
        r"(?i)secret_?access_?key[\"']?\s*[:=]+\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])")),
    ("github_token", (), re.compile(r"gh[pousr]_[A-Za-z0-9]{36,255}\b")),
    ("github_pat", (), re.compile(r"github_pat_[A-Za-z0-9_]{22,255}\b")),
    ("gitlab_token", (), re.compile(r"glpat-[A-Za-z0-9_\-]{20,}")),
    ("slack_token", (), re.compile(r"xox[abposr]-[A-Za-z0-9\-]{10,}")),
    ("slack_webhook", (), re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9_/]+")),
    ("google_api_key", (), re.compile(r"AIza[0-9A-Za-z_\-]{35}")),
    ("stripe_key", ("_live_", "_test_"), re.compile(r"\b(?:sk|rk|pk)_live_[0-9A-Za-z]{20,}|\b(?:sk|rk)_test_[0-9A-Za-z]{20,}")),
    ("openai_anthropic_key", (), re.compile(r"sk-(?<![A-Za-z0-9]sk-)(?:proj-|ant-|svcacct-)?[A-Za-z0-9_\-]{32,}")),
    ("huggingface_token", (), re.compile(r"hf_(?<![A-Za-z0-9]hf_)[A-Za-z0-9]{34,}\b")),
    ("npm_token", (), re.compile(r"npm_[A-Za-z0-9]{36}\b")),
    ("pypi_token", (), re.compile(r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_\-]{50,}")),
    ("sendgrid_key", (), re.compile(r"SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}")),
    ("twilio_key", (), re.compile(r"SK[0-9a-f]{32}\b")),
    ("jwt", (), re.compile(r"eyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}")),
    ("url_password", (), re.compile(r"://[^\s:/@'\"]+:([^\s:/@'\"]{3,})@")),
]  # fmt: skip

_LETTERS = re.compile(r"[^\W\d_]+")  # runs of letters, any script
_ASCII_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# Prose types get quality heuristics; everything else (code, log, json, csv, database) does not.
PROSE_TYPES = frozenset({"text", "markdown", "rst", "html", "pdf", "image", "docx", "epub"})
MAX_DUPLICATE_LINE_FRACTION = 0.3  # Gopher (Rae et al. 2021) uses 0.3 of lines
MIN_ALPHA_FRACTION = 0.25  # of non-space characters; catches tables of numbers and symbol soup
MAX_TOP_CHAR_FRACTION = 0.5  # one non-space character over half the text: "=====" or "....."

NEAR_DUP_THRESHOLD = 0.8
NUM_PERM = 128
SHINGLE_WORDS = 5


def normalize(text: str) -> str:
    """NFC, LF newlines, control characters removed."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii():  # O(1) check; bytes.translate is ~5x faster than the regex
        raw = text.encode("ascii")
        kept = raw.translate(None, _ASCII_CONTROL)
        return text if len(kept) == len(raw) else kept.decode("ascii")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return _CONTROL.sub("", text)


# Passwords that documentation uses as examples (`https://user:pass@host`): never real secrets.
PLACEHOLDER_PASSWORDS = frozenset({
    "pass", "password", "passwd", "pwd", "secret", "xyz", "abc", "changeme", "example", "pass123",
    "password123", "mypassword", "yourpassword", "hunter2", "foobar", "foo", "bar", "test", "token",
})  # fmt: skip


def _is_placeholder(value: str) -> bool:
    """Example or templated values: `pass`, `<password>`, `${DB_PASS}`, `%s`, `****`."""
    low = value.lower()
    return low in PLACEHOLDER_PASSWORDS or low[0] in "<{$%*[(" or len(set(low)) == 1


def scrub_secrets(text: str) -> tuple[str, int]:
    """Replace credentials with SECRET_PLACEHOLDER; returns (text, number replaced)."""
    count = 0
    for _name, needles, pattern in SECRET_PATTERNS:
        if needles and not any(needle in text for needle in needles):
            continue

        def replace(m: re.Match[str]) -> str:
            nonlocal count
            if m.lastindex and _is_placeholder(m.group(1)):
                return m.group(0)  # documentation's `user:pass@host` teaches URL syntax, not a key
            count += 1
            if m.lastindex:  # keep the context, replace the secret group only
                start, end = m.span(1)
                whole = m.group(0)
                return whole[: start - m.start()] + SECRET_PLACEHOLDER + whole[end - m.start():]
            return SECRET_PLACEHOLDER

        text = pattern.sub(replace, text)
    return text, count


def quality_problem(text: str) -> str | None:
    """Why a prose document is low quality, or None. Documented thresholds above.

    Ratios are measured on a sample (start, middle, end; 30k characters) so the cost per document
    is bounded; the duplicated-line fraction uses the whole text (C-speed counting).
    """
    lines = text.split("\n")
    if len(lines) >= 5:
        counts = Counter(lines)
        total = sum(map(len, lines))
        dup_chars = total - sum(map(len, counts))  # characters in the 2nd, 3rd... copy of a line
        if total and dup_chars > MAX_DUPLICATE_LINE_FRACTION * total:
            return f"repetitive ({dup_chars / total:.0%} of characters in duplicated lines)"
    sample = text if len(text) <= 30_000 else text[:10_000] + text[len(text) // 2:][:10_000] + text[-10_000:]
    dense = len(sample) - sample.count(" ") - sample.count("\n") - sample.count("\t")
    if dense >= 50:
        if sample.isascii():  # bytes.translate deletes at ~1 GB/s; the regex is 30x slower
            raw = sample.encode("ascii")
            letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
        else:
            letters = len(sample) - len(_LETTERS.sub("", sample))
        alpha = letters / dense
        if alpha < MIN_ALPHA_FRACTION:
            return f"mostly symbols or digits ({alpha:.0%} letters)"
        head = Counter(sample[:2000])
        for space in " \n\t":
            head.pop(space, None)
        if max(head.values()) > MAX_TOP_CHAR_FRACTION * sum(head.values()):
            return "one character repeated over most of the text"
    return None


@dataclass
class CleanStats:
    """What cleaning did to one input, summed into the manifest reason and the summary."""

    secrets: int = 0
    dropped: int = 0
    first_drop_reason: str | None = None


def clean_document(doc: Document, opts: IngestOptions, stats: CleanStats) -> Document | None:
    """Normalise, scrub and filter one document; None when it is dropped (reason in stats)."""
    text = normalize(doc.text)
    if opts.scrub_secrets:
        text, n = scrub_secrets(text)
        stats.secrets += n
    reason = None
    if len(text.strip()) < max(opts.min_chars, 1):
        reason = f"shorter than min_chars ({opts.min_chars})"
    elif opts.quality_filter and doc.type in PROSE_TYPES:
        reason = quality_problem(text)
    if reason is not None:
        stats.dropped += 1
        stats.first_drop_reason = stats.first_drop_reason or reason
        return None
    doc.text = text
    return doc


def sha256_text(text: str) -> str:
    """The document's content hash, used for `sha256` and exact dedup."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def minhash_signature(text: str) -> bytes:
    """MinHash of word 5-gram shingles as raw uint32 bytes (cheap to send between processes).

    The construction of datasketch's MinHash (128 hash functions over 32-bit shingle hashes,
    minimum per function) vectorised with numpy, with crc32 word hashes instead of one sha1 per
    shingle and multiply-shift hashing `(a*h + b) >> 32` (2-universal, no modulo) instead of
    `mod 2^61-1`: ~30x faster. The values load into `datasketch.MinHash(hashvalues=...,
    scheme="affine32")` for its LSH index.
    """
    import numpy as np

    words = text.lower().split() or [""]
    hw = np.fromiter((zlib.crc32(w.encode("utf-8", "replace")) for w in words), dtype=np.uint64, count=len(words))
    n = max(len(hw) - SHINGLE_WORDS + 1, 1)
    shingles = hw[:n].copy()
    for k in range(1, min(SHINGLE_WORDS, len(hw))):
        shingles = ((shingles * np.uint64(1_000_003)) ^ hw[k:k + n]) & np.uint64(0xFFFFFFFF)
    shingles = np.unique(shingles)
    a, b = _permutations()
    signature = np.full(NUM_PERM, 0xFFFFFFFF, dtype=np.uint64)
    for i in range(0, len(shingles), 4096):  # blocks bound memory to 4096 x 128 x 8 bytes
        block = shingles[i:i + 4096, None]
        hashed = (block * a + b) >> np.uint64(32)  # uint64 arithmetic wraps: multiply-shift
        signature = np.minimum(signature, hashed.min(axis=0))
    return signature.astype(np.uint32).tobytes()


_PERMS: list = []


def _permutations():
    """The NUM_PERM (a, b) pairs, fixed by seed 1 so every process computes the same ones."""
    if not _PERMS:
        import numpy as np

        gen = np.random.RandomState(1)
        a = gen.randint(0, 1 << 63, size=NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        b = gen.randint(0, 1 << 63, size=NUM_PERM, dtype=np.uint64)
        _PERMS.extend([a[None, :], b[None, :]])
    return _PERMS[0], _PERMS[1]


class Deduplicator:
    """Exact (sha256 set) and optional near (MinHash LSH) dedup, in the main process.

    Memory: the exact set holds 32 bytes per kept document plus set overhead (~100 bytes);
    the LSH index holds each document's band keys, about 1.5 KB per document (1M documents
    ~ 1.5 GB), which is why near dedup is opt-in (`--dedup near`).
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("exact", "near", "none"):
            raise ValueError(f"dedup mode {mode!r}: expected exact, near or none")
        self.mode = mode
        self.hashes: set[bytes] = set()
        self.lsh = None
        self._count = 0
        if mode == "near":
            try:
                from datasketch import MinHashLSH
            except ImportError:
                raise UserError("--dedup near needs datasketch: pip install 'datasketch>=2'") from None

            self.lsh = MinHashLSH(threshold=NEAR_DUP_THRESHOLD, num_perm=NUM_PERM)

    def add_known(self, sha256_hex: str) -> None:
        """Register a document already in the corpus (resume)."""
        self.hashes.add(bytes.fromhex(sha256_hex))

    def is_duplicate(self, sha256_hex: str, signature: bytes | None) -> bool:
        """True when the document repeats one already kept; otherwise remember it."""
        if self.mode == "none":
            return False
        key = bytes.fromhex(sha256_hex)
        if key in self.hashes:
            return True
        if self.lsh is not None and signature is not None:
            import numpy as np
            from datasketch import MinHash

            m = MinHash(num_perm=NUM_PERM, seed=1, scheme="affine32",
                        hashvalues=np.frombuffer(signature, dtype=np.uint32))
            if self.lsh.query(m):
                return True
            self.lsh.insert(self._count, m, check_duplication=False)
            self._count += 1
        self.hashes.add(key)
        return False
