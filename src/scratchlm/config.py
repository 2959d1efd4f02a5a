"""Configuration: dataclasses for the model and the training run, named presets, TOML files
and `--set section.key=value` overrides.

Driven by `scratchlm train --preset P --config FILE.toml --set train.lr=3e-4` through
`load_run_config()`. A config file and `--set` use the same keys:

    [model]                      [train]
    arch = "llama"               lr = 3e-4
    n_layer = 6                  schedule = "cosine"

Unknown keys and wrong types are `UserError`s that name the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from scratchlm.errors import UserError

ARCHS = ("gpt2", "llama")
SCHEDULES = (
    "constant",
    "cosine",
    "step",
    "exponential",
    "linear",
    "inverse_sqrt",
    "onecycle",
    "wsd",
)
PRECISIONS = ("auto", "fp32", "bf16", "bf16-master", "fp16")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer. Two families share one implementation."""

    arch: str = "gpt2"
    """`gpt2`: LayerNorm, learned positions, GELU MLP, biases. `llama`: RMSNorm, RoPE, SwiGLU, GQA."""
    vocab_size: int = 0
    """Number of token ids; 0 means "take it from the data's tokenizer" at train time."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Number of attention (query) heads."""
    n_kv_head: int = 0
    """Key/value heads for grouped-query attention (llama); 0 means equal to n_head."""
    d_model: int = 128
    """Width of the residual stream."""
    d_ff: int = 0
    """Hidden width of the MLP; 0 derives it (4*d_model for gpt2, ~8/3*d_model for llama)."""
    context_length: int = 256
    """Longest sequence the model attends over (positions 0..context_length-1)."""
    dropout: float = 0.0
    """Dropout on the embeddings and residual branches during training."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities. Off by default: with it, torch's CPU attention falls
    back to materialising every (T, T) score matrix (a bf16 `small` step: 11.3 s vs 6.8 s)."""
    bias: bool = True
    """Biases in linear layers and LayerNorm (gpt2 uses them; llama does not)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output projection."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies (llama)."""
    gelu_approximate: str = "none"
    """gpt2 MLP: "none" (exact erf GELU, ~3x cheaper forward+backward on CPU) or "tanh" (GPT-2's)."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"model.arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.d_ff == 0:
            self.d_ff = default_d_ff(self.arch, self.d_model)
        for name in ("n_layer", "n_head", "d_model", "context_length"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise UserError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head:
            raise UserError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})"
            )
        if self.arch == "gpt2" and self.n_kv_head != self.n_head:
            raise UserError("model.n_kv_head (grouped-query attention) needs arch = 'llama'")
        if self.arch == "llama" and self.head_dim % 2:
            raise UserError(f"llama needs an even head size for RoPE, got {self.head_dim}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise UserError(f"model.gelu_approximate must be none or tanh, got {self.gelu_approximate!r}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("norm_eps", "rope_theta"):  # (not x > 0 is also true for NaN)
            if not getattr(self, name) > 0:
                raise UserError(f"model.{name} must be > 0, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def default_d_ff(arch: str, d_model: int) -> int:
    """4*d for GELU MLPs; for SwiGLU 2/3 of that (same parameter count), rounded up to 64."""
    if arch == "gpt2":
        return 4 * d_model
    return 64 * math.ceil(8 * d_model / 3 / 64)


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, evaluation and checkpointing of a training run."""

    batch_size: int = 12
    """Sequences per micro-batch (per process)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (per process); ignored when tokens_per_step is set."""
    tokens_per_step: int = 0
    """If > 0: target tokens per optimizer step; grad_accum_steps is derived from it."""
    max_steps: int = 2000
    """Optimizer steps of the run; also the horizon of the learning-rate schedule."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Floor of decaying schedules (eta_min)."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many optimizer steps, in front of any schedule."""
    schedule: str = "cosine"
    """One of: constant, cosine, step, exponential, linear, inverse_sqrt, onecycle, wsd."""
    gamma: float = 0.1
    """Decay factor: per step_size steps (step) or per step (exponential)."""
    step_size: int = 1000
    """Steps between decays of the step schedule."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent in the final linear decay."""
    pct_start: float = 0.3
    """onecycle: fraction of max_steps spent rising from min_lr to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied only to >= 2-D weights (not biases, norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    precision: str = "auto"
    """auto (the fastest this device runs well: bf16 on GPUs with bf16, else fp16; bf16-master
    on CPUs with native bf16 matmul (AVX512-BF16 or AMX), else fp32); fp32; bf16 (autocast, fp32
    weights); bf16-master (bf16 weights and activations, fp32 master weights in the optimizer:
    no per-op casts); fp16 (CUDA only, with a gradient scaler)."""
    eval_interval: int = 250
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_steps: int = 20
    """Validation batches per in-training evaluation."""
    checkpoint_interval: int = 0
    """Save a checkpoint every this many steps; 0 means at every evaluation."""
    keep_last: int = 3
    """Number of step checkpoints kept besides the latest and the best."""
    log_interval: int = 10
    """Write a metrics.jsonl line every this many steps."""
    seed: int = 1337
    """Seed for initialisation, data sampling and dropout."""
    compile: bool = False
    """Wrap the model in torch.compile (slow first step, faster after)."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    sample_tokens: int = 0
    """If > 0: print a greedy sample of this many tokens at each evaluation."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
                + _did_you_mean(self.schedule, SCHEDULES)
            )
        if self.precision not in PRECISIONS:
            raise UserError(
                f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        for name in ("batch_size", "grad_accum_steps", "max_steps", "eval_steps", "step_size"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(
                f"need 0 <= train.min_lr <= train.lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise UserError(
                f"train.warmup_steps ({self.warmup_steps}) must be in [0, max_steps={self.max_steps}]"
            )
        if not 0.0 < self.gamma <= 1.0:
            raise UserError(f"train.gamma must be in (0, 1], got {self.gamma}")
        for name in ("decay_fraction", "pct_start"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise UserError(f"train.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.eval_interval < 1 or self.log_interval < 1:
            raise UserError("train.eval_interval and train.log_interval must be >= 1")


@dataclass
class RunConfig:
    """Everything a training run needs besides the data: saved as config.json in the run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Strict: unknown sections or keys are errors (a run directory must describe itself)."""
        if not isinstance(d, dict):
            raise UserError(f"a run config must be a table with [model] and [train], got {d!r}")
        _check_keys(d, ("model", "train"), "config")
        return cls(
            model=_build(ModelConfig, d.get("model", {}), "model"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
        )


# Presets are partial configs: only what differs from the dataclass defaults.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # A model small enough for tests, the demo's quick checks and the serving benchmark.
    "tiny": {
        "model": {"n_layer": 2, "n_head": 4, "d_model": 64, "context_length": 256},
        "train": {"batch_size": 8, "max_steps": 200, "warmup_steps": 20, "eval_interval": 50},
    },
    # The character-level tinyshakespeare benchmark configuration (REFERENCE_FIGURES.md).
    "shakespeare-char": {
        "model": {"n_layer": 4, "n_head": 4, "d_model": 128, "context_length": 64, "dropout": 0.0,
                  "bias": False},
        "train": {
            "batch_size": 12,
            "max_steps": 2000,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 100,
            "beta2": 0.99,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
            "eval_interval": 250,
            "eval_steps": 20,
            # auto: bf16-master where the CPU multiplies bf16 natively (18 ms vs 23 ms per step
            # with autocast, 2 threads), fp32 where bf16 is emulated (4x slower than fp32 there).
            "precision": "auto",
        },
    },
    # The 10.65M-parameter shakespeare model (6 layers, 6 heads, 384 wide, context 256, no biases).
    "small": {
        "model": {"n_layer": 6, "n_head": 6, "d_model": 384, "context_length": 256, "dropout": 0.2,
                  "bias": False},
        "train": {
            "batch_size": 64,
            "max_steps": 5000,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 100,
            "beta2": 0.99,
            "eval_interval": 250,
            "eval_steps": 20,
            "precision": "auto",
        },
    },
    "gpt2-124m": {
        "model": {
            "arch": "gpt2",
            "n_layer": 12,
            "n_head": 12,
            "d_model": 768,
            "context_length": 1024,
        },
        "train": {
            "batch_size": 8,
            "tokens_per_step": 524288,
            "max_steps": 19073,
            "lr": 6e-4,
            "min_lr": 6e-5,
            "warmup_steps": 715,
            "eval_interval": 500,
        },
    },
    "llama-125m": {
        "model": {
            "arch": "llama",
            "n_layer": 12,
            "n_head": 12,
            "n_kv_head": 4,
            "d_model": 768,
            "context_length": 2048,
            "bias": False,
            "tie_embeddings": True,
        },
        "train": {
            "batch_size": 4,
            "tokens_per_step": 524288,
            "max_steps": 20000,
            "lr": 6e-4,
            "min_lr": 6e-5,
            "warmup_steps": 1000,
            "eval_interval": 500,
        },
    },
}


def load_run_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """Defaults (or `base`, e.g. a run's saved config) <- preset <- TOML file <- `--set
    section.key=value` overrides, in that order."""
    merged: dict[str, dict[str, Any]] = base.to_dict() if base else {"model": {}, "train": {}}
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(
                f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}"
                + _did_you_mean(preset, list(PRESETS))
            )
        _merge(merged, PRESETS[preset])
    if config_file is not None:
        _merge(merged, read_toml(config_file))
    for item in overrides or []:
        _merge(merged, parse_override(item))
    return RunConfig.from_dict(merged)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    _check_keys(data, ("model", "train"), f"{path}")
    return data


def parse_override(item: str) -> dict[str, dict[str, Any]]:
    """`train.lr=3e-4` -> {"train": {"lr": 3e-4}}; the value is read as a TOML value, else a string."""
    key, sep, raw = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise UserError(f"--set expects section.key=value (e.g. train.lr=3e-4), got {item!r}")
    _check_keys({section: None}, ("model", "train"), "--set")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as cosine or llama
    return {section: {name: value}}


def _merge(into: dict[str, dict[str, Any]], new: dict[str, Any]) -> None:
    for section, values in new.items():
        if not isinstance(values, dict):
            raise UserError(f"[{section}] must be a table of key = value pairs")
        into.setdefault(section, {}).update(values)


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"[{section}] must be a table of keys and values, got {values!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _check_keys(values, names, f"[{section}]", prefix=f"{section}.")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Accept exactly the declared type (ints where floats are expected are widened)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise UserError(f"{where} must be true or false, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, typ):
        raise UserError(f"{where} must be of type {typ.__name__}, got {value!r}")
    return value


def _check_keys(d: dict[str, Any], valid: Any, where: str, prefix: str = "") -> None:
    for key in d:
        if key not in valid:
            raise UserError(
                f"unknown key {prefix}{key} in {where}" + _did_you_mean(key, valid, prefix)
            )


def _did_you_mean(word: str, choices: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else ""
