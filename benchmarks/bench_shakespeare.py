"""The tinyshakespeare training benchmark, end to end: prepare the char data (90/10 split), then
time the whole `scratchlm train --data D --out R --preset shakespeare-char` command as a process
(start-up, evaluations, checkpoints and plots included) and read its final validation loss.

    python benchmarks/bench_shakespeare.py                      # one timed run
    python benchmarks/bench_shakespeare.py --repeat 3 --json    # best and median of 3
    python benchmarks/bench_shakespeare.py --set train.precision=fp32   # compare a setting
    python benchmarks/bench_shakespeare.py --copy-plots docs/images     # the docs' figures

Target (issue 2, section 6): val loss <= 1.88 in at most 35 s wall on the 2-core reference CPU;
the reference implementation (fp32 eager) takes 70.3 s. Results and exact commands are recorded
in benchmarks/README.md ("Training: tinyshakespeare").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def scratchlm_cmd() -> list[str]:
    """The installed console script when there is one, else the module (same code)."""
    exe = shutil.which("scratchlm", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "scratchlm.cli"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="tinyshakespeare.txt")
    p.add_argument("--work", type=Path, help="directory for data and runs (default: a temp dir)")
    p.add_argument("--repeat", type=int, default=1, help="timed training runs")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra `scratchlm train --set` overrides (default: none, the preset as is)")
    p.add_argument("--copy-plots", type=Path, metavar="DIR",
                   help="copy the last run's loss.png / lr.png to DIR/shakespeare_{loss,lr}.png")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    a = p.parse_args()
    if a.repeat < 1:
        print("error: --repeat must be >= 1", file=sys.stderr)
        return 2
    if not a.text.is_file():
        print(f"error: {a.text} not found; pass --text PATH/tinyshakespeare.txt", file=sys.stderr)
        return 2
    work = a.work or Path(tempfile.mkdtemp(prefix="scratchlm-shakespeare-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    cmd = scratchlm_cmd()

    if not (data / "meta.json").is_file():
        t = time.perf_counter()
        subprocess.run([*cmd, "prepare", str(a.text), "--out", str(data), "--tokenizer", "char",
                        "--val-fraction", "0.1"], check=True)
        print(f"prepare: {time.perf_counter() - t:.1f} s", file=sys.stderr)

    runs = []
    for i in range(a.repeat):
        run = work / f"run{i}"
        shutil.rmtree(run, ignore_errors=True)
        overrides = [x for s in a.set for x in ("--set", s)]
        argv = [*cmd, "train", "--data", str(data), "--out", str(run),
                "--preset", "shakespeare-char", *overrides]
        load_before = os.getloadavg()[0]
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(argv, check=True)
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "val_loss" in r]
        last = evals[-1]
        runs.append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                     "val_loss": round(last["val_loss"], 4),
                     "train_loss": round(rows[-1]["loss"], 4), "step": last["step"],
                     "load_avg_1min_before": load_before})
        print(f"run {i}: {wall:.1f} s wall ({cpu:.1f} s CPU), step {last['step']}, "
              f"val loss {last['val_loss']:.4f} "
              f"(train {rows[-1]['loss']:.4f}); 1-min load average before: {load_before:.2f}",
              file=sys.stderr)

    if a.copy_plots:
        a.copy_plots.mkdir(parents=True, exist_ok=True)
        last_run = work / f"run{a.repeat - 1}"
        for name in ("loss", "lr"):
            shutil.copyfile(last_run / f"{name}.png", a.copy_plots / f"shakespeare_{name}.png")
    walls = [r["wall_s"] for r in runs]
    result = {
        "bench": "shakespeare-char",
        "command": " ".join(["scratchlm", "train", "--data", "D", "--out", "R",
                             "--preset", "shakespeare-char", *overrides]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": runs,
        "best_wall_s": min(walls), "median_wall_s": statistics.median(walls),
        "target_wall_s": 35.0, "target_val_loss": 1.88, "reference_wall_s": 70.3,
    }
    if a.json:
        print(json.dumps(result))
    else:
        print(f"wall: best {result['best_wall_s']:.1f} s, median {result['median_wall_s']:.1f} s "
              f"(target <= 35 s; reference 70.3 s); final val loss {runs[-1]['val_loss']:.4f} "
              f"(target <= 1.88)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
