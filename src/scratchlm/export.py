"""Export a run to Hugging Face `transformers`; import a Hugging Face model.

Driven by `scratchlm export RUN_DIR --format hf --out DIR` (`export_hf`) and `scratchlm import-hf
PATH --out RUN_DIR` (`import_hf`); GGUF export (`--format gguf`) is in `gguf_export.py`, built on
`to_hf_state` here. docs/export.md has the full name tables.

Both families map one-to-one onto an architecture the ecosystem already runs, with no custom code:

| ours               | gpt2 -> `GPT2LMHeadModel`         | llama -> `LlamaForCausalLM`          |
|--------------------|-----------------------------------|--------------------------------------|
| `attn.qkv` (fused) | `attn.c_attn` (Conv1D: W^T)       | split: `q_proj`, `k_proj`, `v_proj`  |
| `mlp.up` (fused)   | `mlp.c_fc` (Conv1D: W^T)          | split: `gate_proj`, `up_proj`        |
| bias = false       | zero biases (GPT-2 always has them) | `attention_bias`, `mlp_bias` false |

GGUF takes the Hugging Face tensors through llama.cpp's own rules (`gguf.constants` names, Conv1D
transposed back, llama q/k rows permuted to llama.cpp's interleaved RoPE layout), so a GGUF file
from here equals what `convert_hf_to_gguf.py` would make from our Hugging Face export, in F32.

Every output is written under a temporary name next to its destination and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from scratchlm.checkpoint import load_run, mismatch, model_state, torch_load_safe, write_run
from scratchlm.config import ModelConfig, RunConfig
from scratchlm.errors import UserError
from scratchlm.files import read_json, usual_permissions
from scratchlm.model import Transformer
from scratchlm.tokenizer import EOT, PAD, SPECIAL_TOKENS, Tokenizer

HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
# Files export_hf writes: an existing directory holding only these is a previous export and may
# be replaced; anything else in it is the user's and stops the export.
HF_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json",
)


# --- Hugging Face export ---------------------------------------------------------------------


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a `transformers` model directory for the run's latest weights.

    Args:
        run_dir: a scratchlm run directory (`scratchlm train` or `import-hf` output).
        out: the directory to create (or a previous export to replace).
    Returns:
        `out` as a Path; it holds config.json, generation_config.json, model.safetensors,
        tokenizer.json, tokenizer_config.json and special_tokens_map.json.
    Example:
        >>> path = export_hf("runs/tiny", "exports/tiny-hf")          # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(path)                 # doctest: +SKIP
    """
    from safetensors.torch import save_file

    model, tokenizer, cfg = load_run(run_dir)
    out = Path(os.path.abspath(out))  # "a/b/.." is "a": its parent must not be created
    _check_dir_target(out, HF_FILES, "export")
    if out.is_dir() and any(out.iterdir()) and not _is_our_export(out):
        raise UserError(f"--out {out} holds a Hugging Face model that scratchlm did not export; "
                        "choose a new directory or remove it")
    state = to_hf_state(model_state(model), cfg.model)
    files = {
        "config.json": hf_config(cfg.model, tokenizer),
        "generation_config.json": {
            "bos_token_id": tokenizer.eot_id,
            "eos_token_id": tokenizer.eot_id,
            "pad_token_id": tokenizer.pad_id,
        },
        "tokenizer_config.json": _hf_tokenizer_config(tokenizer, cfg.model.context_length),
        "special_tokens_map.json": {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD},
    }
    with _staged_dir(out) as tmp:
        for name, obj in files.items():
            text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
            (tmp / name).write_text(text, encoding="utf-8")
        shutil.copyfile(Path(run_dir) / "tokenizer.json", tmp / "tokenizer.json")
        save_file(state, str(tmp / "model.safetensors"), metadata=EXPORT_METADATA)
    return out


