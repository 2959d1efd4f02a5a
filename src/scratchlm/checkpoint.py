"""Run directories: everything a trained model needs, written atomically, loaded strictly.

    RUN_DIR/config.json        {"format_version": 1, "model": {...}, "train": {...}, "data": {...}}
    RUN_DIR/model.safetensors  weights of the unwrapped module (metadata: the step)
    RUN_DIR/tokenizer.json     the data's tokenizer, the only one used downstream
    RUN_DIR/trainer_state.pt   optimizer, scaler, step, RNG states, data cursor (resume only)
    RUN_DIR/checkpoints/step_NNNNNNN/   the last K checkpoints, each a complete run directory
    RUN_DIR/best/              the best weights by validation loss (+ config.json, tokenizer.json)
    RUN_DIR/metrics.jsonl, RUN_DIR/tb/   one JSON object per logged step; TensorBoard events

Written by `scratchlm train` (`save_checkpoint`, `write_run`) and `import-hf` (`write_run`);
read by `eval`, `generate`, `serve`, `export` through `load_run()` and by `train --resume`
through `find_resume_checkpoint()` + `load_trainer_state()`.

Every file goes to a temporary name first and is renamed into place, so an interrupted save
never leaves a half-written file under a real name. A step checkpoint is built in a temporary
directory and renamed as a whole, then hard-linked into RUN_DIR: a crash at any point leaves
the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchlm.config import RunConfig
from scratchlm.errors import UserError
from scratchlm.files import atomic_write, atomic_write_text, read_json, usual_permissions
from scratchlm.model import Transformer

FORMAT_VERSION = 1


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped module's tensors (no DDP `module.` or compile `_orig_mod.` prefixes).
    Tied weights are stored once, under the embedding's name."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    state = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_weights(path: str | Path, model: torch.nn.Module, step: int | None = None) -> None:
    """model.safetensors of the unwrapped module; `step` goes into the file's metadata."""
    state = model_state(model)
    metadata = {"format": "pt"} if step is None else {"format": "pt", "step": str(step)}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


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
    raw = read_json(path, "the run directory is damaged; train again or restore config.json")
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
        raise UserError(f"weights in {path} do not match config.json: {mismatch(e)}") from None


def mismatch(e: Exception) -> str:
    """A `load_state_dict` error on one line: torch puts what is wrong (the tensor, its shapes)
    on the lines after a header; the first three are kept."""
    lines = [line.strip() for line in str(e).strip().splitlines()]
    return "; ".join(lines[1:4] or lines[:1]) + ("; ..." if len(lines) > 4 else "")


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
    try:
        model = Transformer(cfg.model)
    except (ValueError, RuntimeError) as e:  # e.g. no vocab_size, or too large to allocate
        raise UserError(f"cannot build the model that {run_dir / 'config.json'} describes: "
                        f"{str(e).strip().splitlines()[0]}") from None
    if cfg.model.vocab_size < tokenizer.vocab_size:  # (more rows than ids is fine: rounded up)
        raise UserError(f"{run_dir}: tokenizer.json has {tokenizer.vocab_size} ids but the model in "
                        f"config.json only {cfg.model.vocab_size} rows: they come from different runs")
    load_weights(model, run_dir / weights)
    return model.to(device).eval(), tokenizer, cfg


# --- training checkpoints ------------------------------------------------------------------------

