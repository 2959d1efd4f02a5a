"""Learning-rate schedules: each against its formula written out here independently, the
scheduling chapter's worked exercise through the CLI, warmup, the horizon, and bad input."""

from __future__ import annotations

import inspect
import json
import math

import pytest

from scratchlm import config, schedules
from scratchlm.cli import main
from scratchlm.config import TrainConfig
from scratchlm.schedules import SCHEDULE_NAMES, lr_at

LR, MIN, T, W = 1e-3, 1e-4, 1000, 100
GAMMA_STEP, STEP_SIZE, GAMMA_EXP, FRAC, PCT = 0.5, 200, 0.995, 0.2, 0.3


def cfg(name: str, **kw) -> TrainConfig:
    base = dict(schedule=name, lr=LR, min_lr=MIN, max_steps=T, warmup_steps=W,
                gamma=GAMMA_EXP if name == "exponential" else GAMMA_STEP, step_size=STEP_SIZE,
                decay_fraction=FRAC, pct_start=PCT)
    base.update(kw)
    return TrainConfig(**base)


def expected(name: str, t: int, w: int = W) -> float:
    """Each schedule's formula, written from docs/schedules.md without the module's helpers."""
    t = min(t, T)
    if name == "onecycle":  # warms to the value its cycle starts at
        if t < w:
            return MIN * t / w
        peak = max(w, PCT * T)
        if t <= peak:
            return MIN + (LR - MIN) * (t - w) / (peak - w)
        return LR - (LR - MIN) * (t - peak) / (T - peak)
    if t < w:
        return LR * t / w
    s, span = t - w, T - w
    if name == "constant":
        return LR
    if name == "cosine":
        return MIN + (LR - MIN) * (1 + math.cos(math.pi * s / span)) / 2
    if name == "linear":
        return LR - (LR - MIN) * s / span
    if name == "step":
        return max(MIN, LR * GAMMA_STEP ** (s // STEP_SIZE))
    if name == "exponential":
        return max(MIN, LR * GAMMA_EXP ** s)
    if name == "inverse_sqrt":
        return max(MIN, LR * math.sqrt(max(w, 1)) / math.sqrt(max(t, w, 1)))
    if name == "wsd":
        start = T - FRAC * T
        return LR if t <= start else LR - (LR - MIN) * (t - start) / (T - start)
    raise AssertionError(name)


def test_names_match_config():
    assert set(SCHEDULE_NAMES) == set(config.SCHEDULES)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("t", [0, 1, W // 2, W - 1, W, W + 1, 250, 299, 300, 301, 500, 799,
                               800, 801, T - 1, T, T + 1, 10 * T])
def test_matches_formula(name, t):
    assert lr_at(t, cfg(name)) == pytest.approx(expected(name, t), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("t", [0, 1, 137, 500, T - 1, T, 2 * T])
def test_matches_formula_without_warmup(name, t):
    assert lr_at(t, cfg(name, warmup_steps=0)) == pytest.approx(
        expected(name, t, w=0), rel=1e-12, abs=1e-15
    )


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_boundaries(name):
    c = cfg(name)
    start = MIN if name == "onecycle" else LR
    assert lr_at(0, c) == 0.0  # warmup starts from zero
    assert lr_at(W, c) == pytest.approx(start)  # and reaches the schedule's first value at W
    assert lr_at(T + 1, c) == lr_at(T, c) == lr_at(10**9, c)  # held past the horizon
    if name in ("cosine", "linear", "onecycle", "wsd"):
        assert lr_at(T, c) == pytest.approx(MIN)
    assert all(lr_at(t, c) >= (MIN if t >= W else 0.0) for t in range(0, T + 1, 7))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_warmup_is_linear_and_monotone(name):
    c = cfg(name)
    values = [lr_at(t, c) for t in range(W + 1)]
    assert all(b > a for a, b in zip(values, values[1:]))
    diffs = [b - a for a, b in zip(values, values[1:])]
    assert max(diffs) == pytest.approx(min(diffs))


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_continuous_at_end_of_warmup(name):
    # No jump where warmup hands over (step decay's first drop is step_size later).
    c = cfg(name)
    assert abs(lr_at(W + 1, c) - lr_at(W, c)) < 0.01 * LR


def test_cosine_decreasing_after_warmup():
    c = cfg("cosine")
    values = [lr_at(t, c) for t in range(W, T + 1)]
    assert all(b < a for a, b in zip(values, values[1:]))


def test_inverse_sqrt_without_warmup_is_defined():
    c = cfg("inverse_sqrt", warmup_steps=0, min_lr=0.0)
    assert lr_at(0, c) == lr_at(1, c) == LR
    assert lr_at(4, c) == pytest.approx(LR / 2)
    assert lr_at(100, c) == pytest.approx(LR / 10)


def test_step_decay_drops_every_step_size_after_warmup():
    c = cfg("step", min_lr=0.0)
    assert lr_at(W + STEP_SIZE - 1, c) == LR
    assert lr_at(W + STEP_SIZE, c) == LR * GAMMA_STEP
    assert lr_at(W + 3 * STEP_SIZE, c) == LR * GAMMA_STEP**3


def test_wsd_decay_never_starts_inside_warmup():
    c = cfg("wsd", warmup_steps=900, decay_fraction=0.5)
    assert lr_at(900, c) == LR
    assert lr_at(950, c) == pytest.approx((LR + MIN) / 2)
    assert lr_at(T, c) == pytest.approx(MIN)


def test_whole_run_of_warmup_ends_at_final_value():
    c = cfg("cosine", warmup_steps=T)
    assert lr_at(T - 1, c) == pytest.approx(LR * (T - 1) / T)
    assert lr_at(T, c) == MIN


# --- the horizon is counted in optimizer steps -----------------------------------------------


def test_lr_at_takes_no_micro_step():
    assert list(inspect.signature(lr_at).parameters) == ["step", "cfg"]
    for name in SCHEDULE_NAMES:
        params = inspect.signature(getattr(schedules, name if name != "step" else "step_decay"))
        assert not any("micro" in p or "accum" in p for p in params.parameters)


@pytest.mark.parametrize("accum", [1, 4, 8])
def test_reaches_min_lr_at_max_steps_whatever_the_accumulation(accum):
    # The rebuilt system sized its cosine in micro-batches (T * accum): at the last optimizer
    # step it had done 1/accum of its decay. Here grad accumulation changes nothing.
    c = cfg("cosine", grad_accum_steps=accum, tokens_per_step=0)
    reference = cfg("cosine", grad_accum_steps=1)
    assert [lr_at(t, c) for t in range(0, T + 1, 50)] == [
        lr_at(t, reference) for t in range(0, T + 1, 50)
    ]
    assert lr_at(T, c) == pytest.approx(MIN)


def test_the_old_micro_batch_horizon_would_not_decay():
    # What the test above guards against, made concrete: a horizon of T * 4 leaves the rate near
    # the peak at the run's last optimizer step.
    wrong = schedules.cosine(T, lr=LR, max_steps=4 * T, min_lr=MIN)
    assert wrong > 0.8 * LR


# --- the CLI ----------------------------------------------------------------------------------

EXERCISE = ["schedule", "cosine", "--lr", "0.002", "--min-lr", "0.0001", "--steps", "5000",
            "--at", "0,1250,2500,3750,5000"]


def test_chapter_exercise_json(capsys):
    assert main([*EXERCISE, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == [0, 1250, 2500, 3750, 5000]
    # The chapter rounds cos(pi/4) to 0.707, so its 0.001721 is 6e-7 below the exact 0.00172175.
    assert out["lr"] == pytest.approx([0.002, 0.001721, 0.00105, 0.000378, 0.0001], abs=1e-6)
    assert out["lr"][0] == 0.002 and out["lr"][-1] == pytest.approx(0.0001, rel=1e-12)
    assert set(out) == {"steps", "lr"}


def test_chapter_exercise_table(capsys):
    assert main(EXERCISE) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    assert [int(r[0]) for r in rows] == [0, 1250, 2500, 3750, 5000]
    assert [round(float(r[1]), 5) for r in rows] == [0.002, 0.00172, 0.00105, 0.00038, 0.0001]


def test_default_steps_are_evenly_spaced(capsys):
    assert main(["schedule", "linear", "--lr", "1", "--steps", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == list(range(0, 101, 10))
    assert out["lr"] == pytest.approx([1 - s / 100 for s in out["steps"]])


def test_cli_matches_lr_at(capsys):
    argv = ["schedule", "wsd", "--lr", "0.001", "--min-lr", "0.0001", "--steps", "1000",
            "--warmup-steps", "100", "--decay-fraction", "0.2", "--at", "0,50,100,900,1000,1500",
            "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    c = cfg("wsd")
    assert out["lr"] == [lr_at(s, c) for s in out["steps"]]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["cosin"], "did you mean cosine?"),
        (["inverse-sqrt"], "did you mean inverse_sqrt?"),
        (["cosine", "--min-lr", "0.01"], "--min-lr"),
        (["cosine", "--lr", "-1"], "--lr"),
        (["cosine", "--steps", "0"], "--steps"),
        (["cosine", "--warmup-steps", "200"], "--warmup-steps"),
        (["exponential", "--gamma", "0"], "--gamma"),
        (["step", "--step-size", "0"], "--step-size"),
        (["wsd", "--decay-fraction", "1.5"], "--decay-fraction"),
        (["onecycle", "--pct-start", "0"], "--pct-start"),
        (["cosine", "--at", "0,ten"], "--at"),
        (["cosine", "--at", "0,-5"], "--at"),
        (["cosine", "--plot", "/nonexistent/dir/x.png"], "--plot"),
    ],
)
def test_bad_input_is_one_error_line(capsys, args, fragment):
    argv = ["schedule", args[0], "--lr", "0.001", "--steps", "100", *args[1:]]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


def test_negative_step_is_a_bug_not_a_value():
    with pytest.raises(ValueError):
        lr_at(-1, cfg("cosine"))
