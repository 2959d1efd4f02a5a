"""Data preparation tests: split rules, packing, dtypes, input kinds, streaming, samplers, bad input."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import scratchlm.dataset as ds
from scratchlm.dataset import TokenData, eval_windows, load_meta, prepare, sample_batch, token_dtype
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer

POEM = (
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\r\nAnd summer's lease hath all too short a date;\n"
    "Größe, 世界, 😀.\n"
)


def _docs(tmp_path: Path, n: int = 12) -> Path:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        (root / ("sub" if i % 2 else "") / f"doc{i:02d}.md").write_text(f"# Doc {i}\n" + POEM * (i + 1))
    return root


def _bin(d: Path, split: str) -> np.ndarray:
    meta = load_meta(d)
    return np.fromfile(d / f"{split}.bin", dtype=meta["dtype"])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_single_document_val_is_last_fraction(tmp_path: Path, kind: str) -> None:
    text = POEM * 40
    src = tmp_path / "one.txt"
    src.write_text(text, encoding="utf-8")
    meta = prepare([str(src)], tmp_path / "data", kind, vocab_size=300, val_fraction=0.1, progress=False)
    tok = Tokenizer.load(tmp_path / "data" / "tokenizer.json")
    ids = tok.encode(text)
    n = len(ids)
    assert meta["split"] == "tail" and meta["documents"] == 1
    assert meta["train"]["tokens"] == int(n * 0.9)  # nanoGPT's data[:int(n*0.9)]
    assert meta["val"]["tokens"] == n - int(n * 0.9)
    train, val = _bin(tmp_path / "data", "train"), _bin(tmp_path / "data", "val")
    assert np.concatenate([train, val]).tolist() == ids  # nothing added, nothing lost
    b = len(text.encode("utf-8"))
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == meta["source_bytes"] == b
    assert meta["val"]["bytes"] == len(tok.decode(val.tolist()).encode("utf-8"))
    assert TokenData(tmp_path / "data", "val").bytes_per_token == meta["val"]["bytes"] / meta["val"]["tokens"]
    assert not list((tmp_path / "data").glob(".*"))  # no temp files left


def test_documents_packed_with_eot_and_split_by_document(tmp_path: Path) -> None:
    root = _docs(tmp_path)
    meta = prepare([str(root)], tmp_path / "data", "bpe", vocab_size=300, progress=False)
    tok = Tokenizer.load(tmp_path / "data" / "tokenizer.json")
    assert meta["split"] == "documents" and meta["documents"] == 12
    assert meta["train"]["documents"] + meta["val"]["documents"] == 12
    assert meta["train"]["documents"] > 0 and meta["val"]["documents"] > 0
    expected = {f"# Doc {i}\n" + POEM * (i + 1) for i in range(12)}
    seen = []
    for split in ("train", "val"):
        ids = _bin(tmp_path / "data", split)
        assert tok.pad_id not in ids  # no padding is ever written
        assert ids[-1] == tok.eot_id  # every document ends with end-of-text
        assert int((ids == tok.eot_id).sum()) == meta[split]["documents"]
        docs = tok.decode(ids.tolist()).split("<|endoftext|>")[:-1]
        seen += docs
        assert meta[split]["bytes"] == sum(len(d.encode()) for d in docs)
    assert sorted(seen) == sorted(expected)
    assert meta["source_bytes"] == sum(len(t.encode()) for t in expected)
    # the split is a fixed function of the seed: same seed, same files
    prepare([str(root)], tmp_path / "again", "bpe", vocab_size=300, progress=False)
    for split in ("train", "val"):
        assert (_bin(tmp_path / "again", split) == _bin(tmp_path / "data", split)).all()


def test_val_never_empty_with_two_documents(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"d{i}.txt").write_text(POEM * 3)
    for seed in range(5):  # with val_fraction 0.01 the hash alone would put both in train
        meta = prepare([str(tmp_path / "d0.txt"), str(tmp_path / "d1.txt")], tmp_path / "o", "char",
                       val_fraction=0.01, seed=seed, progress=False)
        assert (meta["train"]["documents"], meta["val"]["documents"]) == (1, 1)


def test_token_dtype_choice(tmp_path: Path) -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    # End to end: a char corpus with more than 65534 distinct characters needs uint32 ids.
    cps = [c for c in range(0x20, 0x2FFFF) if not 0xD800 <= c <= 0xDFFF][:66000]
    text = "".join(map(chr, cps))
    (tmp_path / "a.txt").write_text(text[: len(text) // 2])
    (tmp_path / "b.txt").write_text(text[len(text) // 2 :])
    meta = prepare([str(tmp_path)], tmp_path / "data", "char", progress=False)
    assert meta["vocab_size"] == 66002 and meta["dtype"] == "uint32"
    ids = np.concatenate([TokenData(tmp_path / "data", s).tokens for s in ("train", "val")])
    assert ids.max() == 66000  # the eot id; above 65535 survives the round-trip


def _write_corpus(root: Path) -> list[str]:
    root.mkdir()
    texts = [f"record {i}: " + POEM for i in range(6)]
    # the manifest describes inputs; its text must never become training data
    manifest = {"source": "x.pdf", "status": "ok", "text": "§§§"}
    (root / "manifest.jsonl").write_text(json.dumps(manifest) + "\n")
    recs = [{"id": f"r{i}", "text": t, "source": f"s{i}.txt", "type": "text"} for i, t in enumerate(texts)]
    (root / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:3]) + "\n")
    with gzip.open(root / "part-00001.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs[3:5])
    try:
        import zstandard
    except ImportError:
        with gzip.open(root / "part-00002.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(json.dumps(recs[5]) + "\n")
    else:
        data = zstandard.ZstdCompressor().compress(json.dumps(recs[5]).encode())
        (root / "part-00002.jsonl.zst").write_bytes(data)
    return texts


def test_ingest_corpus_input(tmp_path: Path) -> None:
    texts = _write_corpus(tmp_path / "corpus")
    meta = prepare([str(tmp_path / "corpus")], tmp_path / "data", "char", progress=False)
    tok = Tokenizer.load(tmp_path / "data" / "tokenizer.json")
    assert meta["documents"] == 6
    assert "§" not in tok.hf.get_vocab()
    docs = []
    for split in ("train", "val"):
        docs += tok.decode(_bin(tmp_path / "data", split).tolist()).split("<|endoftext|>")[:-1]
    assert sorted(docs) == sorted(texts)
    # JSON can carry a lone surrogate, which is not encodable text: it becomes "?"
    sur = tmp_path / "sur"
    sur.mkdir()
    (sur / "manifest.jsonl").write_text("")
    (sur / "part-00000.jsonl").write_text('{"text": "lone \\ud800 here"}\n{"text": "fine"}\n')
    prepare([str(sur)], tmp_path / "sdata", "char", progress=False)
    tok = Tokenizer.load(tmp_path / "sdata" / "tokenizer.json")
    both = np.concatenate([_bin(tmp_path / "sdata", s) for s in ("train", "val")])
    assert "lone ? here" in tok.decode(both.tolist())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="no part-"):
        prepare([str(bad)], tmp_path / "o", "char", progress=False)
    (bad / "part-00000.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"part-00000.jsonl:2 has no string `text`"):
        prepare([str(bad)], tmp_path / "o", "char", progress=False)


def test_walk_skips_binaries_vcs_and_non_utf8(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    for d in (".git", "node_modules/pkg", ".venv", "__pycache__", "src"):
        (root / d).mkdir(parents=True)
    (root / ".git" / "config.txt").write_text("Ⓖ in .git")
    (root / "node_modules" / "pkg" / "index.js").write_text("Ⓝ in node_modules")
    (root / "__pycache__" / "x.py").write_text("Ⓒ in __pycache__")
    (root / "src" / "main.py").write_text("print('hello')\n" * 20)
    (root / "README").write_text("read me\n" * 20)
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # not a text extension
    (root / "data.txt").write_bytes(b"text\x00with NUL")  # binary despite its name
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    out = root / "prepared"  # DATA_DIR inside the input: never read back
    prepare([str(root)], out, "char", progress=False)
    meta = prepare([str(root)], out, "char", progress=False)
    assert meta["documents"] == 2
    # nor is another DATA_DIR in the tree; an ingest corpus in the tree gives its documents
    prepare([str(root)], root / "other", "char", progress=False)
    _write_corpus(root / "corpus")
    assert prepare([str(root)], out, "char", progress=False)["documents"] == 2 + 6
    assert meta["skipped"] == {"binary": 1, "not UTF-8": 1, "not text or source by name": 1}
    vocab = Tokenizer.load(out / "tokenizer.json").hf.get_vocab()
    for letter in "ⒼⓃⒸé§":
        assert letter not in vocab
    # named on the command line, a non-UTF-8 or binary file is an error, not a skip
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 \(invalid byte at offset 3\)"):
        prepare([str(root / "latin1.txt")], tmp_path / "o", "char", progress=False)
    with pytest.raises(UserError, match="binary"):
        prepare([str(root / "data.txt")], tmp_path / "o", "char", progress=False)


def test_large_file_streams_in_pieces_and_memory_is_flat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pieces and batches so that a few MB of text already spans many of them.
    monkeypatch.setattr(ds, "_PIECE_CHARS", 1 << 14)
    monkeypatch.setattr(ds, "_BATCH_CHARS", 1 << 16)
    line = "All the world's a stage, and all the men and women merely players; ünïcödé 😀\n"

    def peak_for(n_lines: int, name: str) -> tuple[int, dict]:
        src = tmp_path / f"{name}.txt"
        src.write_text(line * n_lines, encoding="utf-8")
        tracemalloc.start()
        meta = prepare([str(src)], tmp_path / name, "char", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        text = src.read_text(encoding="utf-8")
        ids = np.concatenate([_bin(tmp_path / name, "train"), _bin(tmp_path / name, "val")])
        assert Tokenizer.load(tmp_path / name / "tokenizer.json").decode(ids.tolist()) == text
        return peak, meta

    small, _ = peak_for(10_000, "small")  # ~0.8 MB of text, ~50 pieces
    big, meta = peak_for(80_000, "big")  # ~6.7 MB of text, ~400 pieces
    assert big < 1.25 * small + (256 << 10), (small, big)  # flat: not proportional to the corpus
    assert big < meta["source_bytes"] / 2, (big, meta["source_bytes"])


def test_huge_line_is_cut_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "_PIECE_CHARS", 1 << 12)
    text = "\ufeff" + "minified();" * 5000 + "\r\n" + "é" * 30000  # BOM dropped, rest kept
    (tmp_path / "big.js").write_text(text, encoding="utf-8")
    pieces = list(ds._iter_pieces([tmp_path / "big.js"], tmp_path / "out", ds._Skips()))
    assert len(pieces) > 3 and max(len(p.text) for p in pieces) <= 5 * (1 << 12)
    for kind in ("char", "bpe"):
        prepare([str(tmp_path / "big.js")], tmp_path / kind, kind, vocab_size=300, progress=False)
        tok = Tokenizer.load(tmp_path / kind / "tokenizer.json")
        ids = np.concatenate([_bin(tmp_path / kind, "train"), _bin(tmp_path / kind, "val")])
        assert tok.decode(ids.tolist()) == text[1:]


def _data(tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "one.txt"
    src.write_text(POEM * 30)
    prepare([str(src)], tmp_path / "data", "char", progress=False)
    return tmp_path / "data"


def test_sample_batch_is_a_pure_function(tmp_path: Path) -> None:
    data = TokenData(_data(tmp_path), "train")
    x, y = sample_batch(data, 8, 16, seed=1, step=3)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = sample_batch(TokenData(data.data_dir, "train"), 8, 16, seed=1, step=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    others = [sample_batch(data, 8, 16, 1, 4)[0], sample_batch(data, 8, 16, 2, 3)[0],
              sample_batch(data, 8, 16, 1, 3, micro_step=1)[0], sample_batch(data, 8, 16, 1, 3, rank=1)[0]]
    for o in others:
        assert not torch.equal(o, x)
    # windows are real slices of the split
    tokens = torch.from_numpy(data.tokens.astype(np.int64))
    row = x[0]
    starts = [i for i in range(len(tokens) - 16) if torch.equal(tokens[i : i + 16], row)]
    assert starts
    with pytest.raises(UserError, match="fewer than context_length"):
        sample_batch(data, 2, len(data), 0, 0)


def test_eval_windows_cover_in_order(tmp_path: Path) -> None:
    data = TokenData(_data(tmp_path), "val")
    T, B = 16, 4
    batches = list(eval_windows(data, T, B))
    ys = torch.cat([y for _, y in batches]).flatten()
    n_windows = (len(data) - 1) // T
    assert ys.numel() == n_windows * T
    assert torch.equal(ys, torch.from_numpy(data.tokens[1 : 1 + n_windows * T].astype(np.int64)))
    assert all(x.shape[1] == T for x, _ in batches)
    sample = list(eval_windows(data, T, B, max_batches=2))
    again = list(eval_windows(data, T, B, max_batches=2))
    assert len(sample) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(sample, again))
    # The sample spreads over the split: its first window is the split's first, its last the last.
    all_x = torch.cat([x for x, _ in batches])
    picked = torch.cat([x for x, _ in sample])
    assert picked.shape == (2 * B, T) and n_windows > 2 * B
    assert torch.equal(picked[0], all_x[0]) and torch.equal(picked[-1], all_x[-1])
    assert all(any(torch.equal(p, w) for w in all_x) for p in picked)


def test_bad_inputs(tmp_path: Path) -> None:
    out = tmp_path / "out"

    def fails(match: str, inputs, **kw) -> None:
        with pytest.raises(UserError, match=match):
            prepare([str(p) for p in inputs], out, progress=False, **{"tokenizer_kind": "char", **kw})
        assert not out.exists()  # nothing half-written

    fails("does not exist", [tmp_path / "missing.txt"])
    fails("no input", [])
    (tmp_path / "empty.txt").write_text("")
    fails("no readable text.*empty", [tmp_path / "empty.txt"])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.dat").write_bytes(b"\x00\x01")
    (tmp_path / "bin" / "b.txt").write_bytes(b"\x00\x01")
    fails(r"no readable text in .*bin \(skipped: .*1 binary \(e.g. .*b.txt", [tmp_path / "bin"])
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / "paper.pdf").write_bytes(b"%PDF-1.4 ...")
    fails(r"1 not text or source by name \(e.g. .*paper.pdf\); `scratchlm ingest` reads PDFs",
          [tmp_path / "pdfs"])
    (tmp_path / "tiny.txt").write_text("h")
    fails("too few to split", [tmp_path / "tiny.txt"])
    fails("between 0 and 1", [tmp_path / "tiny.txt"], val_fraction=1.0)
    fails("unknown tokenizer", [tmp_path / "tiny.txt"], tokenizer_kind="wordpiece")
    fails("at least 258", [tmp_path / "tiny.txt"], tokenizer_kind="bpe", vocab_size=100)


def test_failure_keeps_previous_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _data(tmp_path)
    before = (d / "train.bin").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ds, "_cut_tail", boom)
    with pytest.raises(RuntimeError):
        prepare([str(tmp_path / "one.txt")], d, "char", progress=False)
    assert (d / "train.bin").read_bytes() == before and load_meta(d)["dtype"] == "uint16"
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_load_meta_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist.*scratchlm prepare"):
        load_meta(tmp_path / "nope")
    with pytest.raises(UserError, match="no meta.json"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"format_version": 99}')
    with pytest.raises(UserError, match="format_version 99"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("[1, 2")
    with pytest.raises(UserError, match="not valid JSON"):
        load_meta(tmp_path)
    d = _data(tmp_path / "x")
    (d / "val.bin").write_bytes(b"\x00")
    with pytest.raises(UserError, match="does not match meta.json"):
        TokenData(d, "val")
