"""Export to Hugging Face and GGUF, import from Hugging Face (scratchlm.export).

Parity is checked against `transformers` itself (logits within 1e-4, greedy generations equal);
GGUF files are read back with `gguf.GGUFReader`, a small reference forward pass that follows
llama.cpp's conventions (interleaved RoPE, ggml (out, in) weights) must reproduce our logits, and
llama.cpp itself (its Python binding, where installed) must load them, give our logits, greedy
tokens and token ids, and quantize them.
All models are random and tiny, made here; nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from safetensors.torch import load_file  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

from scratchlm.checkpoint import load_run, write_run  # noqa: E402
from scratchlm.cli import main as cli_main  # noqa: E402
from scratchlm.config import ModelConfig, RunConfig  # noqa: E402
from scratchlm.errors import UserError  # noqa: E402
from scratchlm.export import export_hf, import_hf, model_config_from_hf  # noqa: E402
from scratchlm.gguf_export import export_gguf, gguf_unpermute  # noqa: E402
from scratchlm.generate import SamplingConfig, generate  # noqa: E402
from scratchlm.model import Transformer  # noqa: E402
from scratchlm.tokenizer import Tokenizer, byte_level_table, train_bpe, train_char  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich — 2024 €!\n",
    "def f(x):\n    return x * 2  # tabs\tand spaces\n",
    "日本語のテキストと emoji 😀🚀, naïve café.\n",
] * 4
TEXTS = [
    "The quick brown fox",
    "  leading spaces and\n\nnewlines\t\ttabs ",
    "Zwölf Boxkämpfer — 2024 €",
    "日本語 😀🚀 naïve café",
    "def f(x):\n    return x * 2",
    "text with <|endoftext|> inside, and <|pad|> too",
    "",
]
# GPT-2's pre-tokenizer split (\p{L}/\p{N} approximated with Python's re classes).
GPT2_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")
VARIANTS = {
    "gpt2": dict(arch="gpt2"),
    "gpt2-nobias-untied": dict(arch="gpt2", bias=False, tie_embeddings=False, norm_eps=1e-6,
                               gelu_approximate="tanh"),
    "llama-gqa": dict(arch="llama", n_kv_head=2, bias=False, rope_theta=500.0),
    "llama-bias-untied": dict(arch="llama", n_kv_head=1, bias=True, tie_embeddings=False,
                              norm_eps=1e-6),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def toks(work) -> dict[str, Path]:
    paths = {}
    for kind, tok in (("bpe", train_bpe(CORPUS, 320)), ("char", train_char(CORPUS + TEXTS))):
        paths[kind] = work / f"{kind}.json"
        tok.save(paths[kind])
    return paths


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (biases and norms too), large enough for decisive argmaxes."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)


def make_run(work: Path, name: str, tok_path: Path, seed: int = 0, **model_kw) -> Path:
    tok = Tokenizer.load(tok_path)
    kw = dict(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=32, context_length=64)
    mc = ModelConfig(**{**kw, **model_kw})
    torch.manual_seed(seed)
    model = Transformer(mc)
    _perturb(model, seed)
    run_dir = work / name
    write_run(run_dir, model, RunConfig(model=mc), tok_path)
    return run_dir


@pytest.fixture(scope="module")
def runs(work, toks) -> dict[str, Path]:
    return {v: make_run(work, f"run-{v}", toks["bpe"], seed=i, **kw)
            for i, (v, kw) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="module")
def hf_exports(work, runs) -> dict[str, Path]:
    return {v: export_hf(runs[v], work / f"hf-{v}") for v in VARIANTS}


def _load_hf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


# --- Hugging Face export -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_export_logits_and_greedy_generation_match(variant, runs, hf_exports):
    ours, tok, cfg = load_run(runs[variant])
    theirs = _load_hf(hf_exports[variant])
    expected = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[cfg.model.arch]
    assert type(theirs).__name__ == expected
    assert theirs.dtype == torch.float32

    x = torch.randint(0, tok.vocab_size, (2, cfg.model.context_length), generator=_gen(1))
    with torch.no_grad():
        a, _ = ours(x)
        b = theirs(x).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)

    prompt = tok.encode("The quick brown")
    sampling = SamplingConfig(temperature=0)
    mine = [s[0] for s in generate(ours, [prompt], 40, sampling, eot_id=tok.eot_id)]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40,
                              do_sample=False)
    assert out[0, len(prompt):].tolist() == mine
    assert len(set(mine)) > 3  # a real sequence, not one token repeated


def test_hf_export_files_and_config(runs, hf_exports):
    out = hf_exports["llama-gqa"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"])
    tok = Tokenizer.load(runs["llama-gqa"] / "tokenizer.json")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["rope_theta"] == 500.0
    assert cfg["tie_word_embeddings"] is True
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (tok.eot_id, tok.pad_id)
    state = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in state  # tied: stored once, as transformers does
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    # gpt2 without biases: HF's GPT-2 always has them, so they are written as zeros
    nobias = load_file(str(hf_exports["gpt2-nobias-untied"] / "model.safetensors"))
    assert torch.count_nonzero(nobias["transformer.h.1.attn.c_attn.bias"]) == 0
    assert nobias["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    assert "lm_head.weight" in nobias


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_hf_tokenizer_encodes_like_ours(kind, work, toks):
    run = make_run(work, f"run-tok-{kind}", toks[kind])
    out = export_hf(run, work / f"hf-tok-{kind}")
    ours = Tokenizer.load(toks[kind])
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eot_id, ours.pad_id)
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text


# --- GGUF export --------------------------------------------------------------------------------


def _read_gguf(path: Path):
    r = gguf.GGUFReader(path)
    meta = {}
    for key, field in r.fields.items():
        if not key.startswith("GGUF."):
            meta[key] = field.contents()
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in r.tensors}
    return meta, tensors, r


def llamacpp_reference_logits(meta: dict, t: dict[str, torch.Tensor], ids: torch.Tensor):
    """A forward pass from GGUF tensors with llama.cpp's conventions, independent of scratchlm:
    weights as ggml stores them (numpy (out, in)), RoPE on adjacent pairs (x[2i], x[2i+1])."""
    arch = meta["general.architecture"]
    n_head, n_kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    L = meta[f"{arch}.block_count"]
    T = ids.shape[0]
    x = t["token_embd.weight"][ids]  # (T, C)
    C = x.shape[-1]
    hs = C // n_head

    def lin(name, h):
        w = t[f"{name}.weight"]
        b = t.get(f"{name}.bias")
        return h @ w.T + (b if b is not None else 0)

    if arch == "llama":
        eps = meta["llama.attention.layer_norm_rms_epsilon"]

        def norm(h, n):
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * t[f"{n}.weight"]

        base = meta["llama.rope.freq_base"]
        theta = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * theta  # (T, hs/2)
        cos, sin = ang.cos().float(), ang.sin().float()

        def rope(v):  # (T, nh, hs), pairs (2i, 2i+1) rotated by ang[:, i]
            a, b = v[..., 0::2], v[..., 1::2]
            c, s = cos[:, None, :], sin[:, None, :]
            return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    else:
        eps = meta["gpt2.attention.layer_norm_epsilon"]

        def norm(h, n):
            return F.layer_norm(h, (C,), t[f"{n}.weight"], t[f"{n}.bias"], eps)

        x = x + t["position_embd.weight"][:T]

    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        p = f"blk.{i}"
        h = norm(x, f"{p}.attn_norm")
        if arch == "llama":
            q = rope(lin(f"{p}.attn_q", h).view(T, n_head, hs))
            k = rope(lin(f"{p}.attn_k", h).view(T, n_kv, hs))
            v = lin(f"{p}.attn_v", h).view(T, n_kv, hs)
        else:
            q, k, v = lin(f"{p}.attn_qkv", h).split(C, dim=-1)
            q, k, v = (z.view(T, n_head, hs) for z in (q, k, v))
        k = k.repeat_interleave(n_head // n_kv, dim=1)  # q head j reads kv head j // group
        v = v.repeat_interleave(n_head // n_kv, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = torch.einsum("hqk,khd->qhd", att, v).reshape(T, C)
        x = x + lin(f"{p}.attn_output", y)
        h = norm(x, f"{p}.ffn_norm")
        if arch == "llama":
            h = F.silu(lin(f"{p}.ffn_gate", h)) * lin(f"{p}.ffn_up", h)
        else:
            h = F.gelu(lin(f"{p}.ffn_up", h), approximate="tanh")  # llama.cpp's ggml_gelu
        x = x + lin(f"{p}.ffn_down", h)
    x = norm(x, "output_norm")
    return x @ t.get("output.weight", t["token_embd.weight"]).T


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gguf_reads_back_with_llamacpp_names_and_reproduces_logits(variant, work, runs, hf_exports):
    path = export_gguf(runs[variant], work / f"{variant}.gguf")
    meta, tensors, reader = _read_gguf(path)
    model, tok, cfg = load_run(runs[variant])
    mc = cfg.model
    arch = gguf.MODEL_ARCH.LLAMA if mc.arch == "llama" else gguf.MODEL_ARCH.GPT2
    a = gguf.MODEL_ARCH_NAMES[arch]
    assert meta["general.architecture"] == a
    assert meta[f"{a}.context_length"] == mc.context_length
    assert meta[f"{a}.embedding_length"] == mc.d_model
    assert meta[f"{a}.block_count"] == mc.n_layer
    assert meta[f"{a}.feed_forward_length"] == mc.d_ff
    assert meta[f"{a}.attention.head_count"] == mc.n_head
    assert meta[f"{a}.attention.head_count_kv"] == mc.n_kv_head

    # Names: exactly the ones llama.cpp's own converter derives from the HF names.
    name_map = gguf.get_tensor_name_map(arch, mc.n_layer)
    hf_state = load_file(str(hf_exports[variant] / "model.safetensors"))
    expected = {name_map.get_name(k, try_suffixes=(".weight", ".bias")) for k in hf_state}
    assert set(tensors) == expected
    allowed = {gguf.TENSOR_NAMES[k].format(bid=i)
               for k in gguf.MODEL_TENSORS[arch] for i in range(mc.n_layer)}
    assert {n.rsplit(".", 1)[0] for n in tensors} <= allowed
    assert ("output.weight" in tensors) == (not mc.tie_embeddings)

    # Shapes (ggml order is reversed: ne0 = input features) and values.
    by_name = {t.name: t for t in reader.tensors}
    assert list(by_name["token_embd.weight"].shape) == [mc.d_model, mc.vocab_size]
    state = model.state_dict()
    assert torch.equal(tensors["token_embd.weight"], state["tok_emb.weight"])
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    hs = mc.head_dim
    if mc.arch == "llama":
        kv = mc.n_kv_head * hs
        q, k, _ = state["blocks.1.attn.qkv.weight"].split([mc.n_head * hs, kv, kv])
        assert not torch.equal(tensors["blk.1.attn_q.weight"], q)  # permuted ...
        # ... losslessly
        assert torch.equal(gguf_unpermute(tensors["blk.1.attn_q.weight"], mc.n_head), q)
        assert torch.equal(gguf_unpermute(tensors["blk.1.attn_k.weight"], mc.n_kv_head), k)
        assert meta["llama.rope.freq_base"] == pytest.approx(mc.rope_theta)
        assert meta["llama.rope.dimension_count"] == hs
    else:
        assert torch.equal(tensors["blk.1.attn_qkv.weight"], state["blocks.1.attn.qkv.weight"])

    # The meaning of it all: llama.cpp's conventions applied to these tensors give our logits.
    ids = torch.randint(0, mc.vocab_size, (40,), generator=_gen(3))
    with torch.no_grad():
        mine, _ = model(ids[None])
    theirs = llamacpp_reference_logits(meta, tensors, ids)
    # llama.cpp has only the tanh GELU: a model trained with the exact one runs slightly off.
    exact_gelu = mc.arch == "gpt2" and mc.gelu_approximate == "none"
    torch.testing.assert_close(theirs, mine[0], atol=2e-3 if exact_gelu else 1e-4, rtol=0)


def _llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama.cpp's Python binding is not installed (.ci/run builds it: "
        "pip install llama-cpp-python, which needs cmake and a C++ compiler)")


def _llama(llama_cpp, path: Path, n_ctx: int = 64):
    # fp32 keys and values: llama.cpp caches them in fp16 by default (~1e-3 off in the logits).
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=1,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                           verbose=False)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gguf_runs_in_llama_cpp(variant, work, runs):
    """llama.cpp itself loads the file, computes our logits and decodes greedily as we do."""
    llama_cpp = _llama_cpp()
    path = export_gguf(runs[variant], work / f"run-in-llama-cpp-{variant}.gguf")
    model, tok, cfg = load_run(runs[variant])
    llm = _llama(llama_cpp, path)
    ids = torch.randint(0, tok.vocab_size, (40,), generator=_gen(5)).tolist()
    ids = [i for i in ids if i not in (tok.eot_id, tok.pad_id)]
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)])
    with torch.no_grad():
        mine = model(torch.tensor([ids]))[0][0]
    # ggml's CPU GELU (gpt2) reads an fp16 table, ~1e-3 off any exact GELU, tanh or erf.
    tol = 5e-3 if cfg.model.arch == "gpt2" else 1e-4
    torch.testing.assert_close(theirs, mine, atol=tol, rtol=0)

    prompt = tok.encode("The quick brown")
    ours = [s[0] for s in generate(model, [prompt], 24, SamplingConfig(temperature=0.0), eot_id=None)]
    greedy = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        greedy.append(t)
        if len(greedy) == len(ours):
            break
    assert greedy == ours


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_llama_cpp_tokenizes_with_the_embedded_vocabulary_as_we_do(kind, work, toks):
    llama_cpp = _llama_cpp()
    run = make_run(work, f"run-llama-cpp-tok-{kind}", toks[kind], arch="llama")
    llm = _llama(llama_cpp, export_gguf(run, work / f"llama-cpp-tok-{kind}.gguf"))
    tok = Tokenizer.load(toks[kind])
    for text in TEXTS:  # special tokens' text in a prompt is plain text on both sides
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert ids == tok.encode(text), text
        assert llm.detokenize(ids).decode() == text


def test_llama_cpp_runs_an_ascii_char_tokenizer_and_quantizes_our_file(work):
    """The char tokenizer of `shakespeare-char` is ASCII-only (one inert merge, see above);
    llama-quantize's Q8_0 of our file still computes about the same function."""
    import ctypes

    llama_cpp = _llama_cpp()
    tok_path = work / "ascii-char-llama-cpp.json"
    train_char(["To be, or not to be: that is the question.\n"]).save(tok_path)
    run = make_run(work, "run-ascii-llama-cpp", tok_path, arch="gpt2")
    path = export_gguf(run, work / "ascii-llama-cpp.gguf")
    tok = Tokenizer.load(tok_path)
    text = "to be, or not to be"
    assert _llama(llama_cpp, path).tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)

    q8 = work / "ascii-llama-cpp-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(path).encode(), str(q8).encode(), ctypes.byref(params)) == 0
    assert q8.stat().st_size < path.stat().st_size / 2
    llm = _llama(llama_cpp, q8)
    ids = tok.encode(text)
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)])
    model, _, _ = load_run(run)
    with torch.no_grad():
        mine = model(torch.tensor([ids]))[0][0]
    assert torch.corrcoef(torch.stack([theirs.flatten(), mine.flatten()]))[0, 1] > 0.99


