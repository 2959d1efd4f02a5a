"""Token shards: `prepare` turns text into `train.bin`/`val.bin`; readers and batch samplers.

Driven by `scratchlm prepare INPUT... --out DATA_DIR` (which calls `prepare`); `scratchlm train`
and `scratchlm eval` read DATA_DIR through `load_meta`, `TokenData`, `sample_batch` and
`eval_windows`. See docs/data.md for the design.

DATA_DIR layout (format_version 1):
    train.bin, val.bin   raw token ids, numpy memmap, uint16 (vocab <= 65536) else uint32
    tokenizer.json       the HF tokenizer every later stage loads
    meta.json            tokenizer kind, vocab size, dtype, per-split tokens/documents/bytes, ...

Each document's tokens are followed by one end-of-text id and packed back to back; no padding
is ever written. Documents go to train or val by a seeded hash of their name; a corpus of one
document is cut by position instead: its last `val_fraction` of tokens are validation.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from scratchlm.errors import UserError
from scratchlm.files import read_json
from scratchlm.tokenizer import MIN_BPE_VOCAB, Tokenizer, train_bpe, train_char

FORMAT_VERSION = 1
SPLITS = ("train", "val")

# What a directory walk reads: text and source files by extension, plus well-known names.
TEXT_EXTENSIONS = frozenset(
    """
    .txt .text .md .markdown .rst .adoc .org .tex .log .csv .tsv .json .jsonl .yaml .yml .toml
    .ini .cfg .conf .xml .html .htm .css .scss .svg
    .py .pyi .pyx .ipynb .c .h .cc .cpp .cxx .hpp .hh .cu .cuh .java .kt .kts .scala .go .rs .swift
    .m .mm .cs .fs .js .jsx .mjs .cjs .ts .tsx .vue .svelte .rb .php .pl .pm .lua .r .jl .hs .ml
    .mli .clj .ex .exs .erl .dart .zig .nim .sh .bash .zsh .fish .ps1 .bat .sql .proto .graphql
    .cmake .mk .gradle .el .vim .f90 .asm .s
    """.split()
)
TEXT_NAMES = frozenset(
    "README LICENSE COPYING NOTICE AUTHORS CHANGELOG Makefile Dockerfile Jenkinsfile".split()
)
SKIP_DIRS = frozenset(
    ".git .hg .svn node_modules .venv venv __pycache__ .mypy_cache .pytest_cache .tox".split()
)
# Walked files whose name is neither a text extension nor a known text name (README, ...).
NOT_TEXT_BY_NAME = "not text or source by name"
SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")

_PIECE_CHARS = 1 << 18  # a long file is read and encoded in pieces of ~256 KiB, cut after "\n"
_BATCH_CHARS = 1 << 21  # characters per encode_batch call (HF parallelises across its pieces)
_SNIFF_BYTES = 8192  # NUL in the first 8 KiB means binary (git's rule)
_BAR_DELAY_S = 0.5  # quick runs and quick failures print no bar: an error stays one line


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --- reading inputs --------------------------------------------------------------------------


@dataclass
class _Piece:
    """Consecutive text of one document; `last` marks its end (an end-of-text follows)."""

    key: str  # the document's name, hashed for the train/val split
    text: str
    last: bool


@dataclass
class _Skips:
    """Inputs not used, by reason, with a few example paths to show the user."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: Path) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(str(path))

    def summary(self) -> str:
        text = ", ".join(
            f"{n} {reason} (e.g. {', '.join(self.examples[reason])})" for reason, n in self.counts.items()
        )
        if NOT_TEXT_BY_NAME in self.counts:
            text += "; `scratchlm ingest` reads PDFs, HTML, images and more into a corpus that prepare takes"
        return text


def _iter_pieces(inputs: Sequence[Path], out_dir: Path, skips: _Skips) -> Iterator[_Piece]:
    """Every document of `inputs` as pieces, in a deterministic order."""
    for path in inputs:
        if path.is_dir() and (path / "manifest.jsonl").is_file():
            yield from _corpus_pieces(path)
        elif path.is_dir():
            yield from _walk_pieces(path, out_dir, skips)
        else:
            yield from _file_pieces(path, path.name, explicit=True, skips=skips)


def _is_scratchlm_output(d: Path) -> bool:
    """A DATA_DIR or RUN_DIR: tokens, tokenizers and metrics are not documents."""
    return ((d / "meta.json").is_file() and (d / "train.bin").is_file()) or (
        (d / "config.json").is_file() and (d / "model.safetensors").is_file()
    )


