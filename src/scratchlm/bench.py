"""Benchmarks: this machine's matmul peak, training throughput and MFU, decoding speed.

Driven by `scratchlm bench peak|train|decode ... [--json]` (see `benchmarks/README.md` for
measured figures and `docs/performance.md` for what they mean):

| command | measures |
|---|---|
| `bench peak` | 2048x2048 matmul GFLOP/s, fp32 and bf16, best and median, torch's thread count |
| `bench train --preset P --precisions fp32,bf16` | tokens/s, ms/step, MFU of forward+backward+AdamW, all precisions side by side |
| `bench decode [RUN_DIR] --new-tokens N [--vs-transformers]` | cached vs uncached greedy decode at batch 1; prefill tokens/s, time to first token; optionally vs `transformers` `generate()` |

Fairness rules, because the machine is small and shared: every comparison runs in one process,
the variants alternate step by step (so a burst of load from elsewhere hits all of them), warm-up
is never timed, and medians are reported next to the best values. Each `bench_*` function takes
the CLI's argparse namespace and returns a JSON-able dict; without `--json` it also prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from scratchlm.config import RunConfig, load_run_config
from scratchlm.errors import UserError
from scratchlm.model import Transformer
from scratchlm.train import MasterWeights, autocast_context, configure_optimizer, resolve_precision

# ../shared/REFERENCE_FIGURES.md: 2 threads, 2048x2048, torch 2.13 CPU (bf16: median figure).
REFERENCE_PEAK_GFLOPS = {"fp32": 205.0, "bf16": 786.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_N = 2048
PEAK_REPS = 7
# Vocabulary used when the preset leaves it to the data (vocab_size 0): tinyshakespeare's 65
# characters, which makes `small` the 10.65M-parameter model of the reference figures.
DEFAULT_VOCAB = 65
PRECISION_HELP = (
    "fp32 | bf16 (autocast, fp32 weights: what `train.precision=bf16` does) | "
    "bf16-master (bf16 weights and activations, fp32 master weights in the optimizer); "
    "append +compile for torch.compile"
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- matmul peak -------------------------------------------------------------------------------


def matmul_gflops(dtypes: tuple[str, ...] = ("fp32", "bf16"), n: int | None = None,
                  reps: int | None = None) -> dict[str, list[float]]:
    """GFLOP/s of `reps` timed n x n matmuls per dtype, the dtypes alternating (2 warm-ups each)."""
    n, reps = n or PEAK_N, reps or PEAK_REPS
    g = torch.Generator().manual_seed(0)
    mats = {d: (torch.randn(n, n, generator=g).to(DTYPES[d]), torch.randn(n, n, generator=g).to(DTYPES[d]))
            for d in dtypes}
    out: dict[str, list[float]] = {d: [] for d in dtypes}
    for d in dtypes:
        for _ in range(2):
            torch.mm(*mats[d])
    for _ in range(reps):
        for d in dtypes:
            a, b = mats[d]
            t0 = time.perf_counter()
            torch.mm(a, b)
            out[d].append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return out


def _peak_summary(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        d: {
            "best_gflops": max(s),
            "median_gflops": statistics.median(s),
            "reference_gflops": REFERENCE_PEAK_GFLOPS[d],
            "samples": s,
        }
        for d, s in samples.items()
    }


def bench_peak(args: argparse.Namespace) -> dict[str, Any]:
    """`scratchlm bench peak`: fp32 and bf16 matmul GFLOP/s with torch's thread count."""
    peak = _peak_summary(matmul_gflops())
    result = {"bench": "peak", "threads": torch.get_num_threads(), "n": PEAK_N, "reps": PEAK_REPS,
              "torch": torch.__version__, **peak}
    if not args.json:
        print(f"matmul {PEAK_N}x{PEAK_N}, {result['threads']} threads, torch {torch.__version__}")
        print(f"{'dtype':6} {'best GFLOP/s':>13} {'median':>8} {'reference':>10}")
        for d in DTYPES:
            p = peak[d]
            print(f"{d:6} {p['best_gflops']:13.1f} {p['median_gflops']:8.1f} {p['reference_gflops']:10.0f}")
        print(f"bf16/fp32 (best): {peak['bf16']['best_gflops'] / peak['fp32']['best_gflops']:.2f}x")
    return result


