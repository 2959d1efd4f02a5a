"""Figures: a run's training curves, and the learning-rate schedules.

Driven by the trainer, which calls `plot_run(run_dir)` at every evaluation and at the end (so it
must stay well under a second for 10k metric lines), by `scratchlm schedule NAME ... --plot FILE`
(`plot_schedule`), and by docs/schedules.md, whose figure comes from `plot_schedules(path)`.

Figures are drawn with matplotlib's object API on an Agg canvas: no display, no pyplot global
state (nothing to leak between calls in a long training run), and every PNG is written to a
temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scratchlm.config import TrainConfig
from scratchlm.errors import UserError
from scratchlm.files import atomic_write
from scratchlm.schedules import SCHEDULE_NAMES, describe, lr_at

_DPI = 100


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, in file order.

    A last line that does not parse is skipped (the trainer may be appending it right now, or
    was killed mid-write); a bad line anywhere else means the file is damaged and is an error.
    Records without a `step` cannot be placed on an axis and are left out. When the step goes
    backwards (a run resumed from an earlier checkpoint appends to the same file), the resumed
    records replace the abandoned ones from that step on, so the curves never fold back.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        raise UserError(f"no metrics file at {path}; is this a training run directory?") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}: line {i + 1} is not valid JSON") from None
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            if records and rec["step"] < records[-1]["step"]:
                records = [r for r in records if r["step"] < rec["step"]]
            records.append(rec)
        elif i != len(lines) - 1:
            raise UserError(f"{path}: line {i + 1} is not a metrics record with a step")
    return records


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that carry a numeric `key`."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _new_axes(title: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(7.0, 4.0), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", alpha=0.6)


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` atomically: a temporary file in the same directory, then a rename."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI))
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw RUN_DIR/metrics.jsonl as loss.png, lr.png and throughput.png in RUN_DIR.

    Args:
        run_dir: a run directory holding metrics.jsonl (records with `step` and any of `loss`,
            `val_loss`, `lr`, `tokens_per_s`; missing keys are simply not drawn).
    Returns:
        The three PNG paths, in that order.
    Example:
        >>> plot_run("runs/demo")  # doctest: +SKIP
        [PosixPath('runs/demo/loss.png'), PosixPath('runs/demo/lr.png'), ...]
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written = []

    fig, ax = _new_axes("loss", "cross-entropy (nats/token)")
    xs, ys = _series(records, "loss")
    vx, vy = _series(records, "val_loss")
    if xs:
        ax.plot(xs, ys, lw=1.0, label="train")
    if vx:
        ax.plot(vx, vy, "o-", ms=3, lw=1.5, label="validation")
    if xs or vx:
        ax.legend()
    else:
        _no_data(ax)
    written.append(save_png(fig, run_dir / "loss.png"))

    fig, ax = _new_axes("learning rate", "lr")
    xs, ys = _series(records, "lr")
    if xs:
        ax.plot(xs, ys, lw=1.2)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        _no_data(ax)
    written.append(save_png(fig, run_dir / "lr.png"))

    fig, ax = _new_axes("throughput", "tokens / s")
    xs, ys = _series(records, "tokens_per_s")
    if xs:
        ax.plot(xs, ys, lw=1.0)
        ax.set_ylim(bottom=0)
    else:
        _no_data(ax)
    written.append(save_png(fig, run_dir / "throughput.png"))
    return written


def _curve(cfg: TrainConfig, points: int = 600) -> tuple[list[int], list[float]]:
    """The schedule sampled densely over 0..max_steps (every step when that is few enough)."""
    n = cfg.max_steps
    if n <= points:
        steps = list(range(n + 1))
    else:
        steps = sorted({round(i * n / points) for i in range(points + 1)})
    return steps, [lr_at(s, cfg) for s in steps]


def plot_schedule(path: str | Path, cfg: TrainConfig, marks: Sequence[int] = ()) -> Path:
    """One schedule over 0..max_steps (held flat past it if `marks` go further), with dots at
    `marks`. Used by `scratchlm schedule ... --plot FILE`."""
    fig, ax = _new_axes(f"{cfg.schedule}: {describe(cfg)}", "learning rate")
    xs, ys = _curve(cfg)
    last = max([cfg.max_steps, *marks])
    if last > cfg.max_steps:
        xs, ys = xs + [last], ys + [ys[-1]]
    ax.plot(xs, ys, lw=1.5)
    if cfg.warmup_steps:
        ax.axvspan(0, cfg.warmup_steps, color="0.85", zorder=0, label="warmup")
        ax.legend(loc="upper right")
    if marks:
        ax.plot(list(marks), [lr_at(s, cfg) for s in marks], "o", ms=5, color="C3")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return save_png(fig, path)


def plot_schedules(
    path: str | Path,
    *,
    lr: float = 1e-3,
    min_lr: float = 1e-4,
    max_steps: int = 2000,
    warmup_steps: int = 100,
) -> Path:
    """Every schedule side by side, one panel each, with the same lr, min_lr, horizon and warmup
    (onecycle without warmup, since its rise is its warmup). The figure in docs/schedules.md."""
    cols = 4
    rows = math.ceil(len(SCHEDULE_NAMES) / cols)
    fig = Figure(figsize=(3.4 * cols, 2.6 * rows), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, name in zip(axes, SCHEDULE_NAMES):
        cfg = TrainConfig(
            schedule=name, lr=lr, min_lr=min_lr, max_steps=max_steps,
            warmup_steps=0 if name == "onecycle" else warmup_steps,
            gamma=0.998 if name == "exponential" else 0.5, step_size=max_steps // 4,
        )
        xs, ys = _curve(cfg, points=400)
        if cfg.warmup_steps:
            ax.axvspan(0, cfg.warmup_steps, color="0.88", zorder=0)
        ax.axhline(min_lr, color="0.6", lw=0.8, ls=":")
        ax.plot(xs, ys, lw=1.6)
        label = {"step": "step (gamma 0.5)", "exponential": "exponential (gamma 0.998)"}
        ax.set_title(label.get(name, name), fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(SCHEDULE_NAMES):]:
        ax.set_visible(False)
    for ax in axes[-cols:]:
        ax.set_xlabel("optimizer step")
    for ax in axes[::cols]:
        ax.set_ylabel("lr")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    fig.suptitle(
        f"lr={lr:g}, min_lr={min_lr:g} (dotted), max_steps={max_steps}, "
        f"warmup={warmup_steps} (shaded)"
    )
    return save_png(fig, path)