def _walk_pieces(root: Path, out_dir: Path, skips: _Skips) -> Iterator[_Piece]:
    out_resolved = out_dir.resolve()
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: no symlink loops
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in SKIP_DIRS and (here / d).resolve() != out_resolved
            and not _is_scratchlm_output(here / d)
        )
        if here != root and (here / "manifest.jsonl").is_file():
            dirnames[:] = []  # an ingest corpus inside the tree: its documents, not its JSON
            yield from _corpus_pieces(here)
            continue
        for name in sorted(filenames):
            path = here / name
            if path.suffix.lower() not in TEXT_EXTENSIONS and name not in TEXT_NAMES:
                skips.add(NOT_TEXT_BY_NAME, path)  # counted, so that a folder of PDFs says why
                continue
            if not path.is_file():
                skips.add("not a regular file", path)
                continue
            key = f"{root.name}/{path.relative_to(root).as_posix()}"
            yield from _file_pieces(path, key, False, skips)


def _file_pieces(path: Path, key: str, explicit: bool, skips: _Skips) -> Iterator[_Piece]:
    """One file = one document. Non-UTF-8 or binary: an error if named, skipped if walked."""
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except OSError as e:
        if explicit:
            raise UserError(f"cannot read {path}: {e.strerror}") from e
        skips.add("unreadable", path)
        return
    with f:
        head = f.read(_SNIFF_BYTES)
        problem = "binary (contains NUL bytes)" if b"\0" in head else None
        if problem is None and size > _PIECE_CHARS:
            problem = _utf8_problem_streaming(f, head)  # check first: pieces must not leak out
        elif problem is None:
            data = head + f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 (invalid byte at offset {e.start})"
        if problem is not None:
            if explicit:
                raise UserError(
                    f"{path} is {problem}; prepare reads UTF-8 text: convert it (e.g. "
                    f"`iconv -f latin1 -t utf-8`) or extract its text with `scratchlm ingest`"
                )
            skips.add(problem.split(" (")[0], path)
            return
        if size <= _PIECE_CHARS:
            text = text.removeprefix("\ufeff")  # a BOM is an encoding mark, not text
            if text:
                yield _Piece(key, text, True)
            else:
                skips.add("empty", path)
            return
        f.seek(0)
        yield from _stream_pieces(f, key)


def _utf8_problem_streaming(f: io.BufferedReader, head: bytes) -> str | None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    block = head
    try:
        while block:
            decoder.decode(block)
            offset += len(block)
            block = f.read(_PIECE_CHARS)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        return f"not UTF-8 (invalid byte near offset {offset + e.start})"
    return None


def _stream_pieces(f: io.BufferedReader, key: str) -> Iterator[_Piece]:
    """A big file as ~256 KiB pieces cut after a newline (so BPE merges across cuts are rare)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    carry = ""
    while True:
        block = f.read(_PIECE_CHARS)
        carry += decoder.decode(block, final=not block)
        if not block:
            break
        cut = carry.rfind("\n") + 1
        if cut == 0 and len(carry) >= 4 * _PIECE_CHARS:
            cut = len(carry)  # one enormous line (minified code): cut anyway, memory stays bounded
        if len(carry) >= _PIECE_CHARS and cut > 0:
            yield _Piece(key, carry[:cut], False)
            carry = carry[cut:]
    yield _Piece(key, carry, True)  # may be "" when the file ends in "\n": still ends the doc


def _corpus_pieces(root: Path) -> Iterator[_Piece]:
    """Documents of a `scratchlm ingest` corpus: the `text` field of each line of its shards."""
    # Shards sit beside manifest.jsonl; ingest's hidden temp/state files never match part-*.
    shards = sorted(p for p in root.glob("part-*") if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
    if not shards:
        raise UserError(
            f"{root} has a manifest.jsonl but no part-*.jsonl[.gz|.zst] shards; "
            "re-run `scratchlm ingest` into it"
        )
    for shard in shards:
        with _open_shard(shard) as lines:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{shard}:{lineno} is not valid JSON ({e.msg}); re-run `scratchlm ingest`"
                    ) from e
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{shard}:{lineno} has no string `text` field; re-run `scratchlm ingest`")
                if not text:
                    continue
                # JSON may carry lone surrogates ("\ud800"), which are not encodable text.
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    text = text.encode("utf-8", "replace").decode("utf-8")
                key = str(record.get("id") or f"{shard.relative_to(root).as_posix()}:{lineno}")
                yield _Piece(key, text, True)


def _open_shard(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise UserError(f"reading {path} needs zstandard: pip install 'scratchlm[ingest]'") from e
        raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8")
    return path.open("r", encoding="utf-8")


# --- the train/val split ---------------------------------------------------------------------


def _doc_hash(seed: int, key: str) -> int:
    """A 64-bit hash of (seed, document name): stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


