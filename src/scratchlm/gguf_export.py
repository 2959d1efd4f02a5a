"""GGUF export: a llama.cpp file with llama.cpp's tensor names and metadata and the tokenizer
embedded, written with the `gguf` package (llama.cpp's own writer).

Driven by `scratchlm export RUN_DIR --format gguf --out FILE.gguf` through `export_gguf()`. The
tensors start from the Hugging Face layout (`export.to_hf_state`), then take llama.cpp's names;
llama q/k rows are permuted from HF's rotate-half RoPE layout to llama.cpp's interleaved one, as
llama.cpp's own converter does. docs/export.md has the mapping.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from scratchlm.checkpoint import load_run, model_state
from scratchlm.files import atomic_write
from scratchlm.config import ModelConfig
from scratchlm.errors import UserError
from scratchlm.export import to_hf_state
from scratchlm.tokenizer import Tokenizer, byte_level_table


def export_gguf(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a llama.cpp GGUF file (all tensors F32) with the tokenizer embedded.

    Args:
        run_dir: a scratchlm run directory.
        out: the .gguf file to write (replaced if an earlier export wrote it; any other file,
            another GGUF model included, is refused).
    Returns:
        `out` as a Path.
    Example:
        >>> export_gguf("runs/tiny", "tiny.gguf")  # then: llama-cli -m tiny.gguf  # doctest: +SKIP
    """
    gguf = _import_gguf()
    model, tokenizer, cfg = load_run(run_dir)
    mc = cfg.model
    out = Path(out)
    if out.is_dir():
        raise UserError(
            f"--out {out} is a directory; give a file path such as {out / 'model.gguf'}")
    if out.exists() and not _is_our_gguf(gguf, out):
        raise UserError(f"--out {out} exists and is not a GGUF file that scratchlm export marked as "
                        "its own (files from before 2026-12-02 carry no mark); choose a new path "
                        "or remove it")
    arch = gguf.MODEL_ARCH.LLAMA if mc.arch == "llama" else gguf.MODEL_ARCH.GPT2
    tensors = gguf_tensors(to_hf_state(model_state(model), mc), mc)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        w.add_name(Path(run_dir).resolve().name)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_string(EXPORT_KEY, "scratchlm")  # what lets a later export replace this file
        w.add_vocab_size(mc.vocab_size)
        w.add_context_length(mc.context_length)
        w.add_embedding_length(mc.d_model)
        w.add_block_count(mc.n_layer)
        w.add_feed_forward_length(mc.d_ff)
        w.add_head_count(mc.n_head)
        w.add_head_count_kv(mc.n_kv_head)
        if mc.arch == "llama":
            w.add_rope_dimension_count(mc.head_dim)
            w.add_rope_freq_base(mc.rope_theta)
            w.add_layer_norm_rms_eps(mc.norm_eps)
        else:
            w.add_layer_norm_eps(mc.norm_eps)
        _add_gguf_tokenizer(w, gguf, tokenizer, mc.vocab_size)
        for name, t in tensors.items():
            w.add_tensor(name, t.float().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(out, write)
    return out


EXPORT_KEY = "scratchlm.exported_by"
"""A metadata key of our own (llama.cpp reads only the keys it knows): marks a file this
exporter wrote, so that re-exporting replaces it while someone else's model is never overwritten."""


def _is_our_gguf(gguf, path: Path) -> bool:
    try:  # (the reader checks the magic bytes first)
        return EXPORT_KEY in gguf.GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001 - unreadable, damaged or not GGUF: not a file we can tell is ours
        return False


def gguf_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or bias) from the rotate-half RoPE layout to llama.cpp's
    interleaved one: within each head, rows [0..hs/2) and [hs/2..hs) are interleaved.

    The same reshape as `LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py (called
    with n_head for q and n_kv_head for k).
    """
    hs = w.shape[0] // n_head
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `gguf_permute`."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, hs // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf: dict[str, torch.Tensor], mc: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (`to_hf_state`) -> GGUF names (`gguf.constants`) and layouts."""
    gguf = _import_gguf()
    T = gguf.MODEL_TENSOR

    def name(kind: Any, suffix: str, bid: int | None = None) -> str:
        base = gguf.TENSOR_NAMES[kind]
        return (base.format(bid=bid) if bid is not None else base) + f".{suffix}"

    out: dict[str, torch.Tensor] = {}
    if mc.arch == "gpt2":
        out[name(T.TOKEN_EMBD, "weight")] = hf["transformer.wte.weight"]
        out[name(T.POS_EMBD, "weight")] = hf["transformer.wpe.weight"]
        table = (("ln_1", T.ATTN_NORM, False), ("attn.c_attn", T.ATTN_QKV, True),
                 ("attn.c_proj", T.ATTN_OUT, True), ("ln_2", T.FFN_NORM, False),
                 ("mlp.c_fc", T.FFN_UP, True), ("mlp.c_proj", T.FFN_DOWN, True))
        for i in range(mc.n_layer):
            for theirs, kind, conv1d in table:
                w = hf[f"transformer.h.{i}.{theirs}.weight"]
                out[name(kind, "weight", i)] = w.t() if conv1d else w  # back to (out, in)
                out[name(kind, "bias", i)] = hf[f"transformer.h.{i}.{theirs}.bias"]
        out[name(T.OUTPUT_NORM, "weight")] = hf["transformer.ln_f.weight"]
        out[name(T.OUTPUT_NORM, "bias")] = hf["transformer.ln_f.bias"]
    else:
        out[name(T.TOKEN_EMBD, "weight")] = hf["model.embed_tokens.weight"]
        table = (("input_layernorm", T.ATTN_NORM), ("self_attn.q_proj", T.ATTN_Q),
                 ("self_attn.k_proj", T.ATTN_K), ("self_attn.v_proj", T.ATTN_V),
                 ("self_attn.o_proj", T.ATTN_OUT), ("post_attention_layernorm", T.FFN_NORM),
                 ("mlp.gate_proj", T.FFN_GATE), ("mlp.up_proj", T.FFN_UP),
                 ("mlp.down_proj", T.FFN_DOWN))
        for i in range(mc.n_layer):
            for theirs, kind in table:
                for suffix in ("weight", "bias"):
                    key = f"model.layers.{i}.{theirs}.{suffix}"
                    if key not in hf:
                        continue
                    t = hf[key]
                    if kind == T.ATTN_Q:
                        t = gguf_permute(t, mc.n_head)
                    elif kind == T.ATTN_K:
                        t = gguf_permute(t, mc.n_kv_head)
                    out[name(kind, suffix, i)] = t
        out[name(T.OUTPUT_NORM, "weight")] = hf["model.norm.weight"]
    if "lm_head.weight" in hf:  # untied; llama.cpp reuses token_embd when `output` is absent
        out[name(T.OUTPUT, "weight")] = hf["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _add_gguf_tokenizer(w: Any, gguf: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Embed the tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary.

    bpe: the tokens and merges of tokenizer.json as they are, with the GPT-2 pre-tokenizer.
    char: each character becomes the byte-level token of its UTF-8 bytes, and merges are added
    that assemble each multi-byte character from its bytes (they only ever join a UTF-8 lead
    byte with its own continuation bytes, so they never cross characters). Encoding text made of
    known characters then gives the same ids as scratchlm; llama.cpp drops characters the
    tokenizer never saw, where scratchlm refuses them.
    """
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    specials = {tokenizer.eot_id, tokenizer.pad_id}
    spec = json.loads(tokenizer.to_str())
    byte_sym = byte_level_table()
    tokens: list[str] = []
    types: list[int] = []
    merges: list[str] = []
    seen_merges: set[str] = set()
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:  # the model has more rows than the tokenizer has ids
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if i in specials:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL)
            continue
        if tokenizer.kind == "char":
            data = t.encode("utf-8")
            syms = [byte_sym[b] for b in data]
            for k in range(1, len(syms)):
                m = f"{''.join(syms[:k])} {syms[k]}"
                if m not in seen_merges:
                    seen_merges.add(m)
                    merges.append(m)
            t = "".join(syms)
        tokens.append(t)
        types.append(gguf.TokenType.NORMAL)
    if tokenizer.kind == "bpe":
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    if not merges:
        # llama.cpp refuses a "gpt2" vocabulary without merges (an ASCII-only char tokenizer has
        # none, and the gguf writer drops an empty list): one that never applies, as byte 0xC0
        # never occurs in UTF-8.
        merges = [f"{byte_sym[0xC0]} {byte_sym[0xC0]}"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, which byte-level BPE here uses
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.eot_id)  # as GPT-2: <|endoftext|> is bos and eos
    w.add_eos_token_id(tokenizer.eot_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError(
            "GGUF export needs the gguf package: pip install 'scratchlm[export]'") from None
    return gguf
