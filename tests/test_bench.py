"""`scratchlm bench`: each benchmark runs end to end on tiny settings and prints self-consistent
JSON. No timing thresholds: speed is measured in benchmarks/README.md, not asserted here."""

import json
import math

import pytest

from scratchlm import bench
from scratchlm.cli import main
from scratchlm.train import cpu_has_native_bf16

TINY = ["--preset", "tiny", "--set", "model.n_layer=1", "--set", "model.d_model=32",
        "--set", "model.context_length=48", "--set", "train.batch_size=2"]


@pytest.fixture(autouse=True)
def small_matmuls(monkeypatch):
    """A 2048x2048 peak takes seconds on 2 busy cores; the tests only check the plumbing."""
    monkeypatch.setattr(bench, "PEAK_N", 128)
    monkeypatch.setattr(bench, "PEAK_REPS", 3)


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_peak_json(capsys):
    r = run_json(capsys, ["bench", "peak"])
    assert r["threads"] >= 1 and r["n"] == 128 and r["reps"] == 3
    for dtype in ("fp32", "bf16"):
        p = r[dtype]
        assert len(p["samples"]) == 3 and all(s > 0 for s in p["samples"])
        assert p["best_gflops"] == max(p["samples"])
        assert 0 < p["median_gflops"] <= p["best_gflops"]
        assert p["reference_gflops"] == bench.REFERENCE_PEAK_GFLOPS[dtype]


def test_peak_prints_a_table(capsys):
    assert main(["bench", "peak"]) == 0
    out = capsys.readouterr().out
    assert "fp32" in out and "bf16" in out and "threads" in out


def test_train_side_by_side(capsys):
    r = run_json(capsys, ["bench", "train", *TINY, "--steps", "2",
                          "--precisions", "fp32,bf16,bf16-master"])
    assert r["tokens_per_step"] == 2 * 48 == r["batch_size"] * r["context_length"]
    assert list(r["results"]) == ["fp32", "bf16", "bf16-master"]
    fp32 = r["results"]["fp32"]
    for label, row in r["results"].items():
        assert len(row["step_s"]) == 2 and len(row["warmup_s"]) == 1 and not row["compile"]
        assert row["ms_per_step_median"] > 0 and row["ms_per_step_best"] <= row["ms_per_step_median"]
        assert math.isclose(row["tokens_per_s"], r["tokens_per_step"] / (row["ms_per_step_median"] / 1000))
        assert math.isclose(row["achieved_gflops"], r["flops_per_token"] * row["tokens_per_s"] / 1e9)
        peak = r["peak"][row["peak_dtype"]]["best_gflops"]
        assert math.isclose(row["mfu_measured_peak"], row["achieved_gflops"] / peak)
        ref = bench.REFERENCE_PEAK_GFLOPS[row["peak_dtype"]]
        assert math.isclose(row["mfu_reference_peak"], row["achieved_gflops"] / ref)
        assert math.isclose(row["speedup_vs_fp32"], row["tokens_per_s"] / fp32["tokens_per_s"])
        assert math.isfinite(row["final_loss"])
    assert fp32["speedup_vs_fp32"] == 1.0
    assert r["results"]["bf16"]["peak_dtype"] == "bf16" and fp32["peak_dtype"] == "fp32"