@dataclass
class _Scan:
    """What the first pass learns: counts, and the hash range needed to keep both splits non-empty."""

    documents: int = 0
    source_bytes: int = 0
    val_documents: int = 0
    min_hash: int = 1 << 64
    max_hash: int = -1
    complete: bool = False  # every input was read


# --- prepare ---------------------------------------------------------------------------------


def prepare(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer_kind: str = "bpe",
    vocab_size: int = 4096,
    val_fraction: float = 0.1,
    seed: int = 0,
    *,
    tokenizer_file: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into DATA_DIR `out_dir`; return the meta written to `meta.json`.

    Args:
        inputs: text files, directories (walked for text and source files), or `scratchlm ingest`
            corpus directories (recognised by their `manifest.jsonl`).
        out_dir: DATA_DIR; created if missing. Files are written under temporary names and
            renamed at the end, so a failure leaves no half-written data behind.
        tokenizer_kind: "bpe" (byte-level BPE of `vocab_size` ids) or "char" (`vocab_size` unused).
        vocab_size: BPE vocabulary size including the 2 special tokens; at least 258.
        val_fraction: share of documents (or, for a single document, of its tokens) for validation.
        seed: seeds the document-to-split hash.
        tokenizer_file: reuse this `tokenizer.json` (e.g. `RUN_DIR/tokenizer.json` of an imported
            or trained model, to fine-tune it) instead of training one; `tokenizer_kind` and
            `vocab_size` are then ignored.
        progress: show tqdm bars on stderr.

    Example:
        >>> meta = prepare(["notes/"], "data/notes", tokenizer_kind="char")  # doctest: +SKIP
        >>> meta["train"]["tokens"], meta["val"]["tokens"]  # doctest: +SKIP
    """
    if tokenizer_kind not in ("bpe", "char"):
        raise UserError(f"unknown tokenizer {tokenizer_kind!r}; choose bpe or char")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if tokenizer_kind == "bpe" and vocab_size < MIN_BPE_VOCAB:
        train_bpe([], vocab_size)  # raises the UserError that explains the minimum, before any reading
    if not inputs:
        raise UserError("no input given; pass text files, directories or an ingest corpus")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise UserError(f"input {p} does not exist")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")

    skips = _Skips()  # filled by pass 1; pass 2 meets the same files and does not recount
    scan = _Scan()
    given = Tokenizer.load(tokenizer_file) if tokenizer_file is not None else None
    tok = _scan_and_train(_iter_pieces(paths, out, skips), scan, tokenizer_kind, vocab_size, seed,
                          val_fraction, progress, given)
    if tok is None or scan.documents == 0:
        why = f" (skipped: {skips.summary()})" if skips.counts else ""
        raise UserError(
            f"no readable text in {', '.join(map(str, paths))}{why}; give UTF-8 text or source files"
        )
    if skips.counts:
        print(f"prepare: skipped {skips.summary()}", file=sys.stderr)

    single = scan.documents == 1
    threshold = int(val_fraction * (1 << 64))  # a document is val when its hash < threshold
    # Keep both splits non-empty when there are >= 2 documents: move the extreme document over.
    if scan.val_documents == 0:
        threshold = scan.min_hash + 1
    elif scan.val_documents == scan.documents:
        threshold = scan.max_hash

    # Pass 2: encode into temporary files, then rename them into place.
    dtype = token_dtype(tok.vocab_size)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    names = ("train.bin", "val.bin", "tokenizer.json", "meta.json")
    tmp = {name: out / f".{name}.tmp-{os.getpid()}" for name in names}
    try:
        with tqdm(total=scan.source_bytes, desc="prepare: encode", unit="B", unit_scale=True,
                  file=sys.stderr, disable=not progress, delay=_BAR_DELAY_S) as bar:
            stats = _encode_to_files(
                _iter_pieces(paths, out, _Skips()), tok, dtype, tmp["train.bin"], tmp["val.bin"],
                is_val=None if single else (lambda key: _doc_hash(seed, key) < threshold),
                on_bytes=bar.update,
            )
        if stats["train"]["documents"] + stats["val"]["documents"] != scan.documents:
            raise UserError("the inputs changed while prepare was reading them; run it again")
        if single:
            _cut_tail(tmp["train.bin"], tmp["val.bin"], dtype, val_fraction, tok, stats)
        for split in SPLITS:
            if stats[split]["tokens"] == 0:
                raise UserError(
                    f"the {split} split would be empty ({scan.documents} document(s)); "
                    "give more text or change --val-fraction"
                )
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tok.kind,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "eot_id": tok.eot_id,
            "pad_id": tok.pad_id,
            "train": stats["train"],
            "val": stats["val"],
            "documents": scan.documents,
            "source_bytes": stats["train"]["bytes"] + stats["val"]["bytes"],
            "split": "tail" if single else "documents",
            "val_fraction": val_fraction,
            "seed": seed,
            "inputs": [str(p) for p in paths],
            "skipped": dict(skips.counts),
        }
        tok.save(tmp["tokenizer.json"])
        tmp["meta.json"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        # meta.json goes last: a DATA_DIR with a meta.json is complete.
        (out / "meta.json").unlink(missing_ok=True)
        for name in names:
            os.replace(tmp[name], out / name)
    except BaseException:
        for t in tmp.values():
            t.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    return meta


def _scan_and_train(
    pieces: Iterator[_Piece], scan: _Scan, kind: str, vocab_size: int, seed: int,
    val_fraction: float, progress: bool, given: Tokenizer | None = None,
) -> Tokenizer | None:
    """Pass 1: stream every piece into the tokenizer trainer, filling `scan` on the way.

    Returns None when there was no text at all (the caller explains which inputs were empty).
    """
    threshold = int(val_fraction * (1 << 64))

    def texts() -> Iterator[str]:
        for piece in pieces:
            n = len(piece.text.encode("utf-8"))
            scan.source_bytes += n
            bar.update(n)
            if piece.last:
                scan.documents += 1
                h = _doc_hash(seed, piece.key)
                scan.val_documents += h < threshold
                scan.min_hash, scan.max_hash = min(scan.min_hash, h), max(scan.max_hash, h)
            yield piece.text
        scan.complete = True

    with tqdm(desc="prepare: tokenizer", unit="B", unit_scale=True, file=sys.stderr,
              disable=not progress, delay=_BAR_DELAY_S) as bar:
        if given is not None:  # scan only: the split statistics still come from this pass
            for _ in texts():
                pass
            return given
        try:
            return train_char(texts()) if kind == "char" else train_bpe(texts(), vocab_size)
        except UserError:
            if scan.complete and scan.documents == 0:  # train_char's "empty": caller says more
                return None
            raise


def _batches(pieces: Iterable[_Piece]) -> Iterator[list[_Piece]]:
    batch: list[_Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_to_files(
    pieces: Iterable[_Piece],
    tok: Tokenizer,
    dtype: np.dtype,
    train_path: Path,
    val_path: Path,
    is_val: Callable[[str], bool] | None,
    on_bytes: Callable[[int], object],
) -> dict[str, dict[str, int]]:
    """Encode pieces in batches, append each document + end-of-text to its split's file.

    `is_val=None` means a single document: everything goes to train, `_cut_tail` splits it.
    """
    token_bytes = tok.token_bytes()
    stats = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in SPLITS}
    eot = np.array([tok.eot_id], dtype=dtype)
    with open(train_path, "wb") as ftrain, open(val_path, "wb") as fval:
        files = {"train": ftrain, "val": fval}
        for batch in _batches(pieces):
            for piece, ids in zip(batch, tok.encode_batch_np([p.text for p in batch])):
                split = "val" if is_val is not None and is_val(piece.key) else "train"
                s = stats[split]
                files[split].write(ids.astype(dtype).tobytes())
                s["tokens"] += ids.size
                s["bytes"] += int(token_bytes[ids].sum())
                if piece.last:
                    s["documents"] += 1
                    if is_val is not None:  # a lone document needs no boundary
                        files[split].write(eot.tobytes())
                        s["tokens"] += 1
                on_bytes(len(piece.text.encode("utf-8")))
    return stats


def _cut_tail(
    train_path: Path, val_path: Path, dtype: np.dtype, val_fraction: float, tok: Tokenizer, stats: dict
) -> None:
    """Move the last `val_fraction` of the one document's tokens from train to val (nanoGPT's 90/10)."""
    n = stats["train"]["tokens"]
    k = int(n * (1.0 - val_fraction))
    if k == 0 or k == n:
        raise UserError(
            f"the only document has {n} tokens, too few to split with --val-fraction {val_fraction}; "
            "give more text or change --val-fraction"
        )
    token_bytes = tok.token_bytes()
    item = dtype.itemsize
    val_bytes = 0
    with open(train_path, "r+b") as src, open(val_path, "wb") as dst:
        src.seek(k * item)
        while block := src.read(_PIECE_CHARS * item):
            dst.write(block)
            val_bytes += int(token_bytes[np.frombuffer(block, dtype=dtype)].sum())
        src.truncate(k * item)
    total_bytes = stats["train"]["bytes"]
    stats["train"] = {"tokens": k, "documents": 1, "bytes": total_bytes - val_bytes}
    stats["val"] = {"tokens": n - k, "documents": 1, "bytes": val_bytes}


# --- reading DATA_DIR ------------------------------------------------------------------------


def load_meta(data_dir: str | os.PathLike) -> dict:
    """The `meta.json` of a prepared DATA_DIR; a missing or foreign one is a `UserError`."""
    d = Path(data_dir)
    hint = f"run `scratchlm prepare INPUT... --out {d}` first"
    if not d.is_dir():
        raise UserError(f"data directory {d} does not exist; {hint}")
    path = d / "meta.json"
    if not path.is_file():
        raise UserError(f"{d} has no meta.json, so it is not a prepared data directory; {hint}")
    meta = read_json(path, hint)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise UserError(
            f"{path} is not a scratchlm data directory of format {FORMAT_VERSION} "
            f"(format_version {found!r}); {hint}"
        )
    missing = [k for k in ("tokenizer", "vocab_size", "dtype", "train", "val") if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {hint}")
    return meta


class TokenData:
    """One split of a DATA_DIR as a read-only memmap of token ids.

    Example:
        >>> data = TokenData("data/shakespeare", "train")  # doctest: +SKIP
        >>> len(data), data.tokens[:8], data.bytes_per_token  # doctest: +SKIP
    """

    def __init__(self, data_dir: str | os.PathLike, split: str) -> None:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = load_meta(self.data_dir)
        info = self.meta[split]
        path = self.data_dir / f"{split}.bin"
        dtype = np.dtype(self.meta["dtype"])
        expected = int(info["tokens"]) * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected or expected == 0:
            raise UserError(
                f"{path} is missing or does not match meta.json ({expected} bytes expected); "
                f"run `scratchlm prepare` again"
            )
        self.tokens: np.memmap = np.memmap(path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 source bytes per token in this split: bits/byte = nats/token / ln 2 / this."""
        info = self.meta[self.split]
        return info["bytes"] / info["tokens"]

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / "tokenizer.json"


