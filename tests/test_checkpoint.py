"""Checkpoint tests: atomic saves survive a crash mid-write, trainer state loads with
weights_only=True, RNG states round-trip, resume picks a consistent checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import scratchlm.checkpoint as ckpt
from scratchlm.config import ModelConfig, RunConfig
from scratchlm.errors import UserError
from scratchlm.model import Transformer
from scratchlm.tokenizer import train_char


def _setup(tmp_path: Path) -> tuple[Transformer, torch.optim.Optimizer, dict, Path]:
    tok = train_char(["abcdefgh \n"])
    tok_path = tmp_path / "tokenizer.json"
    tok.save(tok_path)
    mcfg = ModelConfig(n_layer=1, n_head=2, d_model=16, context_length=8, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = Transformer(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    opt.step()
    config = {"format_version": ckpt.FORMAT_VERSION, **RunConfig(model=mcfg).to_dict()}
    return model, opt, config, tok_path


def _state(opt: torch.optim.Optimizer, step: int) -> dict:
    return {"step": step, "optimizer": opt.state_dict(), "rng": ckpt.rng_state(),
            "best_val_loss": float("inf"), "elapsed_s": 0.0, "data": {"next_step": step}}


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, opt, config, tok = _setup(tmp_path)
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, model, _state(opt, 1), config, tok, keep_last=3)
    before = _snapshot(run)

    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])  # half a file, then the "crash"
        raise OSError("disk full")

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the weights being saved differ from the previous checkpoint's
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(run, model, _state(opt, 2), config, tok, keep_last=3)
    assert _snapshot(run) == before  # nothing changed, nothing left behind
    assert not [p for p in run.rglob("*") if p.name.startswith(".")]
    source, state = ckpt.find_resume_checkpoint(run)
    assert source == run and state["step"] == 1


def test_crash_between_root_files_resumes_from_the_step_directory(tmp_path: Path) -> None:
    model, opt, config, tok = _setup(tmp_path)
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, model, _state(opt, 1), config, tok, keep_last=3)
    ckpt.save_checkpoint(run, model, _state(opt, 2), config, tok, keep_last=3)
    # A crash after RUN_DIR/model.safetensors (step 2) was replaced but before trainer_state.pt:
    (run / ckpt.TRAINER_STATE).unlink()
    torch.save(_state(opt, 1), run / ckpt.TRAINER_STATE)
    source, state = ckpt.find_resume_checkpoint(run)
    assert source == run / "checkpoints" / "step_0000002" and state["step"] == 2
    assert ckpt.weights_step(source / "model.safetensors") == 2


def test_atomic_write_failure_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    ckpt.atomic_write_text(target, "old")

    def fails(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(target, fails)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_trainer_state_loads_with_weights_only(tmp_path: Path) -> None:
    model, opt, config, tok = _setup(tmp_path)
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, model, _state(opt, 7), config, tok, keep_last=1)
    raw = torch.load(run / ckpt.TRAINER_STATE, weights_only=True)  # no pickle of arbitrary objects
    assert raw["step"] == 7 and set(raw["rng"]) == {"python", "numpy", "torch", "cuda"}
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(raw["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_trainer_state_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / ckpt.TRAINER_STATE
    torch.save({"step": 1, "payload": _Evil()}, path)
    with pytest.raises(UserError, match="holds Python objects.*resume from another checkpoint"):
        ckpt.load_trainer_state(path)


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_damaged_trainer_state_says_damaged_not_unsafe(tmp_path: Path, damage: str) -> None:
    path = tmp_path / ckpt.TRAINER_STATE
    torch.save({"step": 1, "x": torch.zeros(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(b"garbage\n" if damage == "text" else data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        ckpt.load_trainer_state(path)
    msg = str(e.value)
    assert msg.startswith(f"cannot read {path}: ") and msg.endswith("resume from another checkpoint")
    assert "Python objects" not in msg and "\n" not in msg


def test_rng_state_round_trips() -> None:
    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_keep_last_and_root_files(tmp_path: Path) -> None:
    model, opt, config, tok = _setup(tmp_path)
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(run, model, _state(opt, step), config, tok, keep_last=2)
    assert [s for s, _ in ckpt.list_step_checkpoints(run)] == [3, 4]
    assert ckpt.weights_step(run / "model.safetensors") == 4
    assert json.loads((run / "config.json").read_text())["model"]["n_layer"] == 1
    ckpt.save_checkpoint(run, model, _state(opt, 5), config, tok, keep_last=0)
    assert ckpt.list_step_checkpoints(run) == []
    assert ckpt.find_resume_checkpoint(run)[1]["step"] == 5  # RUN_DIR itself still resumes
    loaded, _, _ = ckpt.load_run(run)
    for k, v in ckpt.model_state(model).items():
        assert torch.equal(ckpt.model_state(loaded)[k], v)


def test_no_checkpoint_to_resume(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no checkpoint"):
        ckpt.find_resume_checkpoint(tmp_path)


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / ".step_0000003.abc.tmp").mkdir(parents=True)
    (tmp_path / ".model.safetensors.xyz.tmp").write_bytes(b"half")
    (tmp_path / "keep.txt").write_text("x")
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "keep.txt"]


def test_a_damaged_run_config_is_a_one_line_error(tmp_path: Path) -> None:
    """config.json edited by hand or copied between runs: each mistake names itself in one line."""
    model, _, _, tok_path = _setup(tmp_path)
    run = tmp_path / "run"
    ckpt.write_run(run, model, RunConfig(model=model.cfg), tok_path)
    good = json.loads((run / "config.json").read_text())

    def broken(**changes):
        (run / "config.json").write_text(json.dumps({**good, **changes}))
        with pytest.raises(UserError) as e:
            ckpt.load_run(run)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "[model] must be a table" in broken(model=5)
    assert "[train] must be a table" in broken(train=[1])
    assert "vocab_size" in broken(model={k: v for k, v in good["model"].items() if k != "vocab_size"})
    # Weights of another shape: the message names the tensor.
    assert "size mismatch for tok_emb.weight" in broken(model={**good["model"], "d_model": 32, "n_head": 2})
    (run / "config.json").write_text(json.dumps(good))
    assert ckpt.load_run(run)[2].model == model.cfg
    # A tokenizer with more ids than the model has rows: from another run.
    train_char(["abcdefghijklmnopqrstuvwxyz"]).save(run / "tokenizer.json")
    with pytest.raises(UserError, match="different runs"):
        ckpt.load_run(run)
