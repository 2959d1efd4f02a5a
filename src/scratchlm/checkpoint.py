"""Run directories: everything a trained model needs, written atomically, loaded strictly.

    RUN_DIR/config.json        {"format_version": 1, "model": {...}, "train": {...}, ...}
    RUN_DIR/model.safetensors  weights of the unwrapped module
    RUN_DIR/tokenizer.json     the data's tokenizer, the only one used downstream

Written by `scratchlm train` (and `import-hf`); read by `eval`, `generate`, `serve`, `export`
through `load_run()`. Every file goes to a temporary name first and is renamed into place, so
an interrupted save never leaves a half-written file under a real name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchlm.config import RunConfig
from scratchlm.errors import UserError
from scratchlm.model import Transformer

FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) and rename the result to path (same directory, so rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped module's tensors (no DDP `module.` or compile `_orig_mod.` prefixes).
    Tied weights are stored once, under the embedding's name."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    state = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_weights(path: str | Path, model: torch.nn.Module) -> None:
    state = model_state(model)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def write_run(
    run_dir: str | Path,
    model: torch.nn.Module,
    cfg: RunConfig,
    tokenizer_path: str | Path,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write config.json, tokenizer.json and model.safetensors into run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, **cfg.to_dict(), **(extra or {})}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
    tok_dst = run_dir / "tokenizer.json"
    if Path(tokenizer_path).resolve() != tok_dst.resolve():
        atomic_write(tok_dst, lambda tmp: shutil.copyfile(tokenizer_path, tmp))
    save_weights(run_dir / "model.safetensors", model)


def read_run_config(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """(config, the whole config.json); a missing or foreign directory is a UserError."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise UserError(f"{run_dir} is not a scratchlm run directory (no config.json); "
                        "train one with `scratchlm train` or import one with `scratchlm import-hf`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a scratchlm run config of format_version {FORMAT_VERSION}")
    sections = {k: raw[k] for k in ("model", "train") if k in raw}
    return RunConfig.from_dict(sections), raw


def load_weights(model: Transformer, path: str | Path) -> None:
    """Load strictly: every tensor present with the right shape, nothing extra."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read weights {path}: {e}") from None
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("tok_emb.weight")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"weights in {path} do not match config.json: {first}") from None


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "model.safetensors"
) -> tuple[Transformer, Any, RunConfig]:
    """(model in eval mode, tokenizer, config) from a run directory."""
    from scratchlm.tokenizer import Tokenizer

    run_dir = Path(run_dir)
    cfg, _ = read_run_config(run_dir)
    for name in (weights, "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir} has no {name}: the run is incomplete or still starting")
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    model = Transformer(cfg.model)
    load_weights(model, run_dir / weights)
    return model.to(device).eval(), tokenizer, cfg
