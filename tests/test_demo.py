"""`scratchlm demo` end to end, with a short training budget: the README's first command."""

import json
import subprocess
import sys


def test_demo_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "scratchlm.cli", "demo", "--out", str(out), "--seconds", "4"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("[1/4] ingest", "[2/4] prepare", "[3/4] train", "[4/4] samples", "done in"):
        assert stage in proc.stdout
    manifest = [json.loads(line) for line in (out / "corpus" / "manifest.jsonl").open()]
    assert sum(m["status"] == "ok" for m in manifest) > 100  # the standard library's modules
    assert not any("site-packages" in m["source"] for m in manifest if m["status"] == "ok")
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["train"]["tokens"] > 1_000_000
    run = out / "run"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert metrics[-1]["step"] == json.loads((run / "config.json").read_text())["train"]["max_steps"]
    # The learning-rate schedule was sized to the run: it ends at min_lr.
    assert abs(metrics[-1]["lr"] - 2e-4) < 1e-9