def test_train_table_and_bad_precision(capsys):
    assert main(["bench", "train", *TINY, "--steps", "1", "--precisions", "bf16"]) == 0
    captured = capsys.readouterr()
    assert "bf16" in captured.out and "tokens/s" in captured.out
    # Said exactly where bf16 is emulated (torch's own capability queries decide).
    assert ("no native bf16" in captured.err) == (not cpu_has_native_bf16())
    assert main(["bench", "train", *TINY, "--precisions", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown precision 'fp16'") and err.count("\n") == 1


def test_decode_cached_vs_uncached(capsys):
    r = run_json(capsys, ["bench", "decode", *TINY, "--new-tokens", "8"])
    assert r["random_weights"] and r["run_dir"] is None and r["batch_size"] == 1
    P, G = r["prompt_tokens"], r["new_tokens"]
    assert G == 8 and P == 48 - 8
    c, u = r["cached"], r["uncached"]
    assert c["new_tokens"] == u["new_tokens"] == 8  # exactly G each: end-of-text never stops one early
    assert c["runs"] == 3 and u["runs"] == 1
    for x in (c, u):
        assert x["ttft_s"] > 0 and x["decode_tokens_per_s"] > 0
        assert math.isclose(x["prefill_tokens_per_s"], P / x["ttft_s"])
    assert math.isclose(r["speedup_decode"], c["decode_tokens_per_s"] / u["decode_tokens_per_s"])
    assert math.isclose(r["speedup_total"], u["total_s"] / c["total_s"])
    assert math.isclose(r["theory_S"], G * P / (P + G - 1))
    assert r["tokens_match"]  # greedy: the cache never changes the tokens


def test_decode_of_a_run_dir_vs_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    from scratchlm.checkpoint import write_run
    from scratchlm.config import load_run_config
    from scratchlm.model import Transformer
    from scratchlm.tokenizer import train_char

    tok = train_char(["the quick brown fox jumps over the lazy dog\n"])
    tok.save(tmp_path / "tokenizer.json")
    cfg = load_run_config("tiny", None, ["model.n_layer=1", "model.d_model=32", "model.context_length=48",
                                         f"model.vocab_size={tok.vocab_size}"])
    write_run(tmp_path / "run", Transformer(cfg.model), cfg, tmp_path / "tokenizer.json")
    r = run_json(capsys, ["bench", "decode", str(tmp_path / "run"), "--new-tokens", "6",
                          "--vs-transformers"])
    assert r["run_dir"] == str(tmp_path / "run") and not r["random_weights"]
    vs = r["vs_transformers"]
    assert vs["new_tokens"] == 6 and vs["hf_class"] == "GPT2LMHeadModel"
    ours, theirs = vs["ours"], vs["transformers_generate"]
    assert ours["new_tokens"] == theirs["new_tokens"] == 6
    assert math.isclose(vs["speedup_decode"], ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"])
    assert math.isclose(vs["speedup_ttft"], theirs["ttft_s"] / ours["ttft_s"])
    pairs = zip(ours["decode_tokens_per_s_all"], theirs["decode_tokens_per_s_all"], strict=True)
    assert vs["speedup_decode_per_round"] == pytest.approx([o / t for o, t in pairs])
    assert len(vs["speedup_decode_per_round"]) == 3
    assert vs["tokens_match"]  # the export is faithful: same greedy tokens
    b = vs["bf16"]
    assert b["ours"]["new_tokens"] == b["transformers_generate"]["new_tokens"] == 6
    assert math.isclose(b["speedup_decode"],
                        b["ours"]["decode_tokens_per_s"] / b["transformers_generate"]["decode_tokens_per_s"])
    assert math.isclose(vs["speedup_decode_ours_bf16_vs_transformers_fp32"],
                        b["ours"]["decode_tokens_per_s"] / theirs["decode_tokens_per_s"])


def test_decode_needs_room_for_a_prompt(capsys):
    assert main(["bench", "decode", *TINY, "--new-tokens", "48"]) == 2
    err = capsys.readouterr().err
    assert "leaves no room for a prompt" in err and err.count("\n") == 1


def test_kv_speedup_formulas():
    assert round(bench.kv_speedup_theory(100, 50), 1) == 33.6  # REFERENCE_FIGURES.md
    assert bench.kv_speedup_theory(1, 1) == 1.0
    # growing sequence: P + (P+1) + ... + (P+G-1) tokens uncached vs P + G - 1 cached
    assert bench.token_forward_ratio(3, 3) == (3 + 4 + 5) / 5


def test_serving_benchmark_engine_only_counts_every_token(tmp_path):
    """benchmarks/bench_serve.py --engine-only: every stream's requests all run to max_tokens."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(script), "--engine-only", "--clients", "3", "--requests", "2",
                    "--max-tokens", "5", "--rounds", "1", "--json", str(out)], check=True,
                   capture_output=True, timeout=120)
    r = json.loads(out.read_text())
    assert r["single"]["tokens"] == 2 * 5 and r["concurrent"]["tokens"] == 3 * 2 * 5
    assert r["concurrent"]["requests"] == 6
    assert r["speedup"] == pytest.approx(r["concurrent"]["tokens_per_s"] / r["single"]["tokens_per_s"], abs=0.01)