def _bpe_apply(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: merge the lowest-ranked adjacent pair until none is left."""
    while True:
        pairs = [(ranks.get(pair, math.inf), j) for j, pair in enumerate(zip(symbols, symbols[1:]))]
        best = min(pairs, default=(math.inf, -1))
        if best[0] == math.inf:
            return symbols
        j = best[1]
        symbols = symbols[:j] + [symbols[j] + symbols[j + 1]] + symbols[j + 2:]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_gguf_tokenizer_embedded(kind, work, toks):
    run = make_run(work, f"run-gguf-{kind}", toks[kind], arch="llama")
    meta, _, _ = _read_gguf(export_gguf(run, work / f"tok-{kind}.gguf"))
    tok = Tokenizer.load(toks[kind])
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert len(tokens) == len(types) == tok.vocab_size
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eot_id
    assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert tokens[tok.eot_id] == "<|endoftext|>" and types[tok.eot_id] == gguf.TokenType.CONTROL
    assert types[0] == gguf.TokenType.NORMAL
    merges = meta["tokenizer.ggml.merges"]
    if kind == "bpe":
        spec = json.loads(tok.to_str())
        assert tokens[:-2] == sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
        assert merges == [" ".join(m) for m in spec["model"]["merges"]]
    # Encoding with the embedded vocabulary, as llama.cpp's BPE does, gives our ids.
    byte_sym = byte_level_table()
    assert sorted(byte_sym.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    to_byte = {c: b for b, c in byte_sym.items()}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    for text in TEXTS[:5]:
        if kind == "char":  # merges never cross characters, so the whole text is one "word"
            words = [text]
        else:
            words = GPT2_SPLIT.findall(text)
        got = []
        for w in words:
            got += [ids[s] for s in _bpe_apply([byte_sym[b] for b in w.encode()], ranks)]
        assert got == tok.encode(text), text
        assert bytes(to_byte[c] for i in got for c in tokens[i]).decode() == text


def test_gguf_of_an_ascii_char_tokenizer_has_merges_that_never_apply(work):
    """llama.cpp refuses a "gpt2" vocabulary without merges; an ASCII-only character
    tokenizer has none of its own, so the file carries one that can never fire."""
    tok_path = work / "ascii-char.json"
    train_char(["hello world\n"]).save(tok_path)
    meta, _, _ = _read_gguf(export_gguf(make_run(work, "run-ascii", tok_path), work / "ascii.gguf"))
    merges = meta["tokenizer.ggml.merges"]
    assert merges
    byte_sym = byte_level_table()
    tokens = meta["tokenizer.ggml.tokens"]
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    text = "hello world\n"
    got = [tokens.index(s) for s in _bpe_apply([byte_sym[b] for b in text.encode()], ranks)]
    assert got == Tokenizer.load(tok_path).encode(text)


# --- Hugging Face import -----------------------------------------------------------------------


def _save_hf_model(work: Path, name: str, hf_cfg, tok_path: Path, seed: int,
                   bin_format: bool = False) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    _perturb(model, seed)
    out = work / name
    model.save_pretrained(out)
    if bin_format:  # the older pytorch_model.bin layout
        state = load_file(str(out / "model.safetensors"))
        (out / "model.safetensors").unlink()
        torch.save(state, out / "pytorch_model.bin")
    shutil.copyfile(tok_path, out / "tokenizer.json")
    return out


def _hf_configs(tok: Tokenizer) -> dict:
    common = dict(vocab_size=tok.vocab_size, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    return {
        "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common),
        "llama": transformers.LlamaConfig(
            hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
            tie_word_embeddings=False, **common),
    }


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt2-bin"])
def test_import_hf_matches_transformers_and_round_trips(family, work, toks):
    tok = Tokenizer.load(toks["bpe"])
    arch = family.split("-")[0]
    src = _save_hf_model(work, f"hf-src-{family}", _hf_configs(tok)[arch], toks["bpe"], seed=7,
                         bin_format=family.endswith("bin"))
    run = import_hf(src, work / f"imported-{family}")
    ours, our_tok, cfg = load_run(run)
    assert cfg.model.arch == arch and our_tok.vocab_size == tok.vocab_size
    theirs = _load_hf(src)
    x = torch.randint(0, tok.vocab_size, (2, 64), generator=_gen(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x).logits, atol=1e-4, rtol=0)

    back = export_hf(run, work / f"reexported-{family}")
    original = _hf_weights(src)
    again = load_file(str(back / "model.safetensors"))
    assert set(again) == set(original)
    for k, v in original.items():
        assert torch.equal(again[k], v), k


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_hf_reads_keys_without_the_base_model_prefix(family, work, toks):
    """Checkpoints saved from the base model (and OpenAI's GPT-2 files) have `wte.weight`, not
    `transformer.wte.weight`; transformers loads them, and so does import-hf, to the same run."""
    from safetensors.torch import save_file

    tok = Tokenizer.load(toks["bpe"])
    src = _save_hf_model(work, f"hf-src-bare-{family}", _hf_configs(tok)[family], toks["bpe"], seed=9)
    prefix = "transformer." if family == "gpt2" else "model."
    state = load_file(str(src / "model.safetensors"))
    bare = {k.removeprefix(prefix): v for k, v in state.items()}
    assert bare.keys() != state.keys()
    full = import_hf(src, work / f"imported-full-{family}")
    save_file(bare, str(src / "model.safetensors"), metadata={"format": "pt"})
    a = load_file(str(import_hf(src, work / f"imported-bare-{family}") / "model.safetensors"))
    b = load_file(str(full / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_hf_weights_of_the_wrong_shape_are_a_user_error(work, toks):
    from safetensors.torch import save_file

    tok = Tokenizer.load(toks["bpe"])
    src = _save_hf_model(work, "hf-src-badshape", _hf_configs(tok)["llama"], toks["bpe"], seed=4)
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 31)  # in: 31, not 32
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(UserError, match="do not match its config.json"):
        import_hf(src, work / "imported-badshape")
    assert not (work / "imported-badshape").exists()


def _write_gpt2_config(src: Path, tok: Tokenizer) -> None:
    (src / "config.json").write_text(json.dumps(_hf_configs(tok)["gpt2"].to_dict()))


def _hf_weights(src: Path) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").is_file():
        return load_file(str(src / "model.safetensors"))
    return torch.load(src / "pytorch_model.bin", weights_only=True)


def test_import_adds_missing_pad_token_with_a_new_embedding_row(work, toks):
    # A GPT-2-style tokenizer: <|endoftext|> but no <|pad|>.
    spec = json.loads(Tokenizer.load(toks["bpe"]).to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|pad|>"]
    tok_path = work / "no-pad.json"
    tok_path.write_text(json.dumps(spec))
    n = len(spec["model"]["vocab"]) + 1
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32, vocab_size=n)
    src = _save_hf_model(work, "hf-src-nopad", cfg, tok_path, seed=3)
    ours, tok, _ = load_run(import_hf(src, work / "imported-nopad"))
    assert tok.pad_id == n and ours.cfg.vocab_size == n + 1
    x = torch.randint(0, n, (1, 16), generator=_gen(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0][..., :n], _load_hf(src)(x).logits, atol=1e-4, rtol=0)


def test_import_refuses_tensors_a_plain_llama_does_not_have(work, toks):
    from safetensors.torch import save_file

    tok = Tokenizer.load(toks["bpe"])
    src = _save_hf_model(work, "hf-src-qknorm", _hf_configs(tok)["llama"], toks["bpe"], seed=1)
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)  # a Qwen3-style extra
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(UserError, match="q_norm.weight that a plain LlamaForCausalLM does not"):
        import_hf(src, work / "imported-qknorm")
    assert not (work / "imported-qknorm").exists()


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MixtralForCausalLM"], "num_local_experts": 8}, "unsupported architecture"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"architectures": ["GPT2LMHeadModel"], "scale_attn_weights": False}, "scale_attn_weights"),
    ({"hidden_size": "32"}, "hidden_size"),
    ({"architectures": ["GPT2LMHeadModel"], "n_embd": [32]}, "n_embd"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"architectures": "LlamaForCausalLM"}, "unsupported architecture"),  # a string, not a list
    ({"architectures": {"LlamaForCausalLM": 1}}, "unsupported architecture"),
    ({"architectures": [None], "model_type": "gpt2"}, "unsupported architecture"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),  # bool("false") would be True
    ({"attention_bias": 1}, "attention_bias"),
])
def test_import_rejects_what_scratchlm_cannot_represent(change, message):
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
            "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 300}
    with pytest.raises(UserError, match=message):
        model_config_from_hf({**base, **change})


# --- bad input and atomic writes ---------------------------------------------------------------


def test_bad_inputs_are_one_line_user_errors(work, runs, toks, capsys):
    missing = work / "nope"
    tok = Tokenizer.load(toks["bpe"])
    theirs = _save_hf_model(work, "hf-not-ours", _hf_configs(tok)["gpt2"], toks["bpe"], seed=2)
    theirs_before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    run_weights = (runs["gpt2"] / "model.safetensors").read_bytes()
    foreign = work / "foreign"
    foreign.mkdir(exist_ok=True)
    (foreign / "notes.txt").write_text("mine")
    a_file = work / "a-file"
    a_file.write_text("x")
    someone_elses = work / "someone-else.gguf"  # a GGUF model that scratchlm did not write
    writer = gguf.GGUFWriter(str(someone_elses), "llama")
    writer.add_name("someone-elses-7b")
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gguf_before = someone_elses.read_bytes()
    cases = [
        lambda: export_hf(missing, work / "o1"),
        lambda: export_hf(foreign, work / "o2"),
        lambda: export_hf(runs["gpt2"], a_file),
        lambda: export_hf(runs["gpt2"], foreign),  # a non-empty directory that is not an export
        lambda: export_gguf(runs["gpt2"], foreign),
        lambda: export_hf(runs["gpt2"], runs["gpt2"]),  # never replace a run with its export
        lambda: export_gguf(missing, work / "x.gguf"),
        lambda: import_hf(missing, work / "o3"),
        lambda: import_hf(runs["gpt2"], work / "o4"),  # a run directory is not an HF directory
        lambda: import_hf(foreign, work / "o5"),
        lambda: export_gguf(runs["gpt2"], a_file),  # an existing file that is not a GGUF
        lambda: export_gguf(runs["gpt2"], runs["gpt2"] / "model.safetensors"),
        lambda: export_hf(runs["gpt2"], theirs),  # an HF model that scratchlm did not export
        lambda: export_gguf(runs["gpt2"], someone_elses),
        lambda: export_hf(runs["gpt2"], a_file / "x"),  # a parent that is a file
        lambda: export_gguf(runs["gpt2"], a_file / "x.gguf"),
        lambda: import_hf(theirs, a_file / "x"),
    ]
    for case in cases:
        with pytest.raises(UserError) as e:
            case()
        assert "\n" not in str(e.value)
    assert (foreign / "notes.txt").read_text() == "mine" and a_file.read_text() == "x"
    assert load_run(runs["gpt2"])[2].model.arch == "gpt2"
    assert (runs["gpt2"] / "model.safetensors").read_bytes() == run_weights
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == theirs_before
    assert someone_elses.read_bytes() == gguf_before
    assert not any((work / n).exists() for n in ("o1", "o2", "o3", "o4", "o5", "x.gguf"))

    assert cli_main(["export", str(missing), "--format", "hf", "--out", str(work / "o6")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


class _EvilSystem:  # torch names a blocked module differently from an unknown global
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_import_refuses_a_pickled_object_in_pytorch_model_bin(work, toks, capsys):
    src = work / "hf-evil"
    src.mkdir()
    _write_gpt2_config(src, Tokenizer.load(toks["bpe"]))
    shutil.copyfile(toks["bpe"], src / "tokenizer.json")
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "x": _Evil()}, src / "pytorch_model.bin")
    assert cli_main(["import-hf", str(src), "--out", str(work / "imported-evil")]) == 2
    out = capsys.readouterr()
    assert "this must never run" not in out.out
    assert out.err.startswith("error: cannot read ") and "holds Python objects" in out.err
    assert out.err.count("\n") == 1
    assert not (work / "imported-evil").exists()


def test_hf_dir_without_weights_is_a_user_error(work, toks):
    src = work / "hf-noweights"
    src.mkdir()
    _write_gpt2_config(src, Tokenizer.load(toks["bpe"]))
    shutil.copyfile(toks["bpe"], src / "tokenizer.json")
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        import_hf(src, work / "imported-noweights")
    assert not (work / "imported-noweights").exists()


def test_import_rejects_a_tokenizer_kind_scratchlm_does_not_run(work, toks):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    src = work / "hf-wordpiece"
    src.mkdir()
    _write_gpt2_config(src, Tokenizer.load(toks["bpe"]))
    hf = HFTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(src / "tokenizer.json"))
    with pytest.raises(UserError, match="unsupported tokenizer"):
        import_hf(src, work / "imported-wordpiece")
    assert not (work / "imported-wordpiece").exists()


def test_cli_export_and_import_print_the_path(work, runs, toks, capsys):
    gg = work / "cli" / "m.gguf"
    assert cli_main(["export", str(runs["llama-gqa"]), "--format", "gguf", "--out", str(gg)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {gg}"
    hf = work / "cli" / "hf"
    assert cli_main(["export", str(runs["llama-gqa"]), "--format", "hf", "--out", str(hf)]) == 0
    back = work / "cli" / "run"
    assert cli_main(["import-hf", str(hf), "--out", str(back)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {back}")
    a = load_file(str(runs["llama-gqa"] / "model.safetensors"))
    b = load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # ours -> HF -> ours
    assert load_run(back)[2].model == load_run(runs["llama-gqa"])[2].model
    mask = os.umask(0)
    os.umask(mask)
    for p in (gg, hf, hf / "model.safetensors", back, back / "model.safetensors"):  # not 0600
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask, p


def test_out_is_never_the_current_directory_and_dot_dot_creates_nothing(work, runs, monkeypatch):
    here = work / "empty-cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    for case in (lambda: export_hf(runs["gpt2"], "."), lambda: import_hf(work / "nope", ".."),
                 lambda: export_hf(runs["gpt2"], "")):
        with pytest.raises(UserError, match="current directory|not found|no config"):
            case()
    assert here.is_dir() and not any(here.iterdir())
    out = export_hf(runs["gpt2"], work / "dd" / "sub" / "..")  # is work/dd
    assert out == work / "dd" and (out / "model.safetensors").is_file() and not (out / "sub").exists()


def test_gguf_export_replaces_its_own_earlier_file(work, runs):
    out = work / "again.gguf"
    export_gguf(runs["gpt2"], out)
    first = out.read_bytes()
    export_gguf(runs["llama-gqa"], out)
    assert out.read_bytes() != first and gguf.GGUFReader(str(out)).fields["general.architecture"]


def test_import_reports_broken_weight_files_in_one_line(work, toks):
    tok = Tokenizer.load(toks["bpe"])
    for name, write in (("text", lambda p: p.write_text("hello")),  # not a pickle at all
                        ("list", lambda p: torch.save([1, 2], p)),  # a pickle, not a state dict
                        ("system", lambda p: torch.save({"x": _EvilSystem()}, p))):
        src = work / f"hf-broken-{name}"
        src.mkdir()
        _write_gpt2_config(src, tok)
        shutil.copyfile(toks["bpe"], src / "tokenizer.json")
        write(src / "pytorch_model.bin")
        with pytest.raises(UserError) as e:
            import_hf(src, work / f"imported-broken-{name}")
        assert "\n" not in str(e.value) and not (work / f"imported-broken-{name}").exists()
        if name == "system":
            assert "holds Python objects" in str(e.value)
    for weight_map in ([1], {"a": 5}):
        src = work / f"hf-index-{len(str(weight_map))}"
        src.mkdir()
        _write_gpt2_config(src, tok)
        shutil.copyfile(toks["bpe"], src / "tokenizer.json")
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(UserError, match="not a valid weight index"):
            import_hf(src, work / "imported-index")


def test_export_is_atomic_and_replaces_a_previous_export(work, runs, monkeypatch):
    out = work / "atomic-hf"
    export_hf(runs["gpt2"], out)
    before = (out / "model.safetensors").read_bytes()

    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        export_hf(runs["gpt2-nobias-untied"], out)
    assert (out / "model.safetensors").read_bytes() == before  # the previous export survives
    monkeypatch.undo()
    assert not [p for p in work.iterdir() if p.name.startswith(".atomic-hf")]  # no temp leftovers

    export_hf(runs["gpt2-nobias-untied"], out)  # a previous export may be replaced
    assert (out / "model.safetensors").read_bytes() != before
    assert not [p for p in work.iterdir() if p.name.startswith(".atomic-hf")]


def test_fine_tune_an_imported_model(work, toks):
    """import-hf -> prepare --tokenizer-file -> train --init-from starts from the HF weights."""
    from scratchlm.cli import main
    from scratchlm.train import evaluate_run

    tok = Tokenizer.load(toks["bpe"])
    src = _save_hf_model(work, "hf-src-finetune", _hf_configs(tok)["llama"], toks["bpe"], seed=3)
    run = import_hf(src, work / "ft-imported")
    corpus = work / "ft-corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(" ".join(CORPUS) * 3 + f" document {i}\n")
    data = work / "ft-data"
    assert main(["prepare", str(corpus), "--out", str(data), "--tokenizer-file",
                 str(run / "tokenizer.json"), "--val-fraction", "0.3"]) == 0
    out = work / "ft-run"
    assert main(["train", "--data", str(data), "--out", str(out), "--init-from", str(run),
                 "--set", "train.max_steps=2", "--set", "train.warmup_steps=0",
                 "--set", "train.lr=1e-6", "--set", "train.min_lr=0", "--set", "train.batch_size=2",
                 "--set", "train.precision=fp32", "--set", "train.eval_steps=1"]) == 0
    before, after = load_file(str(run / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    # Two AdamW steps of lr 1e-6 move each weight by ~2e-6; a fresh init would differ by ~0.02.
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-5
    assert load_run(out)[2].model == load_run(run)[2].model
    ref, new = evaluate_run(run, data), evaluate_run(out, data)
    assert abs(ref["val_loss"] - new["val_loss"]) < 1e-3
    # A data directory made with another tokenizer is refused, in one line.
    assert main(["train", "--data", str(data), "--out", str(work / "ft-bad"), "--init-from",
                 str(work / "nonexistent")]) == 2
