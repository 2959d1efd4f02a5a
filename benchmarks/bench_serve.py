"""Serving throughput: aggregate decode tokens/s with 8 concurrent clients vs 1 client.

    python benchmarks/bench_serve.py                      # tiny preset, untrained weights
    python benchmarks/bench_serve.py --clients 8 --max-tokens 200 --requests 4 --json out.json

Builds a throwaway run directory (the `tiny` preset: 2 layers, d_model 64, context 256, with a
character tokenizer; untrained weights are fine for throughput), starts `scratchlm serve` on
it in a subprocess on a loopback port, then streams completions through the OpenAI API
(`stream: true`, `temperature: 0`, `ignore_eos: true` so every request makes exactly
`--max-tokens` tokens, counted from the server's `usage`). Phase 1: one client sends its
requests one after another. Phase 2: N clients do the same at once. Aggregate tokens/s is all
completion tokens over the phase's wall time; the target (issue 4) is phase 2 >= 4x phase 1.
The two phases alternate for `--rounds` rounds and the medians are reported (shared machines
are noisy), with the server process's CPU time per token, which load on the machine barely
changes (Linux only).

`--vs-thread` also starts the same app with the engine as a thread of the server process
(`create_app(engine="thread")`, what `serve` ran before it moved the engine to a child process)
and has the two servers take turns, phase by phase.

`--engine-only` runs the same two phases on `scratchlm.engine.Engine` in this process, with no
HTTP, threads chosen as `serve` chooses them: what continuous batching gains before the server's
streaming costs its share.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from scratchlm.checkpoint import write_run
from scratchlm.config import load_run_config
from scratchlm.model import Transformer
from scratchlm.tokenizer import train_char

ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"
PROMPT = "To be, or not to be, that is the question:"


def build_run(out: Path, preset: str, **model_kw) -> Path:
    """A run of the preset (model fields overridden by model_kw), character tokenizer."""
    tok = train_char([ALPHABET])
    tok.save(out / "tokenizer.json")
    cfg = load_run_config(preset)
    cfg.model = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, **model_kw)
    torch.manual_seed(0)
    run = out / f"bench-{preset}"
    write_run(run, Transformer(cfg.model), cfg, out / "tokenizer.json")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    """`scratchlm serve RUN --port PORT --max-batch N`, with OMP_NUM_THREADS=threads if > 0."""
    return subprocess.Popen([sys.executable, "-m", "scratchlm.cli", "serve", str(run), "--port",
                             str(port), "--max-batch", str(max_batch)], env=_server_env(threads))


def _server_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# The same app with the engine as a thread of the server (`--vs-thread`), threads as serve picks.
THREAD_SERVER = """\
import sys
from scratchlm.engine import pick_threads
from scratchlm.serve import _uvicorn, create_app, listen
run, port, max_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
app = create_app(run, max_batch=max_batch, engine="thread")
pick_threads(app.state.server.engine.model)
_uvicorn(app).run(sockets=[listen("127.0.0.1", port)])
"""


def start_thread_server(run: Path, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", THREAD_SERVER, str(run), str(port), str(max_batch)],
                            env=_server_env(threads))


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not come up")


async def one_request(http: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[int, float]:
    """Stream one completion; (completion tokens, time to first token)."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            if '"usage"' in line:  # parse only the last chunk: keep the client's CPU use small
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens, ttft or 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its descendants (the server and its
    engine process); 0 where /proc is missing."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, total = {pid}, 0
    for p in sorted(stats):  # children have larger pids than their parent here (no wrap-around)
        if p == pid or stats[p][0] in tree:
            tree.add(p)
            total += stats[p][1]
    return total / os.sysconf("SC_CLK_TCK")


async def phase(url: str, clients: int, requests: int, max_tokens: int, pid: int) -> dict:
    async def client(http: httpx.AsyncClient) -> list[tuple[int, float]]:
        return [await one_request(http, url, max_tokens) for _ in range(requests)]

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await one_request(http, url, 8)  # warm-up
        cpu0, own0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(client(http) for _ in range(clients)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        own = time.process_time() - own0
    flat = [r for rs in results for r in rs]
    tokens = sum(t for t, _ in flat)
    assert tokens == clients * requests * max_tokens, (tokens, clients * requests * max_tokens)
    return {"clients": clients, "requests": len(flat), "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "server_cpu_ms_per_token": round(1000 * cpu / tokens, 3),
            "client_cpu_ms_per_token": round(1000 * own / tokens, 3),
            "mean_ttft_ms": round(1000 * sum(f for _, f in flat) / len(flat), 1)}


def engine_phase(engine, prompt: list[int], clients: int, requests: int, max_tokens: int) -> dict:
    """The engine without HTTP: `clients` request streams, each `requests` requests in a row."""
    import threading

    from scratchlm.engine import GenerationParams
    from scratchlm.generate import SamplingConfig

    params = GenerationParams(max_tokens=max_tokens, sampling=SamplingConfig(temperature=0.0),
                              ignore_eos=True)
    done = threading.Semaphore(0)
    left = [requests] * clients
    counted = [0]  # completion tokens, as the engine reports them

    def submit(c: int) -> None:
        def sink(ev) -> None:  # engine thread
            if ev.finish_reason is None:
                return
            counted[0] += ev.completion_tokens
            left[c] -= 1
            if left[c]:
                submit(c)
            else:
                done.release()
        engine.submit([prompt], params, sink)

    t0 = time.perf_counter()
    for c in range(clients):
        submit(c)
    for _ in range(clients):
        done.acquire()
    wall = time.perf_counter() - t0
    tokens = counted[0]
    return {"clients": clients, "requests": clients * requests, "tokens": tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1)}


