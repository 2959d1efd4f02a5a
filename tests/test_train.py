"""Training-loop tests: token-normalised accumulation, exact resume, the schedule per optimizer
step, no padding targets, keep-last-K and best, SIGTERM, evaluation, bad input.

Everything runs on a throwaway char dataset and a 2-layer, 32-wide model made in the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import scratchlm.train as train_mod
from scratchlm import cli
from scratchlm.checkpoint import list_step_checkpoints, load_run
from scratchlm.config import load_run_config
from scratchlm.dataset import prepare
from scratchlm.errors import UserError
from scratchlm.model import Transformer
from scratchlm.schedules import lr_at
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import backward_accumulated, evaluate_run, train

VERSES = [
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n",
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.\n",
    "Sometime too hot the eye of heaven shines, and often is his gold complexion dimm'd.\n",
    "But thy eternal summer shall not fade, nor lose possession of that fair thou ow'st.\n",
]
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.context_length=32",
    "train.batch_size=4", "train.precision=fp32", "train.warmup_steps=2", "train.lr=3e-3",
    "train.min_lr=3e-4", "train.eval_steps=2", "train.log_interval=1", "train.device=cpu",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine a second
    OpenMP thread waiting for a busy core makes every step ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A char dataset of 16 documents (so end-of-text ids sit between documents)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    docs.mkdir()
    for i in range(16):
        (docs / f"d{i:02d}.txt").write_text("".join(VERSES[(i + j) % 4] for j in range(12)))
    prepare([docs], root / "data", tokenizer_kind="char", val_fraction=0.2, seed=0, progress=False)
    return root / "data"


def tiny(*extra: str):
    return load_run_config(None, None, [*TINY, *extra])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_matches_one_big_batch() -> None:
    """4 micro-batches of 2 give the gradients of 1 batch of 8, also with ignored targets."""
    cfg = tiny().model
    cfg.vocab_size = 40
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 40, (8, 32))
    y = torch.randint(0, 40, (8, 32))
    y[2:4, 5:] = -100  # micro-batch 1 has far fewer targets than the others
    n = int((y != -100).sum())
    dev = torch.device("cpu")

    def grads(batches):
        model.zero_grad(set_to_none=True)
        loss = backward_accumulated(model, batches, 1.0 / n, "fp32", dev)
        return loss, [p.grad.clone() for p in model.parameters()]

    loss1, g1 = grads([(x, y)])
    loss4, g4 = grads([(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)])
    torch.testing.assert_close(loss1, loss4, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g4):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # ...and the full batch loss is the mean over its target tokens.
    _, ref = model(x, y)
    torch.testing.assert_close(loss1 / n, ref, rtol=1e-6, atol=1e-6)


def test_resume_is_exact(data_dir: Path, tmp_path: Path) -> None:
    """20 steps + --resume to 40 == 40 straight, per-step losses, with dropout (RNG matters)."""
    cfg = tiny("model.dropout=0.1", "train.max_steps=40", "train.eval_interval=20")
    train(cfg, data_dir, tmp_path / "straight")
    train(cfg, data_dir, tmp_path / "split", stop_at=20)
    assert [r["step"] for r in metrics(tmp_path / "split")][-1] == 20
    train(cfg, data_dir, tmp_path / "split", resume=True)
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 41))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert a[-1]["val_loss"] == b[-1]["val_loss"]
    wa = load_file(tmp_path / "straight" / "model.safetensors")
    wb = load_file(tmp_path / "split" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_drops_metrics_past_the_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny("train.max_steps=12", "train.eval_interval=6", "train.checkpoint_interval=6")
    run = tmp_path / "run"
    train(cfg, data_dir, run, stop_at=9)  # checkpoints at 6 and 9; metrics up to 9
    (run / "metrics.jsonl").open("a").write('{"step": 10, "loss": 0.0}\n')  # an abandoned future
    train(cfg, data_dir, run, resume=True)
    steps = [r["step"] for r in metrics(run)]
    assert steps == list(range(1, 13))


def test_lr_is_the_schedule_per_optimizer_step(data_dir: Path, tmp_path: Path) -> None:
    """With 3 micro-batches per step the schedule still advances once per optimizer step."""
    cfg = tiny("train.max_steps=10", "train.warmup_steps=3", "train.grad_accum_steps=3",
               "train.eval_interval=10", "train.schedule=cosine")
    train(cfg, data_dir, tmp_path / "run")
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 11))
    for r in rows:
        assert r["lr"] == pytest.approx(lr_at(r["step"], cfg.train), rel=1e-12)
    assert rows[-1]["lr"] == pytest.approx(cfg.train.min_lr)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["grad_accum_steps"] == 3
    assert config["derived"]["tokens_per_step"] == 3 * 4 * 32
    assert config["data"]["meta"]["vocab_size"] == config["model"]["vocab_size"]


def test_tokens_per_step_derives_accumulation(data_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = tiny("train.max_steps=2", "train.tokens_per_step=512")  # 512 / (4*32) = 4
    train(cfg, data_dir, tmp_path / "run")
    assert "grad_accum_steps = 4" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["grad_accum_steps"] == 4


def test_no_padding_token_is_ever_a_target(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    tok = Tokenizer.load(data_dir / "tokenizer.json")
    seen: list[torch.Tensor] = []
    forward = Transformer.forward

    def spy(self, idx, targets=None, *args, **kwargs):
        if targets is not None:
            seen.append(targets.clone())
        return forward(self, idx, targets, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", spy)
    train(tiny("train.max_steps=30", "train.eval_interval=15"), data_dir, tmp_path / "run")
    targets = torch.cat([t.flatten() for t in seen])
    assert targets.numel() > 30 * 4 * 32
    assert not (targets == tok.pad_id).any()
    assert (targets == tok.eot_id).any()  # document boundaries are targets; padding never is


def test_keep_last_and_best(data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny("train.max_steps=20", "train.eval_interval=4", "train.keep_last=2")
    run = tmp_path / "run"
    last = train(cfg, data_dir, run)
    assert [s for s, _ in list_step_checkpoints(run)] == [16, 20]
    rows = [r for r in metrics(run) if "val_loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20]
    best = min(rows, key=lambda r: r["val_loss"])
    info = json.loads((run / "best" / "best.json").read_text())
    assert info == {"step": best["step"], "val_loss": best["val_loss"]}
    model, _, _ = load_run(run / "best")  # best/ is a loadable run directory
    assert isinstance(model, Transformer)
    assert last["step"] == 20 and "val_bpb" in last and "val_ppl" in last
    for key in ("step", "loss", "lr", "tokens_per_s", "mfu", "elapsed_s"):
        assert key in rows[0]
    assert (run / "loss.png").is_file() and (run / "lr.png").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert not list(run.rglob("*.tmp"))


def test_eval_json(data_dir: Path, tmp_path: Path, capsys) -> None:
    train(tiny("train.max_steps=3"), data_dir, tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(data_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"val_loss", "perplexity", "bits_per_byte", "tokens"}
    val_tokens = json.loads((data_dir / "meta.json").read_text())["val"]["tokens"]
    assert out["tokens"] == (val_tokens - 1) // 32 * 32  # the whole split, in full windows
    assert out == evaluate_run(tmp_path / "run", data_dir)  # deterministic
    assert out["perplexity"] == pytest.approx(2.718281828 ** out["val_loss"])


def test_eval_rejects_another_tokenizer(data_dir: Path, tmp_path: Path) -> None:
    train(tiny("train.max_steps=2"), data_dir, tmp_path / "run")
    (tmp_path / "other.txt").write_text("a completely different alphabet: xyz 0123456789 " * 50)
    prepare([tmp_path / "other.txt"], tmp_path / "other", tokenizer_kind="char", progress=False)
    with pytest.raises(UserError, match="tokenizer"):
        evaluate_run(tmp_path / "run", tmp_path / "other")


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line(data_dir: Path, tmp_path: Path, capsys) -> None:
    run = str(tmp_path / "run")
    err = _one_line_error(capsys, ["train", "--data", str(tmp_path / "nope"), "--out", run])
    assert "scratchlm prepare" in err
    err = _one_line_error(capsys, ["train", "--data", str(data_dir), "--out", run,
                                   "--set", "train.lrr=1e-3"])
    assert "train.lr" in err
    err = _one_line_error(capsys, ["train", "--data", str(data_dir), "--out", run,
                                   "--set", "train.precision=fp16", "--set", "train.device=cpu"])
    assert "fp16" in err and "bf16" in err
    err = _one_line_error(capsys, ["train", "--data", str(data_dir), "--out", run,
                                   "--set", "model.context_length=100000"])
    assert "context_length" in err
    assert not (tmp_path / "run").exists()  # nothing half-written
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("hello")
    err = _one_line_error(capsys, ["eval", str(tmp_path / "foreign"), "--data", str(data_dir)])
    assert "not a scratchlm run directory" in err
    sets = sum((["--set", s] for s in TINY), [])
    err = _one_line_error(capsys, ["train", "--data", str(data_dir), "--out",
                                   str(tmp_path / "foreign"), "--resume", *sets])
    assert "not a scratchlm run directory" in err
    (tmp_path / "foreign" / "config.json").write_text('{"format_version": 1, "model": {')
    for argv in (["eval", str(tmp_path / "foreign"), "--data", str(data_dir)],
                 ["generate", str(tmp_path / "foreign"), "--prompt", "Shall"]):
        err = _one_line_error(capsys, argv)
        assert "config.json is not valid JSON" in err and "damaged" in err
    err = _one_line_error(capsys, ["import-hf", str(tmp_path / "foreign"), "--out",
                                   str(tmp_path / "imported")])
    assert "config.json is not valid JSON" in err and "save_pretrained" in err
    assert not (tmp_path / "imported").exists()


def test_resume_refuses_another_architecture(data_dir: Path, tmp_path: Path) -> None:
    train(tiny("train.max_steps=4"), data_dir, tmp_path / "run", stop_at=2)
    with pytest.raises(UserError, match="model.n_layer 2 -> 3"):
        train(tiny("train.max_steps=4", "model.n_layer=3"), data_dir, tmp_path / "run", resume=True)
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny("train.max_steps=4"), data_dir, tmp_path / "run")
    other = tmp_path / "other.txt"  # other characters: another tokenizer and vocabulary size
    other.write_text("0123456789 +-*/=" * 200)
    prepare([other], tmp_path / "other-data", tokenizer_kind="char", progress=False)
    with pytest.raises(UserError, match="the run's tokenizer .* differs from the data's"):
        train(tiny("train.max_steps=4"), tmp_path / "other-data", tmp_path / "run", resume=True)


def test_sigterm_saves_a_checkpoint_that_resumes(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = sum((["--set", s] for s in TINY), [])
    cmd = [sys.executable, "-m", "scratchlm.cli", "train", "--data", str(data_dir), "--out",
           str(run), *sets, "--set", "train.max_steps=100000",
           "--set", "train.eval_interval=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and "--resume" in out
    state = torch.load(run / "trainer_state.pt", weights_only=True)
    step = state["step"]
    assert 1 <= step < 100000
    assert [s for s, _ in list_step_checkpoints(run)] == [step]
    cfg = tiny("train.max_steps=100000", "train.eval_interval=100000")
    last = train(cfg, data_dir, run, resume=True, stop_at=step + 2)
    assert last["step"] == step + 2


def test_fp16_on_cpu_and_peak_override(monkeypatch) -> None:
    with pytest.raises(UserError, match="CUDA"):
        train_mod.check_precision("fp16", "cpu")
    monkeypatch.setenv("SCRATCHLM_PEAK_FLOPS", "1e12")
    assert train_mod.peak_flops(torch.device("cpu"), "bf16") == 1e12
    monkeypatch.delenv("SCRATCHLM_PEAK_FLOPS")
    assert train_mod.peak_flops(torch.device("cpu"), "fp32") > 0


def test_auto_precision_follows_the_hardware(monkeypatch) -> None:
    """auto: bf16-master only where the CPU multiplies bf16 natively, else fp32; explicit
    choices are kept, with a note when bf16 would be emulated."""
    native = train_mod.cpu_has_native_bf16()
    assert native == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    got, why = train_mod.resolve_precision("auto", "cpu")
    assert got == ("bf16-master" if native else "fp32") and why.startswith("auto:")
    for flag in (True, False):  # both kinds of CPU, through torch's own capability queries
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda f=flag: f)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert train_mod.resolve_precision("auto", "cpu")[0] == ("bf16-master" if flag else "fp32")
        got, why = train_mod.resolve_precision("bf16", "cpu")
        assert got == "bf16" and (why == "" if flag else "no native bf16" in why)
        assert train_mod.resolve_precision("fp32", "cpu") == ("fp32", "")
        peak = train_mod.peak_flops(torch.device("cpu"), "bf16")
        assert (peak > train_mod.peak_flops(torch.device("cpu"), "fp32")) == flag


def test_auto_precision_is_recorded_and_evaluated(data_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = tiny("train.precision=auto", "train.max_steps=4", "train.eval_interval=4")
    train(cfg, data_dir, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    want, why = train_mod.resolve_precision("auto", "cpu")
    assert config["train"]["precision"] == "auto"  # resumes pick again on their machine
    assert config["derived"]["precision"] == want
    out = capsys.readouterr().out
    assert why in out and f"precision {want}," in out
    r = evaluate_run(tmp_path / "run", data_dir)
    assert r["tokens"] > 0 and r["val_loss"] > 0


def test_optimizer_decays_only_matrices() -> None:
    cfg = tiny().model
    cfg.vocab_size = 40
    model = Transformer(cfg)
    opt = train_mod.configure_optimizer(model, tiny().train)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_short_bf16_attention_in_fp32_keeps_the_loss() -> None:
    """bf16 on CPU at short contexts computes attention in fp32: close to fp32 throughout."""
    from scratchlm.model import SHORT_BF16_CPU

    cfg = tiny().model
    cfg.vocab_size = 40
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 40, (4, min(32, SHORT_BF16_CPU)))
    _, fp32 = model(x, x)
    with train_mod.autocast_context("bf16", "cpu"):
        _, bf16 = model(x, x)
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=2e-2)


def test_cli_resume_without_flags_reuses_the_runs_config(data_dir: Path, tmp_path: Path) -> None:
    """`scratchlm train --data D --out R --resume` (as the README shows) needs no original flags;
    `--set` on top changes what it names, e.g. a longer horizon."""
    run = tmp_path / "run"
    sets = [a for item in TINY for a in ("--set", item)]
    assert cli.main(["train", "--data", str(data_dir), "--out", str(run), *sets,
                     "--set", "train.max_steps=12", "--set", "train.eval_interval=6",
                     "--stop-at", "6"]) == 0
    assert cli.main(["train", "--data", str(data_dir), "--out", str(run), "--resume"]) == 0
    assert metrics(run)[-1]["step"] == 12
    assert cli.main(["train", "--data", str(data_dir), "--out", str(run), "--resume",
                     "--set", "train.max_steps=14"]) == 0
    assert metrics(run)[-1]["step"] == 14


def test_bf16_master_trains_like_autocast_saves_fp32_and_resumes_exactly(
    data_dir: Path, tmp_path: Path
) -> None:
    """bf16 weights + fp32 master copy: close to the autocast trajectory, fp32 checkpoints, and
    exact resume (the bf16 compute weights are always re-derived from the saved master)."""
    extra = ("train.max_steps=30", "train.eval_interval=15")
    master = tiny(*extra, "train.precision=bf16-master")
    train(master, data_dir, tmp_path / "master")
    train(tiny(*extra, "train.precision=bf16"), data_dir, tmp_path / "autocast")
    a, b = metrics(tmp_path / "master"), metrics(tmp_path / "autocast")
    assert a[-1]["loss"] < a[0]["loss"] - 0.5  # it learns
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 0.1
    weights = load_file(tmp_path / "master" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    train(master, data_dir, tmp_path / "split", stop_at=15)
    train(master, data_dir, tmp_path / "split", resume=True)
    assert [r["loss"] for r in metrics(tmp_path / "split")] == [r["loss"] for r in a]
