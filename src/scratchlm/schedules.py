"""Learning-rate schedules: pure functions of the optimizer step.

Driven by `scratchlm.train`, which calls `lr_at(step, cfg.train)` once per optimizer step, and by
`scratchlm schedule NAME --lr LR --steps T --at 0,1250,...` (`schedule_cli`), which prints the
values a run would use. docs/schedules.md derives every formula below.

Conventions shared by every schedule (T = max_steps, W = warmup_steps, t = optimizer step):

- `t` counts optimizer updates, never micro-batches: gradient accumulation cannot stretch the
  horizon (the rebuilt system sized its cosine in micro-batches, so it never finished decaying).
- Warmup: for t < W the rate rises linearly from 0, lr_t = start * t / W, where `start` is the
  value the schedule begins at (the peak lr for all but onecycle, whose own ramp begins at
  min_lr). Step 0 of a warmed-up run therefore has lr 0, as in the chapter and in Hugging Face.
- After warmup the schedule runs over the remaining span T - W, with s = t - W.
- For t >= T the value at T is held: stopping late never restarts or extrapolates a curve.
- Decaying schedules never go below min_lr.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
from collections.abc import Callable
from pathlib import Path

from scratchlm.config import TrainConfig
from scratchlm.errors import UserError

__all__ = [
    "SCHEDULE_NAMES",
    "constant",
    "cosine",
    "describe",
    "exponential",
    "inverse_sqrt",
    "linear",
    "lr_at",
    "onecycle",
    "schedule_cli",
    "step_decay",
    "wsd",
]


def _clamp(step: int, max_steps: int) -> int:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step if step < max_steps else max_steps


def _progress(t: int, warmup_steps: int, max_steps: int) -> float:
    """Fraction of the post-warmup span done at step t (t >= warmup_steps); 1.0 at the horizon."""
    span = max_steps - warmup_steps
    return 1.0 if span <= 0 else (t - warmup_steps) / span


def constant(step: int, *, lr: float, max_steps: int, warmup_steps: int = 0) -> float:
    """lr after warmup."""
    t = _clamp(step, max_steps)
    if t < warmup_steps:
        return lr * t / warmup_steps
    return lr


def cosine(
    step: int, *, lr: float, max_steps: int, min_lr: float = 0.0, warmup_steps: int = 0
) -> float:
    """Half a cosine from lr down to min_lr over the post-warmup span (cosine annealing)."""
    t = _clamp(step, max_steps)
    if t < warmup_steps:
        return lr * t / warmup_steps
    p = _progress(t, warmup_steps, max_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def linear(
    step: int, *, lr: float, max_steps: int, min_lr: float = 0.0, warmup_steps: int = 0
) -> float:
    """A straight line from lr down to min_lr over the post-warmup span."""
    t = _clamp(step, max_steps)
    if t < warmup_steps:
        return lr * t / warmup_steps
    p = _progress(t, warmup_steps, max_steps)
    return lr + (min_lr - lr) * p


def step_decay(
    step: int,
    *,
    lr: float,
    max_steps: int,
    gamma: float,
    step_size: int,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
) -> float:
    """lr * gamma ** floor(s / step_size), s counted from the end of warmup; floored at min_lr."""
    if not 0.0 < gamma <= 1.0 or step_size < 1:
        raise ValueError(f"need 0 < gamma <= 1 and step_size >= 1, got {gamma}, {step_size}")
    t = _clamp(step, max_steps)
    if t < warmup_steps:
        return lr * t / warmup_steps
    return max(min_lr, lr * gamma ** ((t - warmup_steps) // step_size))


def exponential(
    step: int,
    *,
    lr: float,
    max_steps: int,
    gamma: float,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
) -> float:
    """lr * gamma ** s (gamma is the factor per optimizer step, e.g. 0.999); floored at min_lr."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"need 0 < gamma <= 1, got {gamma}")
    t = _clamp(step, max_steps)
    if t < warmup_steps:
        return lr * t / warmup_steps
    return max(min_lr, lr * gamma ** (t - warmup_steps))


