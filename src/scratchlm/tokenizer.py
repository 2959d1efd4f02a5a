"""Tokenizers: byte-level BPE and per-character, both stored as one Hugging Face `tokenizer.json`.

Driven by `scratchlm prepare` (through `scratchlm.dataset.prepare`), which trains one with
`train_bpe` or `train_char` and saves it into DATA_DIR; training, evaluation, generation and
serving all load that same file with `Tokenizer.load`.

Ids, for both kinds:
- bpe: 0..255 are the 256 byte symbols (so any text encodes), then the learned merges, then
  `<|endoftext|>` and `<|pad|>` at the end of the vocabulary (never inside 0..255).
- char: the distinct characters of the training text sorted by code point, then
  `<|endoftext|>` and `<|pad|>`. A character the tokenizer never saw is an error, not an unk.

Text that happens to contain the literal string `<|endoftext|>` encodes as ordinary text: the
special ids come only from code that inserts them on purpose (document packing, padding).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from scratchlm.errors import UserError
from scratchlm.files import atomic_write_text

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)

# One pre-token per code point, newlines included ([\s\S], since Oniguruma's "." skips "\n").
_CHAR_SPLIT = r"[\s\S]"


class Tokenizer:
    """A trained tokenizer of kind "bpe" or "char", wrapping an HF `tokenizers.Tokenizer`.

    Example:
        >>> tok = train_char(["hello world"])
        >>> tok.decode(tok.encode("hello")) == "hello"
        True
    """

    def __init__(self, hf: HFTokenizer) -> None:
        self._hf = hf
        self.kind = _kind_of(json.loads(hf.to_str()))
        self._from_symbol: dict[str, int] | None = None  # byte-level symbol -> byte, when needed
        # Added tokens (ours are the two special ones; imported tokenizers may add more) are
        # plain text, not byte-level symbols.
        self._added = set(hf.get_added_tokens_decoder())
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if any(i is None for i in ids):
            raise UserError(
                f"tokenizer has no {EOT} / {PAD} special tokens, so it was not made by scratchlm; "
                "run `scratchlm prepare` to build one"
            )
        self.eot_id, self.pad_id = int(ids[0]), int(ids[1])
        # Literal "<|endoftext|>" in a document is text, never a document boundary.
        self._hf.encode_special_tokens = True
        self._char_table: np.ndarray | None = None
        if self.kind == "char":
            self._char_table = _char_lookup_table(hf)

    # --- files -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json` written by `save`; anything else is a `UserError`."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} not found; run `scratchlm prepare` to create one")
        return cls.from_str(path.read_text(encoding="utf-8"), source=str(path))

    @classmethod
    def from_str(cls, text: str, source: str = "tokenizer") -> Tokenizer:
        """Build from the JSON text of a `tokenizer.json`."""
        try:
            json.loads(text)
            hf = HFTokenizer.from_str(text)
        # HF tokenizers raises plain Exception for a malformed file; json raises ValueError.
        except Exception as e:  # noqa: BLE001 - re-raised as a one-line user error
            raise UserError(f"{source} is not a valid tokenizer.json ({str(e)[:200]})") from e
        return cls(hf)

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` atomically (temp file in the same directory, then rename)."""
        path = Path(path)
        atomic_write_text(path, self.to_str())

    def to_str(self) -> str:
        """The `tokenizer.json` text."""
        return self._hf.to_str(pretty=True)

    @property
    def hf(self) -> HFTokenizer:
        """The wrapped Hugging Face tokenizer (for export; do not mutate)."""
        return self._hf

    # --- encode / decode --------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never adds special tokens. A lone surrogate (which JSON's
        "\\ud800" and undecodable command-line bytes can produce) is a UserError."""
        if self._char_table is not None:
            return self._encode_chars(text).tolist()
        try:
            text.encode("utf-8")  # HF tokenizers raise a TypeError on a lone surrogate
        except UnicodeEncodeError as e:
            raise UserError(f"the text holds a lone surrogate (U+{ord(text[e.start]):04X}) at "
                            f"character {e.start}, which is not Unicode text") from None
        # Through the batch call: HF's single-text encode holds the interpreter lock throughout
        # (a server's event loop stalls for the whole of a long text), the batch call lets go.
        return self._encode_batch_hf([text])[0].ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in HF tokenizers)."""
        if self._char_table is not None:
            return [self._encode_chars(t).tolist() for t in texts]
        return [e.ids for e in self._encode_batch_hf(texts)]

    def encode_batch_np(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_batch` returning int64 arrays (what `prepare` writes; skips list building)."""
        if self._char_table is not None:
            return [self._encode_chars(t) for t in texts]
        return [np.asarray(e.ids, dtype=np.int64) for e in self._encode_batch_hf(texts)]

    def _encode_batch_hf(self, texts: Sequence[str]) -> list:
        # encode_batch_fast (tokenizers >= 0.21) skips computing offsets we never use.
        fast = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return fast(list(texts), add_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Special tokens show as their names unless `skip_special_tokens`.

        A BPE id sequence cut in the middle of a multi-byte character decodes that character
        as U+FFFD, as every byte-level tokenizer does.
        """
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for special tokens), indexed by id: for bits per byte."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i not in (self.eot_id, self.pad_id):
                out[i] = len(self.bytes_of(i))
        return out

    def bytes_of(self, i: int) -> bytes:
        """The exact bytes token `i` stands for, also when that is part of a character (a
        byte-level token); a special token's are its name's."""
        token = self._hf.id_to_token(i)
        if token is None:  # a model row beyond the tokenizer's ids (vocab_size rounded up)
            return b""
        if self.kind == "bpe" and i not in self._added:
            if self._from_symbol is None:
                self._from_symbol = {c: b for b, c in byte_level_table().items()}
            return bytes(self._from_symbol[c] for c in token)
        return token.encode("utf-8")

    def _encode_chars(self, text: str) -> np.ndarray:
        # Same mapping as the HF WordLevel model in tokenizer.json (one id per code point),
        # done as one numpy gather: ~100x faster than HF's per-character pre-tokenizer.
        table = self._char_table
        assert table is not None
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if cps.size == 0:
            return np.zeros(0, dtype=np.int64)
        known = cps < table.size
        ids = np.full(cps.shape, -1, dtype=np.int64)
        ids[known] = table[cps[known]]
        if (ids < 0).any():
            unseen = sorted({chr(c) for c in cps[ids < 0].tolist()})
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unseen[:10])
            more = f" and {len(unseen) - 10} more" if len(unseen) > 10 else ""
            raise UserError(
                f"the char tokenizer never saw the character(s) {shown}{more}; use only characters "
                "from its training text, or prepare the data with `--tokenizer bpe`"
            )
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def byte_level_table() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE tokens are made of)."""
    printable = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    bs = [b for lo, hi in printable for b in range(ord(lo), ord(hi) + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# --- training --------------------------------------------------------------------------------


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of `vocab_size` ids (special tokens included).

    `texts` is consumed once, as a stream. A small corpus may run out of merges, giving fewer
    ids than asked for; `Tokenizer.vocab_size` is the real count.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise UserError(
            f"--vocab-size {vocab_size} is too small for byte-level BPE: it needs at least "
            f"{MIN_BPE_VOCAB} (256 byte ids + {len(SPECIAL_TOKENS)} special tokens)"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes -> ids 0..255
        special_tokens=[],  # added after training so they land after the merges, not at 0
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(hf)


def train_char(texts: Iterable[str]) -> Tokenizer:
    """Build a character tokenizer: the distinct characters of `texts` plus the special tokens."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise UserError("no text to build a char tokenizer from; the corpus is empty")
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))  # unk is never in the vocab
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(_CHAR_SPLIT), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(hf)


# --- helpers ---------------------------------------------------------------------------------


def _kind_of(spec: dict) -> str:
    """"bpe" or "char" from the structure of a tokenizer.json; a foreign layout is a UserError."""
    model = (spec.get("model") or {}).get("type")
    pre = spec.get("pre_tokenizer") or {}
    dec = (spec.get("decoder") or {}).get("type")
    if model == "BPE" and pre.get("type") == "ByteLevel" and dec == "ByteLevel":
        return "bpe"
    if model == "WordLevel" and pre.get("type") == "Split" and dec == "Fuse":
        return "char"
    raise UserError(
        f"tokenizer.json is not a scratchlm tokenizer (model {model}, pre-tokenizer "
        f"{pre.get('type')}, decoder {dec}); run `scratchlm prepare` to build one"
    )


def _char_lookup_table(hf: HFTokenizer) -> np.ndarray:
    """Dense code point -> id table (-1 where unknown) for the char model's vocabulary."""
    specials = set(SPECIAL_TOKENS)
    vocab = {t: i for t, i in hf.get_vocab(with_added_tokens=True).items() if t not in specials}
    if any(len(t) != 1 for t in vocab):
        raise UserError("char tokenizer.json has multi-character tokens; it was not made by scratchlm")
    cps = {ord(t): i for t, i in vocab.items()}
    table = np.full(max(cps) + 1, -1, dtype=np.int32)
    table[list(cps)] = list(cps.values())
    return table
