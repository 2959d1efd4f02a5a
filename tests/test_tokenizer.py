"""Tokenizer tests: round-trips, special-token ids, unknown characters, save/load, foreign files."""

from __future__ import annotations

import json
import random

import pytest

from scratchlm.errors import UserError
from scratchlm.tokenizer import EOT, PAD, Tokenizer, train_bpe, train_char

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n" * 20,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 10,
    "Fünf Äpfel, naïve café; 世界你好; Привет мир; 😀🎉👍🏽\r\n" * 5,
]

VARIED = [
    "",
    " ",
    "\n",
    "\r\n\r\n",
    "  leading and trailing  ",
    "tabs\tand\x0bvertical\x0cfeeds",
    "control \x00\x01\x07\x1b[31m red \x7f",
    "emoji 😀🎉 family 👨‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "CJK 漢字かなカナ 한국어",
    "RTL עברית العربية and combining e\u0301 a\u0308",
    "private use \ue000 and max \U0010ffff and BOM \ufeff",
    "literal <|endoftext|> and <|pad|> in text",
    "numbers 1234567890 3.14159 -0 1e10",
    "mixed\r\nline\rendings\n",
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    """Random unicode strings (no surrogates: they are not encodable text)."""
    rng = random.Random(seed)
    pools = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(pools)
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(iter(CORPUS), vocab_size=320)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return train_char(iter(CORPUS))


def test_bpe_roundtrips_any_unicode(bpe: Tokenizer) -> None:
    for s in VARIED + _random_strings(300):
        assert bpe.decode(bpe.encode(s)) == s, repr(s)


def test_token_bytes_join_into_the_text(bpe: Tokenizer, char: Tokenizer) -> None:
    """Each token's own bytes (also half a character's) joined give the text's UTF-8."""
    for s in VARIED + _random_strings(100):
        assert b"".join(bpe.bytes_of(i) for i in bpe.encode(s)) == s.encode("utf-8"), repr(s)
    for s in CORPUS:
        assert b"".join(char.bytes_of(i) for i in char.encode(s)) == s.encode("utf-8")
    assert bpe.bytes_of(bpe.eot_id) == EOT.encode() and char.bytes_of(char.pad_id) == PAD.encode()
    # A model may have more rows than its tokenizer has ids: those stand for no bytes.
    assert bpe.bytes_of(bpe.vocab_size + 3) == b"" and char.bytes_of(char.vocab_size) == b""


def test_bpe_encode_batch_matches_encode(bpe: Tokenizer) -> None:
    texts = VARIED + _random_strings(20, seed=1)
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
    assert [a.tolist() for a in bpe.encode_batch_np(texts)] == [bpe.encode(t) for t in texts]


def test_bpe_special_ids_outside_byte_range(bpe: Tokenizer) -> None:
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 320
    assert {bpe.eot_id, bpe.pad_id} == {318, 319}  # at the end of the vocabulary
    # ids 0..255 are exactly the 256 single-byte symbols
    vocab = bpe.hf.get_vocab()
    byte_ids = sorted(i for t, i in vocab.items() if len(t) == 1 and i < 256)
    assert byte_ids == list(range(256))
    assert bpe.token_bytes()[:256].tolist() == [1] * 256
    assert bpe.token_bytes()[bpe.eot_id] == 0


def test_literal_special_text_is_not_a_special_id(bpe: Tokenizer, char: Tokenizer) -> None:
    ids = bpe.encode("a <|endoftext|> b <|pad|>")
    assert bpe.eot_id not in ids and bpe.pad_id not in ids
    # decode shows special ids by name; skip_special_tokens drops them
    assert bpe.decode([*bpe.encode("hi"), bpe.eot_id]) == "hi" + EOT
    assert bpe.decode([*bpe.encode("hi"), bpe.eot_id], skip_special_tokens=True) == "hi"
    c = train_char(["<|endoftext|> text"])
    assert c.eot_id not in c.encode("<|endoftext|>")


def test_bpe_vocab_too_small() -> None:
    with pytest.raises(UserError, match="at least 258"):
        train_bpe(iter(CORPUS), vocab_size=257)


def test_bpe_trains_from_a_stream() -> None:
    consumed = []

    def gen():
        for t in CORPUS:
            consumed.append(len(t))
            yield t

    tok = train_bpe(gen(), vocab_size=300)
    assert len(consumed) == len(CORPUS)
    assert tok.decode(tok.encode(CORPUS[2])) == CORPUS[2]


def test_char_roundtrip_and_ids(char: Tokenizer) -> None:
    chars = sorted(set("".join(CORPUS)))
    assert char.kind == "char"
    assert char.vocab_size == len(chars) + 2
    assert char.eot_id == len(chars) and char.pad_id == len(chars) + 1
    for text in CORPUS + [" \n\r\n", "😀 世界"]:
        ids = char.encode(text)
        assert len(ids) == len(text)
        assert char.decode(ids) == text
    # the numpy fast path is the same mapping as the HF model stored in tokenizer.json
    assert char.encode(CORPUS[2]) == char.hf.encode(CORPUS[2], add_special_tokens=False).ids
    assert char.encode_batch(CORPUS) == [char.encode(t) for t in CORPUS]
    assert char.token_bytes()[char.encode("😀")[0]] == 4


def test_char_unknown_character_names_it(char: Tokenizer) -> None:
    with pytest.raises(UserError, match=r"'Z' \(U\+005A\).*'🦀' \(U\+1F980\)"):
        char.encode("Zebra 🦀")
    with pytest.raises(UserError, match="never saw"):
        char.encode_batch(["fox", "ZZ"])


def test_a_lone_surrogate_is_a_user_error(bpe: Tokenizer, char: Tokenizer) -> None:
    """JSON's "\\ud800" and undecodable command-line bytes give strings that are not Unicode
    text; HF tokenizers would raise a TypeError (a 500 in the server)."""
    for tok in (bpe, char):
        with pytest.raises(UserError, match=r"surrogate|never saw"):
            tok.encode("a\ud800b")


def test_char_empty_corpus() -> None:
    with pytest.raises(UserError, match="empty"):
        train_char(iter(["", ""]))


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_load_same_ids(kind: str, tmp_path, bpe: Tokenizer, char: Tokenizer) -> None:
    tok = bpe if kind == "bpe" else char
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.kind == kind  # recovered from tokenizer.json alone
    assert (loaded.vocab_size, loaded.eot_id, loaded.pad_id) == (tok.vocab_size, tok.eot_id, tok.pad_id)
    for text in CORPUS:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode("x <|endoftext|>" if kind == "bpe" else "fox") == tok.encode(
        "x <|endoftext|>" if kind == "bpe" else "fox"
    )
    assert loaded.to_str() == tok.to_str()
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left by the atomic write


def test_load_missing_corrupt_or_foreign(tmp_path, bpe: Tokenizer) -> None:
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)
    # A well-formed HF tokenizer of another layout (WordPiece-like WordLevel + whitespace split)
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    hf = HF(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign = tmp_path / "foreign.json"
    foreign.write_text(hf.to_str())
    with pytest.raises(UserError, match="not a scratchlm tokenizer"):
        Tokenizer.load(foreign)
    # Our layout but without the special tokens (e.g. hand-edited)
    spec = json.loads(bpe.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != PAD]
    nopad = tmp_path / "nopad.json"
    nopad.write_text(json.dumps(spec))
    with pytest.raises(UserError, match="special tokens"):
        Tokenizer.load(nopad)


def test_added_tokens_have_their_texts_bytes(bpe: Tokenizer) -> None:
    """An imported tokenizer's added tokens are plain text, not byte-level symbols."""
    from tokenizers import AddedToken

    hf = Tokenizer.from_str(bpe.to_str()).hf
    hf.add_tokens([AddedToken("    "), AddedToken("héllo wörld")])
    tok = Tokenizer.from_str(hf.to_str())
    four, word = tok.vocab_size - 2, tok.vocab_size - 1
    assert tok.bytes_of(four) == b"    " and tok.bytes_of(word) == "héllo wörld".encode()
    assert tok.token_bytes()[word] == len("héllo wörld".encode())


def test_encoding_a_long_text_lets_other_threads_run(bpe: Tokenizer) -> None:
    """What keeps a server's event loop answering while one long prompt is tokenized in a worker
    thread: HF's single-text encode holds the interpreter lock throughout; ours does not."""
    import threading
    import time

    rng = random.Random(0)
    text = " ".join(rng.choice(["hello", "world", "quick", "brownish", "zzz"]) for _ in range(200_000))
    worker = threading.Thread(target=bpe.encode, args=(text,))
    t0 = time.perf_counter()
    worker.start()
    turns = 0
    while worker.is_alive():
        time.sleep(0.001)
        turns += 1
    elapsed = time.perf_counter() - t0
    # One turn per ~1 ms of sleep when the lock is free; with it held, a turn or two in all.
    assert turns >= min(20, elapsed / 0.01), (turns, elapsed)