def inverse_sqrt(
    step: int, *, lr: float, max_steps: int, min_lr: float = 0.0, warmup_steps: int = 0
) -> float:
    """lr * sqrt(W / t) after warmup (t counted from 0, so it meets the warmup at t = W).

    With W = 0 the reference step is 1: lr at steps 0 and 1, then lr / sqrt(t). Floored at min_lr.
    """
    t = _clamp(step, max_steps)
    if t < warmup_steps:
        return lr * t / warmup_steps
    ref = max(warmup_steps, 1)
    return max(min_lr, lr * math.sqrt(ref / max(t, ref)))


def onecycle(
    step: int,
    *,
    lr: float,
    max_steps: int,
    min_lr: float = 0.0,
    pct_start: float = 0.3,
    warmup_steps: int = 0,
) -> float:
    """Rise linearly min_lr -> lr until step pct_start * T, then fall linearly back to min_lr at T.

    The rise is itself a warmup; a separate warmup in front ramps 0 -> min_lr (the value the cycle
    starts at) so the curve stays continuous, and the rise begins at W if pct_start * T < W.
    """
    t = _clamp(step, max_steps)
    if t < warmup_steps:
        return min_lr * t / warmup_steps
    peak = max(float(warmup_steps), pct_start * max_steps)
    if t < peak:
        return min_lr + (lr - min_lr) * (t - warmup_steps) / (peak - warmup_steps)
    fall = max_steps - peak
    return lr if fall <= 0 else lr - (lr - min_lr) * (t - peak) / fall


def wsd(
    step: int,
    *,
    lr: float,
    max_steps: int,
    min_lr: float = 0.0,
    decay_fraction: float = 0.2,
    warmup_steps: int = 0,
) -> float:
    """Warmup-stable-decay: hold lr, then over the last decay_fraction * T steps fall linearly to
    min_lr. The decay never starts before warmup ends."""
    t = _clamp(step, max_steps)
    if t < warmup_steps:
        return lr * t / warmup_steps
    start = max(float(warmup_steps), max_steps - decay_fraction * max_steps)
    if t <= start:
        return lr if start < max_steps else min_lr
    return lr + (min_lr - lr) * (t - start) / (max_steps - start)


# name -> function of (step, TrainConfig); lr_at is one dict lookup and one call.
_DISPATCH: dict[str, Callable[[int, TrainConfig], float]] = {
    "constant": lambda t, c: constant(
        t, lr=c.lr, max_steps=c.max_steps, warmup_steps=c.warmup_steps
    ),
    "cosine": lambda t, c: cosine(
        t, lr=c.lr, max_steps=c.max_steps, min_lr=c.min_lr, warmup_steps=c.warmup_steps
    ),
    "step": lambda t, c: step_decay(
        t, lr=c.lr, max_steps=c.max_steps, gamma=c.gamma, step_size=c.step_size,
        min_lr=c.min_lr, warmup_steps=c.warmup_steps,
    ),
    "exponential": lambda t, c: exponential(
        t, lr=c.lr, max_steps=c.max_steps, gamma=c.gamma, min_lr=c.min_lr,
        warmup_steps=c.warmup_steps,
    ),
    "linear": lambda t, c: linear(
        t, lr=c.lr, max_steps=c.max_steps, min_lr=c.min_lr, warmup_steps=c.warmup_steps
    ),
    "inverse_sqrt": lambda t, c: inverse_sqrt(
        t, lr=c.lr, max_steps=c.max_steps, min_lr=c.min_lr, warmup_steps=c.warmup_steps
    ),
    "onecycle": lambda t, c: onecycle(
        t, lr=c.lr, max_steps=c.max_steps, min_lr=c.min_lr, pct_start=c.pct_start,
        warmup_steps=c.warmup_steps,
    ),
    "wsd": lambda t, c: wsd(
        t, lr=c.lr, max_steps=c.max_steps, min_lr=c.min_lr, decay_fraction=c.decay_fraction,
        warmup_steps=c.warmup_steps,
    ),
}

SCHEDULE_NAMES: tuple[str, ...] = tuple(_DISPATCH)
"""Every schedule `TrainConfig.schedule` and `scratchlm schedule NAME` accept."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run configured by `cfg`.

    The horizon is `cfg.max_steps` optimizer steps; `cfg.grad_accum_steps` plays no part.

    Example:
        >>> lr_at(2500, TrainConfig(schedule="cosine", lr=2e-3, min_lr=1e-4, max_steps=5000,
        ...                         warmup_steps=0))
        0.00105
    """
    return _DISPATCH[cfg.schedule](step, cfg)