def _windows(
    tokens: np.ndarray, offsets: np.ndarray, context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    idx = offsets[:, None] + np.arange(context_length + 1)  # (B, T+1)
    buf = torch.from_numpy(tokens[idx].astype(np.int64))  # (B, T+1)
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # x, y: (B, T)


def _check_length(data: TokenData, context_length: int) -> None:
    if len(data) < context_length + 1:
        raise UserError(
            f"the {data.split} split has {len(data)} tokens, fewer than context_length + 1 = "
            f"{context_length + 1}; use a shorter context_length or more text"
        )


def sample_batch(
    data: TokenData,
    batch_size: int,
    context_length: int,
    seed: int,
    step: int,
    micro_step: int = 0,
    rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows `(x, y)`, int64 (B, T), y = x shifted by one token.

    The offsets depend only on (seed, step, micro_step, rank), so a resumed run draws exactly
    the batches it would have drawn, and each DDP rank draws its own.
    """
    _check_length(data, context_length)
    if min(seed, step, micro_step, rank) < 0:
        raise UserError("seed, step, micro_step and rank must be non-negative integers")
    rng = np.random.default_rng([seed, step, micro_step, rank])
    offsets = rng.integers(0, len(data) - context_length, size=batch_size)  # start <= n - T - 1
    return _windows(data.tokens, offsets, context_length)


def eval_windows(
    data: TokenData, context_length: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows of the split, `batch_size` per batch.

    Window i predicts tokens i*T+1 .. i*T+T. The last batch may have fewer rows; the final
    (n - 1) % T tokens that do not fill a window are left out. Without `max_batches` the
    windows cover the whole split in order. With it, max_batches * batch_size windows spread
    evenly over the split: the same ones every time, so evaluations compare, and a fair sample
    of the split rather than its beginning (which may be easier or harder than the rest).
    """
    _check_length(data, context_length)
    n_windows = (len(data) - 1) // context_length
    starts = np.arange(n_windows, dtype=np.int64) * context_length
    if max_batches is not None and max_batches * batch_size < n_windows:
        pick = np.linspace(0, n_windows - 1, max_batches * batch_size).round().astype(np.int64)
        starts = starts[pick]
    for i in range(0, len(starts), batch_size):
        yield _windows(data.tokens, starts[i : i + batch_size], context_length)
