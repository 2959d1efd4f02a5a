"""Chunked prefill: how long a long prompt stalls the requests already decoding.

    python benchmarks/bench_chunked_prefill.py                 # small preset, context 1024
    python benchmarks/bench_chunked_prefill.py --prompt 900 --chunks 128,512,100000 --rounds 3

The engine in this process (`scratchlm.engine.Engine`, no HTTP; one torch thread, as `serve`
picks for a small model) on a throwaway run (the `small` preset, 10.65M parameters, context
1024, untrained weights, character tokenizer). Two streams decode; then a `--prompt`-token
prompt arrives. Reported for each `PREFILL_CHUNK` (prompt tokens prefilled per engine step;
100000 stands for no chunking): the running streams' longest gap between two tokens while it
is prefilled, and the new prompt's time to first token. The settings take turns, round by
round, so the machine's speed moves them alike; medians over `--rounds`. The prefix cache is
off, so every round prefills the whole prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench_serve import ALPHABET, build_run

import scratchlm.engine as engine_mod
from scratchlm.checkpoint import load_run
from scratchlm.engine import Engine, GenerationParams, pick_threads
from scratchlm.generate import SamplingConfig


def one_round(engine: Engine, tok, prompt_len: int) -> tuple[float, float]:
    """(longest gap between tokens of the running streams, new prompt's TTFT), in ms."""
    greedy = SamplingConfig(temperature=0)
    stamps: list[list[float]] = [[], []]
    started = threading.Event()

    def sink_for(i: int):
        def sink(ev) -> None:
            stamps[i].append(time.perf_counter())
            if len(stamps[0]) > 5 and len(stamps[1]) > 5:
                started.set()
        return sink

    running = [engine.submit([tok.encode(f"{i} To be, or not to be")], GenerationParams(
        max_tokens=600, sampling=greedy, ignore_eos=True), sink_for(i))[0] for i in range(2)]
    started.wait(60)
    text = (ALPHABET * (prompt_len // len(ALPHABET) + 1))[:prompt_len]
    t0 = time.perf_counter()
    done = threading.Event()
    first: list[float] = []

    def on_new(ev) -> None:
        if not first:
            first.append(time.perf_counter())
        if ev.finish_reason is not None:
            done.set()

    engine.submit([tok.encode(text)], GenerationParams(max_tokens=2, sampling=greedy, ignore_eos=True), on_new)
    done.wait(60)
    t1 = first[0]
    for r in running:
        engine.cancel(r)
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < t1 + 0.05]
    return 1000 * max(gaps), 1000 * (t1 - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=900, help="tokens of the prompt that arrives")
    p.add_argument("--chunks", default="128,512,100000", help="PREFILL_CHUNK values to compare")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()
    chunks = [int(c) for c in a.chunks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, _ = load_run(build_run(Path(tmp), a.preset, context_length=a.context))
    threads = pick_threads(model)
    engine = Engine(model, tok, max_batch=4, prefix_cache_bytes=0).start()
    results: dict[int, list[tuple[float, float]]] = {c: [] for c in chunks}
    try:
        engine_mod.PREFILL_CHUNK = chunks[0]
        one_round(engine, tok, min(a.prompt, 64))  # warm-up
        for _ in range(a.rounds):
            for c in chunks:
                engine_mod.PREFILL_CHUNK = c
                results[c].append(one_round(engine, tok, a.prompt))
    finally:
        engine.stop()
    rows = []
    for c in chunks:
        stall = statistics.median(r[0] for r in results[c])
        ttft = statistics.median(r[1] for r in results[c])
        rows.append({"prefill_chunk": c, "longest_gap_ms": round(stall, 1), "ttft_ms": round(ttft, 1)})
        print(f"PREFILL_CHUNK {c:6d}: running streams' longest gap {stall:6.1f} ms; "
              f"the {a.prompt}-token prompt's TTFT {ttft:6.1f} ms")
    print(f"({threads}; torch {torch.__version__})")
    if a.json:
        Path(a.json).write_text(json.dumps({"preset": a.preset, "context": a.context, "prompt": a.prompt,
                                            "rounds": a.rounds, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