# --- training throughput -----------------------------------------------------------------------


def _parse_precisions(text: str) -> list[tuple[str, str, bool]]:
    """'fp32,bf16+compile' -> [(label, base precision, compile)]."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        base, plus, opt = item.partition("+")
        if base not in ("fp32", "bf16", "bf16-master") or (plus and opt != "compile"):
            raise UserError(f"unknown precision {item!r} in --precisions; use {PRECISION_HELP}")
        out.append((item, base, bool(plus)))
    if not out:
        raise UserError("--precisions is empty; give e.g. fp32,bf16")
    if len({label for label, _, _ in out}) != len(out):
        raise UserError(f"--precisions lists a precision twice: {text!r}")
    return out


class TrainVariant:
    """One precision's model, optimizer and step; all variants start from the same weights."""

    def __init__(self, label: str, base: str, compiled: bool, init: Transformer, tcfg) -> None:
        self.label, self.base, self.compiled, self.tcfg = label, base, compiled, tcfg
        # The trainer's own pieces: optimizer, and for bf16-master its MasterWeights.
        self.weights = copy.deepcopy(init).train()  # what the optimizer updates
        self.master = MasterWeights(self.weights) if base == "bf16-master" else None
        self.model = self.master.compute if self.master is not None else self.weights
        self.opt = configure_optimizer(self.weights, tcfg, "cpu")
        self.forward = torch.compile(self.model) if compiled else self.model
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.warmup_s: list[float] = []
        self.losses: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step (forward, backward, clip, AdamW); returns its wall time and records
        the process's CPU time (all threads), which a busy machine inflates less than wall time."""
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast_context(self.base, "cpu"):  # a no-op for fp32 and bf16-master
            _, loss = self.forward(x, y)
        loss.backward()
        if self.master is not None:
            self.master.grads_to_master()
        if self.tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.weights.parameters(), self.tcfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.master is not None:
            self.master.weights_from_master()
        self.losses.append(loss.item())
        self.cpu_times.append(time.process_time() - c0)
        return time.perf_counter() - t0