def engine_only(a: argparse.Namespace) -> None:
    from scratchlm.checkpoint import load_run
    from scratchlm.engine import Engine
    from scratchlm.engine import pick_threads as _pick_threads

    with tempfile.TemporaryDirectory() as tmp:
        model, tok, _ = load_run(build_run(Path(tmp), a.preset))
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    engine = Engine(model, tok, max_batch=a.max_batch).start()
    threads = f"{a.threads} torch threads" if a.threads > 0 else _pick_threads(engine.model)
    prompt = tok.encode(PROMPT)
    try:
        engine_phase(engine, prompt, 1, 1, 8)  # warm-up
        rounds = [(engine_phase(engine, prompt, 1, a.requests, a.max_tokens),
                   engine_phase(engine, prompt, a.clients, a.requests, a.max_tokens))
                  for _ in range(a.rounds)]
    finally:
        engine.stop()
    single, multi = (median_phase([r[i] for r in rounds]) for i in (0, 1))
    speedup = round(multi["tokens_per_s"] / single["tokens_per_s"], 2)
    print(f"engine only ({threads}): 1 stream {single['tokens_per_s']:.1f} tokens/s, "
          f"{a.clients} streams {multi['tokens_per_s']:.1f} tokens/s: {speedup}x; per round: "
          f"{[[s['tokens_per_s'], m['tokens_per_s']] for s, m in rounds]}")
    if a.json:
        Path(a.json).write_text(json.dumps({"engine_only": True, "preset": a.preset, "single": single,
                                            "concurrent": multi, "speedup": speedup}, indent=2) + "\n")


def summarise(rounds: list[tuple[dict, dict]]) -> dict:
    single, multi = (median_phase([r[i] for r in rounds]) for i in (0, 1))
    return {
        "single": single, "concurrent": multi,
        "speedup": round(multi["tokens_per_s"] / single["tokens_per_s"], 2),
        "cpu_speedup": round(single["server_cpu_ms_per_token"] / multi["server_cpu_ms_per_token"], 2)
        if multi["server_cpu_ms_per_token"] else None,
        "per_round_tokens_per_s": [[s["tokens_per_s"], m["tokens_per_s"]] for s, m in rounds],
    }


def report(result: dict, clients: int) -> None:
    for name, ph in (("1 client ", result["single"]), (f"{clients} clients", result["concurrent"])):
        print(f"{name}: {ph['tokens_per_s']:8.1f} tokens/s  ({ph['tokens']} tokens in {ph['seconds']} s, "
              f"mean TTFT {ph['mean_ttft_ms']} ms, server CPU {ph['server_cpu_ms_per_token']} ms/token, "
              f"clients' CPU {ph['client_cpu_ms_per_token']} ms/token)")
    print(f"speedup  : {result['speedup']}x (target >= 4x); server CPU per token: "
          f"{result['cpu_speedup']}x less; per round: {result['per_round_tokens_per_s']}")


def median_phase(phases: list[dict]) -> dict:
    """The round with the median throughput (its other figures come with it)."""
    return sorted(phases, key=lambda ph: ph["tokens_per_s"])[len(phases) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients in phase 2")
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS of the server (0: unset; serve then uses 1 thread for a "
                   "model this small)")
    p.add_argument("--engine-only", action="store_true",
                   help="time the engine in this process, without the HTTP server")
    p.add_argument("--vs-thread", action="store_true",
                   help="also serve the same run with the engine as a thread of the server "
                   "(create_app(engine='thread')), taking turns with `serve`'s child process")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()
    if a.engine_only:
        engine_only(a)
        return
    starters = {"process": start_server}
    if a.vs_thread:
        starters["thread"] = start_thread_server
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(Path(tmp), a.preset)
        servers = {}
        try:
            for name, start in starters.items():
                port = free_port()
                servers[name] = (start(run, port, a.max_batch, a.threads), f"http://127.0.0.1:{port}")
            for proc, url in servers.values():
                wait_ready(url, proc)
            rounds: dict[str, list] = {name: [] for name in servers}
            for _ in range(a.rounds):  # the servers take turns, so the machine's drifts hit both
                for name, (proc, url) in servers.items():
                    rounds[name].append((asyncio.run(phase(url, 1, a.requests, a.max_tokens, proc.pid)),
                                         asyncio.run(phase(url, a.clients, a.requests, a.max_tokens, proc.pid))))
            metrics = httpx.get(servers["process"][1] + "/metrics").text
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    steps = next(float(line.split()[1]) for line in metrics.splitlines()
                 if line.startswith("scratchlm_decode_steps_total "))
    result = summarise(rounds["process"])
    result.update({
        "preset": a.preset, "max_tokens": a.max_tokens, "max_batch": a.max_batch, "rounds": a.rounds,
        "decode_steps": int(steps), "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "omp_num_threads": a.threads or "unset",
        "stream_interval": os.environ.get("SCRATCHLM_STREAM_INTERVAL", "default (0.02)"),
    })
    report(result, a.clients)
    if a.vs_thread:
        result["engine_as_a_thread"] = summarise(rounds["thread"])
        print("the same with the engine as a thread of the server:")
        report(result["engine_as_a_thread"], a.clients)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
