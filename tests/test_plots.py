"""Figures: a run's PNGs from a metrics.jsonl written here, the schedule figures, atomic writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from scratchlm.cli import main
from scratchlm.errors import UserError
from scratchlm.plots import plot_run, plot_schedules, read_metrics


def write_metrics(run_dir: Path, n: int, truncated_tail: bool = True) -> None:
    lines = []
    for s in range(0, n):
        rec = {"step": s, "loss": 4.0 / (1 + s / 50) + 1.5, "lr": 1e-3 * min(1, s / 10),
               "tokens_per_s": 20000.0 + (s % 7) * 100}
        if s % 25 == 0:
            rec["val_loss"] = rec["loss"] + 0.1
        if s % 11 == 3:
            del rec["tokens_per_s"]  # records need not carry every key
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if truncated_tail:
        text += '{"step": %d, "loss": 1.7' % n  # a writer killed mid-line
    (run_dir / "metrics.jsonl").write_text(text)


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= 300 and im.height >= 200
        im.verify()


def test_plot_run_writes_three_pngs(tmp_path):
    write_metrics(tmp_path, 300)
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "lr.png", "throughput.png"]
    for p in paths:
        assert p.parent == tmp_path
        assert_png(p)
    # Atomic writes leave no temporary files behind.
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "loss.png", "lr.png", "metrics.jsonl", "throughput.png"
    ]


def test_read_metrics_tolerates_missing_keys_and_a_truncated_tail(tmp_path):
    write_metrics(tmp_path, 50)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(50))
    assert sum("val_loss" in r for r in records) == 2


def test_resumed_run_replaces_the_abandoned_tail(tmp_path):
    # Trained to step 5, resumed from a checkpoint at step 3: steps 3..5 were logged twice.
    lines = [{"step": s, "loss": 1.0} for s in range(6)]
    lines += [{"step": s, "loss": 2.0} for s in (3, 4)]
    lines.append({"step": 4, "val_loss": 2.5})  # an evaluation line at the same step is kept
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("loss")) for r in records] == [
        (0, 1.0), (1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (4, None)
    ]


def test_plot_run_with_no_records_yet(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    for p in plot_run(tmp_path):
        assert_png(p)


def test_plot_run_overwrites(tmp_path):
    write_metrics(tmp_path, 20, truncated_tail=False)
    plot_run(tmp_path)
    first = (tmp_path / "loss.png").read_bytes()
    write_metrics(tmp_path, 200, truncated_tail=False)
    plot_run(tmp_path)
    assert (tmp_path / "loss.png").read_bytes() != first


def test_missing_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="metrics"):
        plot_run(tmp_path)


def test_damaged_middle_line_is_a_user_error(tmp_path):
    damaged = '{"step": 0, "loss": 3}\n{"step": 1, "lo\n{"step": 2}\n'
    (tmp_path / "metrics.jsonl").write_text(damaged)
    with pytest.raises(UserError, match="line 2"):
        plot_run(tmp_path)


def test_plot_run_is_fast_for_10k_lines(tmp_path):
    write_metrics(tmp_path, 10_000)
    plot_run(tmp_path)  # the first call pays for font loading; the trainer pays it once
    t0 = time.perf_counter()
    plot_run(tmp_path)
    elapsed = time.perf_counter() - t0
    # Under 1 s on an idle core; the bound leaves room for a loaded shared test machine.
    assert elapsed < 2.5, f"plot_run took {elapsed:.2f} s for 10k lines"


def test_plot_schedules(tmp_path):
    path = plot_schedules(tmp_path / "schedules.png")
    assert_png(path)
    with Image.open(path) as im:
        assert im.width > 1000  # a grid of panels, not one small axes


def test_schedule_cli_plot(tmp_path, capsys):
    out = tmp_path / "cosine.png"
    argv = ["schedule", "cosine", "--lr", "0.002", "--min-lr", "0.0001", "--steps", "5000",
            "--warmup-steps", "100", "--at", "0,2500,6000", "--plot", str(out)]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_png(out)


def test_schedule_cli_plot_with_json_keeps_stdout_json(tmp_path, capsys):
    out = tmp_path / "wsd.png"
    argv = ["schedule", "wsd", "--lr", "0.001", "--steps", "100", "--json", "--plot", str(out)]
    assert main(argv) == 0
    json.loads(capsys.readouterr().out)
    assert_png(out)