def _train_config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set or [])
    cfg = load_run_config(args.preset, None, overrides)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = DEFAULT_VOCAB
    return cfg


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    """`scratchlm bench train`: forward+backward+AdamW steps on random tokens, per precision.

    The precisions alternate step by step after their warm-up; tokens/s comes from the median
    step time. MFU = model FLOPs per token (6N + 12*L*d*T) x tokens/s / matmul peak of the dtype,
    both the peak measured by this same run and the reference figure.
    """
    variants_spec = _parse_precisions(args.precisions)
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    cfg = _train_config(args)
    mc, tc = cfg.model, cfg.train
    B, T = tc.batch_size, mc.context_length
    torch.manual_seed(tc.seed)
    init = Transformer(mc)
    flops_tok = init.flops_per_token(T)
    n_params = sum(p.numel() for p in init.parameters())
    _log(f"bench train: preset {args.preset}, {n_params / 1e6:.2f}M params, batch {B} x {T} tokens, "
         f"{args.steps} timed steps per precision, {torch.get_num_threads()} threads")
    notes = {resolve_precision(base, "cpu")[1] for _, base, _ in variants_spec} - {""}
    for note in notes:  # e.g. bf16 on a CPU that emulates it
        _log(f"  {note}")
    peak_before = matmul_gflops(reps=3)

    g = torch.Generator().manual_seed(tc.seed)
    n_batches = 2
    batches = [(torch.randint(0, mc.vocab_size, (B, T), generator=g),
                torch.randint(0, mc.vocab_size, (B, T), generator=g)) for _ in range(n_batches)]
    variants = [TrainVariant(label, base, comp, init, tc) for label, base, comp in variants_spec]
    for v in variants:  # warm-up: eager 1 step; compiled 2 (the compile, then one to settle)
        for i in range(2 if v.compiled else 1):
            v.warmup_s.append(v.step(*batches[i % n_batches]))
        v.cpu_times.clear()
        _log(f"  warm-up {v.label}: {', '.join(f'{s:.1f}' for s in v.warmup_s)} s")
    for i in range(args.steps):
        for v in variants[i % len(variants):] + variants[: i % len(variants)]:  # rotate the order
            v.times.append(v.step(*batches[i % n_batches]))
        _log(f"  step {i + 1}/{args.steps}: " + ", ".join(f"{v.label} {v.times[-1]:.2f}s" for v in variants))
    peak_after = matmul_gflops(reps=3)
    peak = _peak_summary({d: peak_before[d] + peak_after[d] for d in DTYPES})

    rows = {}
    for v in variants:
        med = statistics.median(v.times)
        tps = B * T / med
        dtype = "fp32" if v.base == "fp32" else "bf16"
        achieved = flops_tok * tps / 1e9
        rows[v.label] = {
            "precision": v.base,
            "compile": v.compiled,
            "ms_per_step_median": 1000 * med,
            "ms_per_step_best": 1000 * min(v.times),
            "tokens_per_s": tps,
            "tokens_per_s_best": B * T / min(v.times),
            "achieved_gflops": achieved,
            "peak_dtype": dtype,
            "mfu_measured_peak": achieved / peak[dtype]["best_gflops"],
            "mfu_reference_peak": achieved / REFERENCE_PEAK_GFLOPS[dtype],
            "warmup_s": v.warmup_s,
            "step_s": v.times,
            "cpu_s_per_step_median": statistics.median(v.cpu_times),
            "final_loss": v.losses[-1],
        }
    base_label = next((label for label, b, c in variants_spec if b == "fp32" and not c), None)
    if base_label is not None:
        for label, row in rows.items():
            row["speedup_vs_fp32"] = row["tokens_per_s"] / rows[base_label]["tokens_per_s"]
            row["speedup_vs_fp32_best"] = row["tokens_per_s_best"] / rows[base_label]["tokens_per_s_best"]
            row["cpu_time_speedup_vs_fp32"] = (rows[base_label]["cpu_s_per_step_median"]
                                               / row["cpu_s_per_step_median"])
    result = {
        "bench": "train",
        "preset": args.preset,
        "overrides": list(args.set or []),
        "params": n_params,
        "flops_per_token": flops_tok,
        "batch_size": B,
        "context_length": T,
        "tokens_per_step": B * T,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "peak": peak,
        "results": rows,
    }
    if not args.json:
        _print_train(result)
    return result


def _print_train(r: dict[str, Any]) -> None:
    print(f"train {r['preset']} {' '.join(r['overrides'])}: {r['params'] / 1e6:.2f}M params, "
          f"{r['tokens_per_step']} tokens/step, {r['steps']} timed steps, {r['threads']} threads")
    print(f"peak (best, this run): fp32 {r['peak']['fp32']['best_gflops']:.0f}, "
          f"bf16 {r['peak']['bf16']['best_gflops']:.0f} GFLOP/s")
    print(f"{'precision':20} {'ms/step':>9} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU(run)':>9} "
          f"{'MFU(ref)':>9} {'vs fp32':>8} {'(best)':>7} {'(CPU s)':>8}")
    for label, row in r["results"].items():
        ratio = row.get("speedup_vs_fp32")
        print(f"{label:20} {row['ms_per_step_median']:9.0f} {row['tokens_per_s']:9.0f} "
              f"{row['achieved_gflops']:8.1f} {100 * row['mfu_measured_peak']:8.1f}% "
              f"{100 * row['mfu_reference_peak']:8.1f}% "
              f"{_x(ratio):>8} {_x(row.get('speedup_vs_fp32_best')):>7} "
              f"{_x(row.get('cpu_time_speedup_vs_fp32')):>8}")


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