TRAINER_STATE = "trainer_state.pt"
CHECKPOINTS = "checkpoints"
BEST = "best"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer touches, as tensors and primitives (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` captured (CUDA states only where the devices exist)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of the complete step checkpoints in RUN_DIR/checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put src's content at dst atomically: a hard link (no copy) where the filesystem allows."""

    def write(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    atomic_write(dst, write)


def save_checkpoint(
    run_dir: str | Path,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    tokenizer_path: str | Path,
    keep_last: int,
) -> Path:
    """Save a step checkpoint and make it RUN_DIR's latest; keep only the last `keep_last`.

    Args:
        run_dir: the run directory.
        model: the model (DDP / torch.compile wrappers are unwrapped).
        trainer_state: `{"step": int, ...}` of tensors and primitives only (see `train.py`).
        config: the whole config.json content (format_version, model, train, data).
        tokenizer_path: the data's tokenizer.json.
        keep_last: step directories to keep (0: only RUN_DIR's own files are kept).
    Returns:
        The step directory (already deleted again when keep_last is 0).

    Order of writes: the complete step directory under a temporary name, one rename; then each
    RUN_DIR file replaced atomically by a hard link to it (model.safetensors before
    trainer_state.pt, so a crash in between is detected by `find_resume_checkpoint`).
    """
    run_dir = Path(run_dir)
    step = int(trainer_state["step"])
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    usual_permissions(tmp)
    try:
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        save_weights(tmp / "model.safetensors", model, step=step)
        atomic_write(tmp / TRAINER_STATE, lambda t: torch.save(trainer_state, t))
        if final.exists():  # the same step saved again (e.g. stop_at on an eval step)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in ("config.json", "tokenizer.json", "model.safetensors", TRAINER_STATE):
        _link_or_copy(final / name, run_dir / name)
    kept = list_step_checkpoints(run_dir)
    for _, old in kept[: max(0, len(kept) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(
    run_dir: str | Path,
    model: torch.nn.Module,
    config: dict[str, Any],
    tokenizer_path: str | Path,
    step: int,
    val_loss: float,
) -> None:
    """RUN_DIR/best/: model.safetensors, config.json, tokenizer.json and best.json
    ({"step", "val_loss"}), so `load_run(RUN_DIR / "best")` loads the best model."""
    best = Path(run_dir) / BEST
    write_run(best, model, RunConfig.from_dict({k: config[k] for k in ("model", "train")}),
              tokenizer_path, extra={k: v for k, v in config.items()
                                     if k not in ("model", "train", "format_version")})
    atomic_write_text(best / "best.json", json.dumps({"step": step, "val_loss": val_loss}) + "\n")


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete temporaries a killed process left behind (names start with '.' and end in .tmp)."""
    run_dir = Path(run_dir)
    for d in (run_dir, run_dir / BEST, run_dir / CHECKPOINTS):
        if not d.is_dir():
            continue
        for p in d.glob(".*.tmp"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def weights_step(path: str | Path) -> int | None:
    """The step recorded in a model.safetensors' metadata (None when absent)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError):
        return None
    return int(step) if step is not None and step.isdigit() else None


def torch_load_safe(path: str | Path, hint: str) -> Any:
    """`torch.load(path, weights_only=True)`: tensors, numbers and containers only, never code.
    A file that holds other objects, or is damaged, is a one-line `UserError` ending in `hint`."""
    from pickle import UnpicklingError  # what torch.load's safe unpickler raises

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {path}: {first}; {hint}") from None
    except Exception as e:  # noqa: BLE001 - a text file read as a pickle fails in arbitrary ways (KeyError...)
        # A class or function ("Unsupported global", "unsupported GLOBAL ... is blocked"):
        # loading it could run code.
        if isinstance(e, UnpicklingError) and "global" in str(e).lower():
            raise UserError(f"cannot read {path}: it holds Python objects besides tensors and "
                            f"numbers, which scratchlm will not load (that could run code); {hint}") from None
        raise UserError(f"cannot read {path}: it is damaged or not a PyTorch file; {hint}") from None


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """trainer_state.pt, loaded with weights_only=True (tensors and primitives only)."""
    state = torch_load_safe(path, "resume from another checkpoint")
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{path} is not a scratchlm trainer state")
    return state


def find_resume_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """(directory, its trainer state) to resume from: RUN_DIR itself when its weights and trainer
    state belong to the same step, else the newest complete step checkpoint.

    A crash between replacing RUN_DIR's model.safetensors and its trainer_state.pt leaves them
    at different steps; the step directory, renamed into place whole, is then the safe choice.
    """
    run_dir = Path(run_dir)
    state_path = run_dir / TRAINER_STATE
    if state_path.is_file() and (run_dir / "model.safetensors").is_file():
        state = load_trainer_state(state_path)
        if weights_step(run_dir / "model.safetensors") == state["step"]:
            return run_dir, state
    steps = list_step_checkpoints(run_dir)
    if steps:
        return steps[-1][1], load_trainer_state(steps[-1][1] / TRAINER_STATE)
    raise UserError(
        f"{run_dir} has no checkpoint to resume from (no {TRAINER_STATE}); "
        "train without --resume to start a new run"
    )


# --- metrics -------------------------------------------------------------------------------------


class MetricsLog:
    """RUN_DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard under RUN_DIR/tb.

    On resume the lines past the resume step are dropped (they belong to the abandoned
    future), and TensorBoard purges its events past that step the same way.
    """

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.start_step = start_step
        if start_step > 0 and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if _line_step(line) is not None and _line_step(line) <= start_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif start_step == 0:
            self.path.unlink(missing_ok=True)
        self.file = self.path.open("a", encoding="utf-8")
        self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        tb = self._writer()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                tb.add_scalar(_TB_TAGS.get(key, key), value, record["step"])

    def _writer(self):  # noqa: ANN202 - SummaryWriter is imported lazily (~0.2 s)
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: drop events of an abandoned future, as for metrics.jsonl.
            purge = self.start_step + 1 if self.start_step else None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)
        return self._tb

    def close(self) -> None:
        self.file.close()
        if self._tb is not None:
            self._tb.close()


_TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "perf/tokens_per_s",
            "mfu": "perf/mfu", "elapsed_s": "perf/elapsed_s", "val_loss": "val/loss",
            "val_ppl": "val/perplexity", "val_bpb": "val/bits_per_byte"}


def _line_step(line: str) -> int | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec.get("step") if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None