# ---------------------------------------------------------------------------------------------
# `scratchlm schedule`


def _closest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.0)
    return f"; did you mean {close[0]}?" if close else ""


def _config_from_args(a: argparse.Namespace) -> TrainConfig:
    """Check the flags with messages that name them, then build the config the trainer would."""
    if a.name not in SCHEDULE_NAMES:
        raise UserError(
            f"unknown schedule {a.name!r}; choose one of {', '.join(SCHEDULE_NAMES)}"
            + _closest(a.name, SCHEDULE_NAMES)
        )
    checks = [
        (a.lr > 0 and math.isfinite(a.lr), f"--lr must be a positive number, got {a.lr}"),
        (a.steps >= 1, f"--steps must be >= 1, got {a.steps}"),
        (0 <= a.min_lr <= a.lr, f"--min-lr must be in [0, --lr={a.lr}], got {a.min_lr}"),
        (0 <= a.warmup_steps <= a.steps,
         f"--warmup-steps must be in [0, --steps={a.steps}], got {a.warmup_steps}"),
        (0 < a.gamma <= 1, f"--gamma must be in (0, 1], got {a.gamma}"),
        (a.step_size >= 1, f"--step-size must be >= 1, got {a.step_size}"),
        (0 < a.decay_fraction <= 1, f"--decay-fraction must be in (0, 1], got {a.decay_fraction}"),
        (0 < a.pct_start <= 1, f"--pct-start must be in (0, 1], got {a.pct_start}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return TrainConfig(
        schedule=a.name, lr=a.lr, min_lr=a.min_lr, max_steps=a.steps,
        warmup_steps=a.warmup_steps, gamma=a.gamma, step_size=a.step_size,
        decay_fraction=a.decay_fraction, pct_start=a.pct_start,
    )


def _parse_steps(at: str | None, max_steps: int) -> list[int]:
    """`--at 0,1250,2500` -> [0, 1250, 2500]; absent -> 11 evenly spaced steps over 0..T."""
    if at is None:
        return [round(i * max_steps / 10) for i in range(11)]
    steps = []
    for item in at.split(","):
        item = item.strip()
        try:
            step = int(item)
        except ValueError:
            raise UserError(
                f"--at expects comma-separated whole steps such as 0,1250,2500, got {item!r}"
            ) from None
        if step < 0:
            raise UserError(f"--at steps must be >= 0, got {step}")
        steps.append(step)
    return steps


def schedule_cli(args: argparse.Namespace) -> int:
    """Print (and optionally plot) a schedule's learning rate at the requested steps.

    Reads the namespace of cli.py's `schedule` subparser. Returns the exit code (0).
    """
    cfg = _config_from_args(args)
    steps = _parse_steps(args.at, cfg.max_steps)
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise UserError(f"--plot: directory {Path(args.plot).parent} does not exist")
    lrs = [lr_at(s, cfg) for s in steps]
    if args.plot:
        from scratchlm.plots import plot_schedule  # matplotlib only when a plot is asked for

        plot_schedule(args.plot, cfg, marks=steps)
    if args.json:
        print(json.dumps({"steps": steps, "lr": lrs}))
        return 0
    print(f"{cfg.schedule}: {describe(cfg)}")
    print(f"{'step':>10}  {'lr':<12}  {'lr / peak':>9}")
    for s, v in zip(steps, lrs):
        print(f"{s:>10}  {v:<12.6g}  {v / cfg.lr:>9.4f}")
    if args.plot:
        print(f"wrote {Path(args.plot)}")
    return 0


def describe(cfg: TrainConfig) -> str:
    """The parameters that matter for this schedule, e.g. for a table header or plot title."""
    parts = [f"lr={cfg.lr:g}", f"steps={cfg.max_steps}", f"warmup={cfg.warmup_steps}"]
    extra = {
        "constant": [],
        "cosine": ["min_lr"],
        "linear": ["min_lr"],
        "inverse_sqrt": ["min_lr"],
        "step": ["min_lr", "gamma", "step_size"],
        "exponential": ["min_lr", "gamma"],
        "onecycle": ["min_lr", "pct_start"],
        "wsd": ["min_lr", "decay_fraction"],
    }[cfg.schedule]
    parts[1:1] = [f"{k}={getattr(cfg, k):g}" for k in extra]
    return " ".join(parts)