# --- decoding ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _run_dir_or_throwaway(args: argparse.Namespace) -> Iterator[tuple[str, bool]]:
    """The given RUN_DIR, or a temporary run with random weights built from --preset/--set."""
    if args.run_dir:
        yield args.run_dir, False
        return
    from scratchlm.checkpoint import write_run
    from scratchlm.tokenizer import train_char

    cfg = _train_config(args)
    _prompt_len(cfg.model.context_length, args.new_tokens)  # fail before building anything
    with tempfile.TemporaryDirectory(prefix="scratchlm-bench-") as tmp:
        # A char tokenizer over printable ASCII: speed does not depend on the vocabulary's content.
        tok = train_char(["".join(chr(c) for c in range(32, 127)) + "\n"])
        cfg.model.vocab_size = tok.vocab_size
        tok.save(Path(tmp) / "tokenizer.json")
        torch.manual_seed(cfg.train.seed)
        run = Path(tmp) / "run"
        write_run(run, Transformer(cfg.model), cfg, Path(tmp) / "tokenizer.json")
        _log(f"bench decode: no RUN_DIR given, so timing a throwaway run with RANDOM weights "
             f"(preset {args.preset} {' '.join(args.set or [])}); speed does not depend on training")
        yield str(run), True


def _prompt_len(ctx: int, G: int) -> int:
    """Prompt length for G new tokens: 128 tokens, or what the context leaves room for."""
    if ctx - G < 1:
        raise UserError(f"--new-tokens {G} leaves no room for a prompt in the model's context of "
                        f"{ctx} tokens; ask for fewer tokens or use a model with a longer context")
    return min(128, ctx - G)


def _prompt_ids(vocab: int, special: set[int], n: int) -> list[int]:
    """A fixed pseudo-random prompt of n ordinary token ids (no end-of-text, no padding)."""
    g = torch.Generator().manual_seed(1234)
    ids = [i for i in torch.randint(0, vocab, (4 * n + 8,), generator=g).tolist() if i not in special]
    return ids[:n]


def _time_ours(model: Transformer, prompt: list[int], n_new: int, use_cache: bool) -> dict[str, Any]:
    """Greedy decode exactly n_new tokens (end-of-text ignored): TTFT, prefill and decode speed."""
    from scratchlm.generate import SamplingConfig, generate

    tokens: list[int] = []
    t0 = time.perf_counter()
    t_first = None
    for step in generate(model, [prompt], n_new, SamplingConfig(temperature=0.0), eot_id=None,
                         use_cache=use_cache):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(step[0])
    return _timing(t0, t_first, time.perf_counter(), len(prompt), tokens)


