"""DDP: `scratchlm train` under torchrun with 2 gloo processes on CPU follows the same loss
trajectory as 1 process with the same global batch (2 x 4 sequences == 1 x 4 x 2 accumulated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import torch.distributed as dist
from scratchlm.config import load_run_config
from scratchlm.dataset import prepare
from scratchlm.train import train

TINY = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.context_length=32",
    "model.dropout=0.0", "train.batch_size=4", "train.precision=fp32", "train.warmup_steps=2",
    "train.lr=3e-3", "train.min_lr=3e-4", "train.max_steps=12", "train.eval_interval=6",
    "train.eval_steps=2", "train.log_interval=1", "train.device=cpu",
]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def test_two_processes_match_one(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(8):
        (docs / f"d{i}.txt").write_text(f"document {i}: the quick brown fox jumps. " * 40)
    data = tmp_path / "data"
    prepare([docs], data, tokenizer_kind="char", val_fraction=0.25, progress=False)

    sets = sum((["--set", s] for s in TINY), [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "scratchlm.cli", "train", "--data", str(data), "--out", str(tmp_path / "ddp"),
           *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("done: 12 steps") == 1  # only rank 0 prints and writes

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_run_config(None, None, [*TINY, "train.grad_accum_steps=2"])
        train(cfg, data, tmp_path / "one")
    finally:
        torch.set_num_threads(before)

    def rows(run: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    ddp, one = rows("ddp"), rows("one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == list(range(1, 13))
    for a, b in zip(ddp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["lr"] == b["lr"]
    assert ddp[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-5)
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["derived"] == {"grad_accum_steps": 1, "world_size": 2, "tokens_per_step": 256,
                                 "precision": "fp32"}
    wa = load_file(tmp_path / "ddp" / "model.safetensors")
    wb = load_file(tmp_path / "one" / "model.safetensors")
    assert wa.keys() == wb.keys()  # the unwrapped module: no "module." prefixes
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