def hf_config(mc: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json of the Hugging Face model equivalent to `mc` (written without transformers)."""
    common = {
        "architectures": [HF_ARCHITECTURES[mc.arch]],
        "vocab_size": mc.vocab_size,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.pad_id,
        "tie_word_embeddings": mc.tie_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if mc.arch == "gpt2":
        return {
            "model_type": "gpt2",
            **common,
            "n_embd": mc.d_model,
            "n_layer": mc.n_layer,
            "n_head": mc.n_head,
            "n_inner": mc.d_ff,
            "n_positions": mc.context_length,
            "n_ctx": mc.context_length,
            "layer_norm_epsilon": mc.norm_eps,
            # HF's names for our two GELUs: exact erf ("gelu") and the tanh approximation.
            "activation_function": "gelu_new" if mc.gelu_approximate == "tanh" else "gelu",
            "resid_pdrop": mc.dropout,
            "embd_pdrop": mc.dropout,
            "attn_pdrop": mc.attn_dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "initializer_range": 0.02,
        }
    return {
        "model_type": "llama",
        **common,
        "hidden_size": mc.d_model,
        "intermediate_size": mc.d_ff,
        "num_hidden_layers": mc.n_layer,
        "num_attention_heads": mc.n_head,
        "num_key_value_heads": mc.n_kv_head,
        "head_dim": mc.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": mc.context_length,
        "rms_norm_eps": mc.norm_eps,
        # transformers < 5 reads rope_theta; >= 5 reads rope_parameters.
        "rope_theta": mc.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta},
        "rope_scaling": None,
        "attention_bias": mc.bias,
        "mlp_bias": mc.bias,
        "attention_dropout": mc.attn_dropout,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
    }


def _hf_tokenizer_config(tokenizer: Tokenizer, context_length: int) -> dict[str, Any]:
    # PreTrainedTokenizerFast reads tokenizer.json as is: no BOS/EOS is added, like ours.
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for t, i in ((EOT, tokenizer.eot_id), (PAD, tokenizer.pad_id))
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        # A literal "<|endoftext|>" in text is text, as in scratchlm's Tokenizer.
        "split_special_tokens": True,
        "model_max_length": context_length,
    }


def to_hf_state(state: dict[str, torch.Tensor], mc: ModelConfig) -> dict[str, torch.Tensor]:
    """Our tensors (as `checkpoint.model_state` gives them) -> Hugging Face names and layouts."""
    out: dict[str, torch.Tensor] = {}

    def get(name: str, size: int | None = None) -> torch.Tensor:
        """state[name]; a bias of `size` zeros if absent (HF's GPT-2 always has biases)."""
        if name in state or size is None:
            return state[name]
        return torch.zeros(size, dtype=state["tok_emb.weight"].dtype)

    if mc.arch == "gpt2":
        d, ff = mc.d_model, mc.d_ff
        out["transformer.wte.weight"] = get("tok_emb.weight")
        out["transformer.wpe.weight"] = get("pos_emb.weight")
        for i in range(mc.n_layer):
            o, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, n in (("norm1", "ln_1", d), ("norm2", "ln_2", d)):
                out[f"{h}{theirs}.weight"] = get(f"{o}{ours}.weight")
                out[f"{h}{theirs}.bias"] = get(f"{o}{ours}.bias", n)
            # Conv1D stores (in, out): the transpose of nn.Linear's (out, in).
            for ours, theirs, n in (("attn.qkv", "attn.c_attn", 3 * d),
                                    ("attn.proj", "attn.c_proj", d),
                                    ("mlp.up", "mlp.c_fc", ff), ("mlp.down", "mlp.c_proj", d)):
                out[f"{h}{theirs}.weight"] = get(f"{o}{ours}.weight").t()
                out[f"{h}{theirs}.bias"] = get(f"{o}{ours}.bias", n)
        out["transformer.ln_f.weight"] = get("norm_f.weight")
        out["transformer.ln_f.bias"] = get("norm_f.bias", d)
    else:
        q, kv = mc.n_head * mc.head_dim, mc.n_kv_head * mc.head_dim
        out["model.embed_tokens.weight"] = get("tok_emb.weight")
        for i in range(mc.n_layer):
            o, h = f"blocks.{i}.", f"model.layers.{i}."
            out[f"{h}input_layernorm.weight"] = get(f"{o}norm1.weight")
            out[f"{h}post_attention_layernorm.weight"] = get(f"{o}norm2.weight")
            suffixes = ("weight", "bias") if mc.bias else ("weight",)
            for s in suffixes:
                qw, kw, vw = get(f"{o}attn.qkv.{s}").split([q, kv, kv], dim=0)
                out[f"{h}self_attn.q_proj.{s}"] = qw
                out[f"{h}self_attn.k_proj.{s}"] = kw
                out[f"{h}self_attn.v_proj.{s}"] = vw
                out[f"{h}self_attn.o_proj.{s}"] = get(f"{o}attn.proj.{s}")
                gate, up = get(f"{o}mlp.up.{s}").chunk(2, dim=0)
                out[f"{h}mlp.gate_proj.{s}"] = gate
                out[f"{h}mlp.up_proj.{s}"] = up
                out[f"{h}mlp.down_proj.{s}"] = get(f"{o}mlp.down.{s}")
        out["model.norm.weight"] = get("norm_f.weight")
    if not mc.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


# --- Hugging Face import ----------------------------------------------------------------------


def import_hf(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Make a scratchlm run directory from a local Hugging Face GPT-2 or Llama model directory.

    Args:
        path: a directory with config.json, tokenizer.json and model.safetensors (or
            pytorch_model.bin, or sharded versions of either with their index file).
        out: the run directory to create (must not exist, or be empty).
    Returns:
        `out` as a Path; `scratchlm generate`, `eval`, `serve`, `export` and fine-tuning read it.
    Example:
        >>> import_hf("hf/my-gpt2", "runs/my-gpt2")        # doctest: +SKIP
    """
    src = Path(path)
    if not src.is_dir():
        raise UserError(f"Hugging Face model directory not found: {src}")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{src} has no config.json: not a Hugging Face model directory")
    hf_cfg = read_json(cfg_path, "save the model again with save_pretrained()")
    if not isinstance(hf_cfg, dict):
        raise UserError(f"{cfg_path} is not a Hugging Face model config")
    tok_path = src / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"{src} has no tokenizer.json (a fast tokenizer file); save the tokenizer "
                        "with transformers' save_pretrained to create one")
    out = Path(os.path.abspath(out))
    _check_dir_target(out, (), "import")
    mc = model_config_from_hf(hf_cfg)
    tok_text, extra_rows = _scratchlm_tokenizer_text(tok_path, mc.vocab_size)
    weights = _read_hf_weights(src)
    try:  # a tensor of the wrong shape fails in a cat or in load_state_dict
        state = from_hf_state(weights, mc)
        if extra_rows:  # special tokens appended to the tokenizer need embedding rows
            mc = dataclasses.replace(mc, vocab_size=mc.vocab_size + extra_rows)
            state = _grow_vocab(state, extra_rows, mc.tie_embeddings)
        model = Transformer(mc)
        if mc.tie_embeddings:
            state["lm_head.weight"] = state["tok_emb.weight"]
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"weights in {src} do not match its config.json: {mismatch(e)}") from None
    source = {"imported_from": {"path": str(src.resolve()),
                                "architecture": HF_ARCHITECTURES[mc.arch]}}
    with _staged_dir(out) as tmp:
        (tmp / ".tokenizer.json").write_text(tok_text, encoding="utf-8")
        write_run(tmp, model, RunConfig(model=mc), tmp / ".tokenizer.json", extra=source)
        (tmp / ".tokenizer.json").unlink()
    return out


# HF config keys that mean something our model cannot represent, with the values we accept.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "rope_scaling": (None,), "sliding_window": (None,), "use_sliding_window": (None, False),
    "num_local_experts": (None, 0, 1), "num_experts": (None, 0, 1),
    "partial_rotary_factor": (None, 1.0), "add_cross_attention": (None, False),
    "scale_attn_by_inverse_layer_idx": (None, False), "scale_attn_weights": (None, True),
}


def model_config_from_hf(h: dict[str, Any]) -> ModelConfig:
    """ModelConfig for a Hugging Face config.json dict; what we cannot represent is a UserError."""
    model_type = h.get("model_type")
    archs = h.get("architectures") or [HF_ARCHITECTURES.get(model_type, model_type)]
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in HF_ARCHITECTURES.values():
        raise UserError(
            f"unsupported architecture {archs!r} (model_type {model_type!r}): import-hf reads "
            f"{' and '.join(HF_ARCHITECTURES.values())} checkpoints"
        )
    arch = archs[0]
    for key, accepted in _UNSUPPORTED.items():
        if h.get(key) not in accepted:
            raise UserError(
                f"unsupported {arch} option {key}={h[key]!r}; scratchlm has no equivalent")
    if arch == "GPT2LMHeadModel":
        act = h.get("activation_function", "gelu_new")
        approximations = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
        if act not in approximations:
            raise UserError(f"unsupported GPT-2 activation_function {act!r}; scratchlm has "
                            "gelu (exact) and gelu_new (tanh approximation)")
        d = _num(h, "n_embd", 768)
        return _model_config(
            arch="gpt2", vocab_size=_num(h, "vocab_size", 50257), n_layer=_num(h, "n_layer", 12),
            n_head=_num(h, "n_head", 12), d_model=d, d_ff=_num(h, "n_inner", 4 * d),
            context_length=_num(h, "n_positions", 1024), dropout=_num(h, "resid_pdrop", 0.0, False),
            attn_dropout=_num(h, "attn_pdrop", 0.0, False), bias=True,
            tie_embeddings=_flag(h, "tie_word_embeddings", True),
            norm_eps=_num(h, "layer_norm_epsilon", 1e-5, False), gelu_approximate=approximations[act],
        )
    rope = h.get("rope_parameters") or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"unsupported rope_parameters {rope!r}; scratchlm has plain RoPE only")
    if h.get("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported hidden_act {h['hidden_act']!r}; "
                        "scratchlm's llama MLP is SwiGLU (silu)")
    bias = _flag(h, "attention_bias", False)
    if bias != _flag(h, "mlp_bias", False):
        raise UserError(
            "unsupported: attention_bias and mlp_bias differ; scratchlm has one bias setting")
    d, n_head = _num(h, "hidden_size", 4096), _num(h, "num_attention_heads", 32)
    if n_head < 1:
        raise UserError(f"config.json has num_attention_heads={n_head}; it must be >= 1")
    if _num(h, "head_dim", None) not in (None, d // n_head):
        raise UserError(
            f"unsupported head_dim {h['head_dim']} != hidden_size / num_attention_heads")
    theta = _num(rope, "rope_theta", None, False) if isinstance(rope, dict) else None
    return _model_config(
        arch="llama", vocab_size=_num(h, "vocab_size", 32000), n_layer=_num(h, "num_hidden_layers", 32),
        n_head=n_head, n_kv_head=_num(h, "num_key_value_heads", n_head), d_model=d,
        d_ff=_num(h, "intermediate_size", 11008),
        context_length=_num(h, "max_position_embeddings", 2048),
        attn_dropout=_num(h, "attention_dropout", 0.0, False), bias=bias,
        tie_embeddings=_flag(h, "tie_word_embeddings", False),
        norm_eps=_num(h, "rms_norm_eps", 1e-6, False),
        rope_theta=theta or _num(h, "rope_theta", 10000.0, False),
    )


def _model_config(**kw: Any) -> ModelConfig:
    for k in ("dropout", "attn_dropout", "norm_eps", "rope_theta"):
        if k in kw:
            kw[k] = float(kw[k])
    return ModelConfig(**kw)


def _flag(h: dict[str, Any], key: str, default: bool) -> bool:
    """h[key] as a JSON boolean (default when absent or null): bool("false") is True, and a
    wrong tie_word_embeddings would drop the untied head's weights."""
    v = h.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise UserError(f"config.json has {key}={v!r}; it must be true or false")
    return v


def _num(h: dict[str, Any], key: str, default: Any, integer: bool = True) -> Any:
    """h[key] (default when absent or null, as transformers reads it), checked to be a number:
    a string there must be a one-line error, not a TypeError deep inside."""
    v = h.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise UserError(f"config.json has {key}={v!r}; it must be {'an integer' if integer else 'a number'}")
    return v


def from_hf_state(hf: dict[str, torch.Tensor], mc: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our names and layouts (fp32); the inverse of `to_hf_state`.

    Keys may lack the base model's prefix (`transformer.` / `model.`), as in checkpoints
    saved from the base model or OpenAI's original GPT-2 files; transformers loads those too."""
    prefix = "transformer." if mc.arch == "gpt2" else "model."
    if not any(k.startswith(prefix) for k in hf):
        hf = {k if k.startswith("lm_head.") else prefix + k: v for k, v in hf.items()}
    hf = dict(hf)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise UserError(
                f"the checkpoint has no tensor {key}; it does not match its config.json")
        used.add(key)
        return hf[key].float()

    out: dict[str, torch.Tensor] = {}
    if mc.arch == "gpt2":
        out["tok_emb.weight"] = take("transformer.wte.weight")
        out["pos_emb.weight"] = take("transformer.wpe.weight")
        for i in range(mc.n_layer):
            o, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{o}{ours}.weight"] = take(f"{h}{theirs}.weight")
                out[f"{o}{ours}.bias"] = take(f"{h}{theirs}.bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                out[f"{o}{ours}.weight"] = take(f"{h}{theirs}.weight").t()
                out[f"{o}{ours}.bias"] = take(f"{h}{theirs}.bias")
        out["norm_f.weight"] = take("transformer.ln_f.weight")
        out["norm_f.bias"] = take("transformer.ln_f.bias")
    else:
        out["tok_emb.weight"] = take("model.embed_tokens.weight")
        for i in range(mc.n_layer):
            o, h = f"blocks.{i}.", f"model.layers.{i}."
            out[f"{o}norm1.weight"] = take(f"{h}input_layernorm.weight")
            out[f"{o}norm2.weight"] = take(f"{h}post_attention_layernorm.weight")
            for s in ("weight", "bias") if mc.bias else ("weight",):
                out[f"{o}attn.qkv.{s}"] = torch.cat(
                    [take(f"{h}self_attn.{p}_proj.{s}") for p in ("q", "k", "v")], dim=0)
                out[f"{o}attn.proj.{s}"] = take(f"{h}self_attn.o_proj.{s}")
                out[f"{o}mlp.up.{s}"] = torch.cat(
                    [take(f"{h}mlp.gate_proj.{s}"), take(f"{h}mlp.up_proj.{s}")], dim=0)
                out[f"{o}mlp.down.{s}"] = take(f"{h}mlp.down_proj.{s}")
        out["norm_f.weight"] = take("model.norm.weight")
    if not mc.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    # Buffers some versions saved, and a tied head saved twice, carry no information of their own.
    ignorable = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", "lm_head.weight")
    extra = sorted(k for k in hf if k not in used and not k.endswith(ignorable))
    if extra:
        raise UserError(f"the checkpoint has tensor {extra[0]}"
                        f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''} that a plain "
                        f"{HF_ARCHITECTURES[mc.arch]} does not have; it is not supported")
    return {k: v.contiguous() for k, v in out.items()}


def _read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or pytorch_model.bin, one file or shards with an index."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load_bin(p: Path) -> dict[str, torch.Tensor]:
        return torch_load_safe(p, "convert it to model.safetensors where it came from, or use another copy")

    def load_st(p: Path) -> dict[str, torch.Tensor]:
        return load_file(str(p))

    loaders: tuple[tuple[str, Callable[[Path], dict[str, torch.Tensor]]], ...] = (
        ("model.safetensors", load_st), ("pytorch_model.bin", load_bin))
    for name, load in loaders:
        files: list[Path] = []
        if (src / name).is_file():
            files = [src / name]
        elif (src / f"{name}.index.json").is_file():
            index = src / f"{name}.index.json"
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index} is not a valid weight index: {e}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise UserError(f"{index} is not a valid weight index: 'weight_map' must map tensor "
                                "names to file names")
            files = [src / f for f in sorted(set(weight_map.values()))]
        if not files:
            continue
        state: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                part = load(f)
            except (SafetensorError, OSError, RuntimeError, EOFError) as e:
                first = (str(e).splitlines() or [type(e).__name__])[0]
                raise UserError(f"cannot read weights {f}: {first}") from None
            if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in part.items()):
                raise UserError(f"{f} does not hold a state dict (tensor names to tensors)")
            state.update(part)
        return state
    raise UserError(f"{src} has no model.safetensors or pytorch_model.bin weights "
                    "(other formats such as TensorFlow or Flax are not supported)")


def _scratchlm_tokenizer_text(tok_path: Path, model_vocab: int) -> tuple[str, int]:
    """tokenizer.json text scratchlm can load, and how many embedding rows to add for it.

    A tokenizer without `<|endoftext|>` / `<|pad|>` (GPT-2's has no pad) gets them appended as
    special tokens; ids beyond the model's vocabulary need new embedding rows.
    """
    from tokenizers import Tokenizer as HFTokenizer

    text = tok_path.read_text(encoding="utf-8")
    try:
        hf = HFTokenizer.from_str(text)
    # HF tokenizers raises plain Exception for a malformed file.
    except Exception as e:  # noqa: BLE001 - re-raised as a one-line user error
        raise UserError(f"{tok_path} is not a valid tokenizer.json ({str(e)[:200]})") from None
    missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
    if missing:
        hf.add_special_tokens(missing)
        text = hf.to_str(pretty=True)
    try:
        tok = Tokenizer.from_str(text, source=str(tok_path))  # checks it is a kind scratchlm runs
    except UserError as e:
        raise UserError(f"unsupported tokenizer ({e}); import-hf reads byte-level BPE "
                        "(GPT-2 style) and scratchlm char tokenizers") from None
    if tok.vocab_size > model_vocab + len(missing):
        raise UserError(f"{tok_path} has {tok.vocab_size} ids but the model only "
                        f"{model_vocab} embedding rows")
    return text, max(0, tok.vocab_size - model_vocab)


def _grow_vocab(state: dict[str, torch.Tensor], n: int, tied: bool) -> dict[str, torch.Tensor]:
    """Append n embedding rows (and output rows when untied), set to the mean row."""
    state = dict(state)
    for key in ("tok_emb.weight",) + (() if tied else ("lm_head.weight",)):
        w = state[key]
        state[key] = torch.cat([w, w.mean(dim=0, keepdim=True).expand(n, -1)], dim=0)
    return state


# --- file helpers ----------------------------------------------------------------------------


def _check_dir_target(out: Path, replaceable: tuple[str, ...], verb: str) -> None:
    """`out` may be absent, an empty directory, or a previous Hugging Face export: a directory
    of only `replaceable` files whose config.json is not a scratchlm run's."""
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} exists and is a file; {verb} writes a directory")
    cwd = Path.cwd().resolve()
    if out.resolve() in (cwd, *cwd.parents):  # it is replaced whole, which its users forbid
        raise UserError(f"--out {out} is the current directory or one above it; name a new directory")
    for parent in out.parents:  # the nearest existing one must be a directory we can write in
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"--out {out}: {parent} is not a directory this user can write in")
            break
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if n not in replaceable]
    if foreign:
        raise UserError(f"--out {out} already exists and holds {foreign[0]!r}"
                        f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}; "
                        "choose a new directory or remove it")
    if "config.json" in names and _is_run_config(out / "config.json"):
        raise UserError(f"--out {out} is a scratchlm run directory; choose a new directory")


EXPORT_METADATA = {"format": "pt", "exported_by": "scratchlm"}
"""The safetensors metadata of an export: what lets a later export replace it, and nothing else."""


def _is_our_export(out: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            return (f.metadata() or {}).get("exported_by") == EXPORT_METADATA["exported_by"]
    except Exception:  # noqa: BLE001 - missing or unreadable: not a file we wrote
        return False


def _is_run_config(path: Path) -> bool:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(raw, dict) and "format_version" in raw


@contextmanager
def _staged_dir(out: Path) -> Iterator[Path]:
    """Yield a temp directory next to `out`; on success it replaces `out`, else it is removed."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:  # e.g. a read-only or special file system
        raise UserError(f"cannot write --out {out}: {e.strerror or e}") from None
    old: Path | None = None
    try:
        yield tmp
        usual_permissions(tmp)
        if out.exists():  # a previous export (checked by _check_dir_target): swap it out
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "x").exists() and not out.exists():
            os.replace(old / "x", out)  # put the previous export back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