def _timing(t0: float, t_first: float, t_end: float, n_prompt: int, tokens: list[int]) -> dict[str, Any]:
    ttft = t_first - t0
    decode_s = t_end - t_first
    return {
        "ttft_s": ttft,
        "prefill_tokens_per_s": n_prompt / ttft,
        "decode_s": decode_s,
        "decode_tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 else 0.0,
        "total_s": t_end - t0,
        "new_tokens": len(tokens),
        "tokens": tokens,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each timing over repeated runs (tokens from the first run)."""
    out: dict[str, Any] = {"runs": len(runs), "tokens": runs[0]["tokens"], "new_tokens": runs[0]["new_tokens"]}
    for k in ("ttft_s", "prefill_tokens_per_s", "decode_s", "decode_tokens_per_s", "total_s"):
        out[k] = statistics.median(r[k] for r in runs)
    out["decode_tokens_per_s_all"] = [r["decode_tokens_per_s"] for r in runs]
    return out


def kv_speedup_theory(L: int, G: int) -> float:
    """S(L, G) = G*L / (L + G - 1): G full passes of L tokens vs one prefill plus G-1 single-token
    steps (the rebuilt system's formula; counts tokens processed, not wall time)."""
    return G * L / (L + G - 1)


def token_forward_ratio(P: int, G: int) -> float:
    """Tokens pushed through the model, uncached/cached, for a P-token prompt and G new tokens when
    the uncached sequence grows (P, P+1, ..., P+G-1) as it does in `generate(use_cache=False)`."""
    return (G * P + G * (G - 1) / 2) / (P + G - 1)


class _Stamps:
    """A `transformers` streamer that timestamps the prompt and each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:  # first call: the prompt; then one call per new token
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _time_hf(hf_model, prompt: list[int], n_new: int, pad_id: int) -> dict[str, Any]:
    stamps = _Stamps()
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad_id,
                                streamer=stamps)
    t_end = time.perf_counter()
    tokens = out[0, len(prompt):].tolist()
    return _timing(t0, stamps.times[1], t_end, len(prompt), tokens)


def bench_decode(args: argparse.Namespace) -> dict[str, Any]:
    """`scratchlm bench decode`: cached vs uncached greedy decoding at batch 1 in one run.

    Both decode the same prompt and exactly `--new-tokens` new tokens (end-of-text is ignored,
    so neither stops early). Cached runs 3 times around one uncached run; medians are reported.
    With --vs-transformers the run is exported with `export_hf` and `transformers` `generate()`
    is timed against ours on the same prompt, alternating, 3 times each.
    """
    from scratchlm.checkpoint import load_run

    G = args.new_tokens
    if G < 2:
        raise UserError(f"--new-tokens must be >= 2 to time decoding, got {G}")
    with _run_dir_or_throwaway(args) as (run_dir, throwaway):
        model, tok, cfg = load_run(run_dir)
        ctx = cfg.model.context_length
        P = _prompt_len(ctx, G)
        prompt = _prompt_ids(cfg.model.vocab_size, {tok.eot_id, tok.pad_id}, P)
        n_params = sum(p.numel() for p in model.parameters())
        _log(f"bench decode: {n_params / 1e6:.2f}M params, context {ctx}, prompt {P} tokens, "
             f"{G} new tokens, batch 1, {torch.get_num_threads()} threads")
        _time_ours(model, prompt, min(G, 8), True)  # warm-up
        cached_runs, uncached_runs = [], []
        cached_runs.append(_time_ours(model, prompt, G, True))
        uncached_runs.append(_time_ours(model, prompt, G, False))
        _log(f"  uncached: {uncached_runs[-1]['decode_tokens_per_s']:.1f} tokens/s")
        for _ in range(2):
            cached_runs.append(_time_ours(model, prompt, G, True))
        cached, uncached = _median_run(cached_runs), _median_run(uncached_runs)
        _log(f"  cached: {cached['decode_tokens_per_s']:.1f} tokens/s")
        result: dict[str, Any] = {
            "bench": "decode",
            "run_dir": None if throwaway else str(run_dir),
            "random_weights": throwaway,
            "params": n_params,
            "context_length": ctx,
            "prompt_tokens": P,
            "new_tokens": G,
            "batch_size": 1,
            "threads": torch.get_num_threads(),
            "cached": _public(cached),
            "uncached": _public(uncached),
            "speedup_decode": cached["decode_tokens_per_s"] / uncached["decode_tokens_per_s"],
            "speedup_total": uncached["total_s"] / cached["total_s"],
            "tokens_match": cached["tokens"] == uncached["tokens"],
            "theory_S": kv_speedup_theory(P, G),
            "theory_token_ratio": token_forward_ratio(P, G),
        }
        if args.vs_transformers:
            result["vs_transformers"] = _vs_transformers(run_dir, model, tok, prompt, min(G, 256))
    if not args.json:
        _print_decode(result)
    return result


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "tokens"}


def _vs_transformers(run_dir: str, model: Transformer, tok, prompt: list[int], G: int) -> dict[str, Any]:
    """Ours vs `transformers` `generate()` on the exported weights, fp32 vs fp32 (the headline)
    and bf16 vs bf16 (weights cast after loading), all four alternating, 3 runs each."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("--vs-transformers needs transformers: pip install 'scratchlm[dev]' "
                        "(or pip install transformers)") from None
    from scratchlm.export import export_hf

    with tempfile.TemporaryDirectory(prefix="scratchlm-hf-") as tmp:
        path = export_hf(run_dir, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
    contenders = {
        ("fp32", "ours"): lambda n: _time_ours(model, prompt, n, True),
        ("fp32", "transformers_generate"): lambda n: _time_hf(hf, prompt, n, tok.pad_id),
    }
    model16, hf16 = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(hf).to(torch.bfloat16)
    contenders[("bf16", "ours")] = lambda n: _time_ours(model16, prompt, n, True)
    contenders[("bf16", "transformers_generate")] = lambda n: _time_hf(hf16, prompt, n, tok.pad_id)
    for run in contenders.values():
        run(min(G, 8))  # warm-up
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in contenders}
    for _ in range(3):
        for key, run in contenders.items():
            runs[key].append(run(G))
        _log("  " + ", ".join(f"{who} {dt} {r[-1]['decode_tokens_per_s']:.1f}" for (dt, who), r in runs.items())
             + " tokens/s")
    med = {k: _median_run(v) for k, v in runs.items()}
    out: dict[str, Any] = {"transformers": transformers.__version__, "hf_class": type(hf).__name__,
                           "new_tokens": G}
    for dt in ("fp32", "bf16"):
        ours, theirs = med[(dt, "ours")], med[(dt, "transformers_generate")]
        block = {
            "ours": _public(ours),
            "transformers_generate": _public(theirs),
            "speedup_decode": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
            "speedup_total": theirs["total_s"] / ours["total_s"],
            "speedup_ttft": theirs["ttft_s"] / ours["ttft_s"],
            # Each round's ours/theirs from runs seconds apart: robust to the machine's drifts.
            "speedup_decode_per_round": [o["decode_tokens_per_s"] / t["decode_tokens_per_s"]
                                         for o, t in zip(runs[(dt, "ours")], runs[(dt, "transformers_generate")])],
            "tokens_match": ours["tokens"] == theirs["tokens"],
        }
        if dt == "fp32":
            out.update(block)  # the headline: both in fp32, as exported
        else:
            out["bf16"] = block
    out["speedup_decode_ours_bf16_vs_transformers_fp32"] = (
        med[("bf16", "ours")]["decode_tokens_per_s"] / med[("fp32", "transformers_generate")]["decode_tokens_per_s"])
    return out


def _print_decode(r: dict[str, Any]) -> None:
    where = "throwaway run, random weights" if r["random_weights"] else r["run_dir"]
    print(f"decode ({where}): {r['params'] / 1e6:.2f}M params, context {r['context_length']}, "
          f"prompt {r['prompt_tokens']}, {r['new_tokens']} new tokens, batch 1, {r['threads']} threads")
    rows: list[tuple[str, dict[str, Any]]] = [("cached", r["cached"]), ("uncached", r["uncached"])]
    vs = r.get("vs_transformers")
    if vs:
        rows += [(f"ours fp32 ({vs['new_tokens']} new)", vs["ours"]),
                 (f"transformers fp32 ({vs['new_tokens']} new)", vs["transformers_generate"]),
                 (f"ours bf16 ({vs['new_tokens']} new)", vs["bf16"]["ours"]),
                 (f"transformers bf16 ({vs['new_tokens']} new)", vs["bf16"]["transformers_generate"])]
    print(f"{'':26} {'decode tok/s':>12} {'prefill tok/s':>13} {'TTFT ms':>8} {'total s':>8}")
    for name, x in rows:
        print(f"{name:26} {x['decode_tokens_per_s']:12.1f} {x['prefill_tokens_per_s']:13.0f} "
              f"{1000 * x['ttft_s']:8.1f} {x['total_s']:8.2f}")
    print(f"cache speedup: decode {r['speedup_decode']:.1f}x, total {r['speedup_total']:.1f}x "
          f"(theory S(L,G) {r['theory_S']:.1f}x, token-count ratio {r['theory_token_ratio']:.1f}x); "
          f"greedy tokens identical: {r['tokens_match']}")
    if vs:
        per_round = ", ".join(f"{x:.2f}x" for x in vs["speedup_decode_per_round"])
        print(f"vs transformers {vs['transformers']} ({vs['hf_class']}), fp32: decode {vs['speedup_decode']:.2f}x "
              f"(rounds: {per_round}), total {vs['speedup_total']:.2f}x, TTFT {vs['speedup_ttft']:.2f}x; "
              f"greedy tokens identical: {vs['tokens_match']}")
        b = vs["bf16"]
        print(f"  bf16: decode {b['speedup_decode']:.2f}x, TTFT {b['speedup_ttft']:.2f}x; ours bf16 vs "
              f"transformers fp32: decode {vs['speedup_decode_ours_bf16_vs_transformers_fp32']:.2f}x")
