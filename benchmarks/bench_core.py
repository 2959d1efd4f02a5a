"""Core benchmarks, repeated: matmul peak, training throughput (fp32 vs bf16), decoding.

Runs `scratchlm bench ...` several times as separate processes (the machine is shared and noisy,
so one run proves little), keeps each run's JSON under --out, and prints the median of the
headline figures across runs. The figures in benchmarks/README.md ("Core" section) come from it.

    python benchmarks/bench_core.py peak --repeat 3
    python benchmarks/bench_core.py train --repeat 3 -- --preset small --steps 3 --precisions fp32,bf16,bf16-master
    python benchmarks/bench_core.py decode --repeat 3 -- --new-tokens 512
    python benchmarks/bench_core.py hf --repeat 3

`decode` and `hf` time a run directory with RANDOM weights made by `make_decode_run` (the `small`
architecture with a 1024-token context and tinyshakespeare's character vocabulary): decoding speed
does not depend on what the weights have learned.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def make_decode_run(run_dir: Path, context_length: int = 1024) -> Path:
    """A run directory of the `small` architecture with `context_length`, random weights."""
    import torch

    from scratchlm.checkpoint import write_run
    from scratchlm.config import load_run_config
    from scratchlm.model import Transformer
    from scratchlm.tokenizer import train_char

    if (run_dir / "model.safetensors").is_file():
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else "abcdefgh \n"
    tok = train_char([text])
    tok.save(run_dir / "tokenizer.json")
    cfg = load_run_config("small", None, [f"model.context_length={context_length}",
                                          f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    write_run(run_dir, Transformer(cfg.model), cfg, run_dir / "tokenizer.json")
    return run_dir


def headline(what: str, r: dict) -> dict[str, float]:
    """The figures worth a median across runs."""
    if what == "peak":
        return {f"{d}_{k}": r[d][k] for d in ("fp32", "bf16") for k in ("best_gflops", "median_gflops")}
    if what == "train":
        out = {}
        for label, row in r["results"].items():
            out[f"{label} tokens/s"] = row["tokens_per_s"]
            out[f"{label} MFU(run peak)"] = row["mfu_measured_peak"]
            out[f"{label} MFU(ref peak)"] = row["mfu_reference_peak"]
            if "speedup_vs_fp32" in row:
                out[f"{label} vs fp32"] = row["speedup_vs_fp32"]
        return out
    out = {}
    if "cached" in r:
        out |= {"cached decode tok/s": r["cached"]["decode_tokens_per_s"],
                "uncached decode tok/s": r["uncached"]["decode_tokens_per_s"],
                "cache speedup (decode)": r["speedup_decode"],
                "cache speedup (total)": r["speedup_total"],
                "cached TTFT ms": 1000 * r["cached"]["ttft_s"],
                "cached prefill tok/s": r["cached"]["prefill_tokens_per_s"]}
    vs = r.get("vs_transformers")
    if vs:
        out |= {"ours decode tok/s": vs["ours"]["decode_tokens_per_s"],
                "hf decode tok/s": vs["transformers_generate"]["decode_tokens_per_s"],
                "ours/hf decode": vs["speedup_decode"],
                "ours/hf decode, lowest round": min(vs["speedup_decode_per_round"]),
                "ours/hf decode, highest round": max(vs["speedup_decode_per_round"]),
                "ours/hf total": vs["speedup_total"],
                "ours TTFT ms": 1000 * vs["ours"]["ttft_s"],
                "hf TTFT ms": 1000 * vs["transformers_generate"]["ttft_s"],
                "ours prefill tok/s": vs["ours"]["prefill_tokens_per_s"],
                "hf prefill tok/s": vs["transformers_generate"]["prefill_tokens_per_s"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["peak", "train", "decode", "hf"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench_out/core", help="where each run's JSON goes")
    p.add_argument("--run-dir", default="bench_out/decode-run", help="decode/hf: run to time")
    a, extra = p.parse_known_args()  # the rest (after --) goes to `scratchlm bench`
    extra = [x for x in extra if x != "--"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "scratchlm.cli", "bench"]
    if a.what in ("decode", "hf"):
        run = make_decode_run(Path(a.run_dir))
        cmd += ["decode", str(run)]
        if a.what == "hf":
            cmd += ["--new-tokens", "256", "--vs-transformers"]
    else:
        cmd += [a.what]
    cmd += extra + ["--json"]
    print("$", " ".join(cmd[2:]).replace("scratchlm.cli", "scratchlm"), file=sys.stderr)
    figures: dict[str, list[float]] = {}
    for i in range(a.repeat):
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(res.stdout)
        (out / f"{a.what}-{i}.json").write_text(json.dumps(r, indent=1) + "\n")
        for k, v in headline(a.what, r).items():
            figures.setdefault(k, []).append(v)
        print(f"run {i + 1}/{a.repeat} done", file=sys.stderr)
    print(f"{'figure':32} {'median':>10}   all runs")
    for k, vals in figures.items():
        print(f"{k:32} {statistics.median(vals):10.3f}   {', '.join(f'{v:.3f}' for v in vals)}")


if __name__ == "__main__":
    main()
