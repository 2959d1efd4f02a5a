"""Prefix caching: time to first token of a chat's turns, with the prefix cache and without.

    python benchmarks/bench_prefix_cache.py                  # small preset, context 1024
    python benchmarks/bench_prefix_cache.py --turns 8 --rounds 3 --json out.json

Every turn of a chat resends the whole conversation. Two `scratchlm serve` processes on the
same throwaway run (the `small` preset, 10.65M parameters, context 1024, untrained weights,
character tokenizer), one as it starts by default and one with `--prefix-cache-mb 0`, hold the
same chat in turns: each turn streams `render_chat(history)` through /v1/completions (what the
chat endpoint sends the engine), greedy, `ignore_eos`, `--reply-tokens` new tokens, and the
reply and a next user message join the history. The two servers take turns, turn by turn, so
the machine's speed moves both alike. Reported per turn: the prompt's length, the tokens the
prefix cache served (`usage.prompt_tokens_details.cached_tokens`) and the median time to first
token of each server over `--rounds` chats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench_serve import build_run, free_port, wait_ready

from scratchlm.api import render_chat

SYSTEM = ("You are a helpful assistant who answers questions about the plays of Shakespeare, "
          "their characters, their language and their history, briefly and without inventing facts.")
QUESTIONS = ["Who is Hamlet?", "What does he ask the ghost?", "Why does he wait so long?",
             "What happens to Ophelia?", "Who is Horatio to him?", "How does the play end?",
             "Which speech is the most famous?", "Why do people still read it today?"]


def start(run: Path, port: int, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scratchlm.cli", "serve", str(run), "--port",
                             str(port), *extra], stdout=subprocess.DEVNULL)


async def turn(http: httpx.AsyncClient, url: str, prompt: str, reply_tokens: int) -> tuple[float, str, int]:
    """(time to first token, reply, cached prompt tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": reply_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, cached = None, [], 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
            for c in chunk["choices"]:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(c["text"])
    return ttft or 0.0, "".join(text), cached


async def chat(urls: dict[str, str], turns: int, reply_tokens: int, tag: str) -> list[dict]:
    """One chat on every server, turn by turn; the histories stay identical (greedy, and the
    prefix cache changes no output), which is checked. `tag` starts the system prompt, so
    that no chat starts with another's tokens."""
    history = {name: [{"role": "system", "content": f"{tag} {SYSTEM}"}] for name in urls}
    rows = []
    async with httpx.AsyncClient(timeout=300) as http:
        for t in range(turns):
            row = {"turn": t + 1}
            replies = {}
            for name, url in urls.items():
                history[name].append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
                prompt = render_chat(history[name])
                ttft, reply, cached = await turn(http, url, prompt, reply_tokens)
                history[name].append({"role": "assistant", "content": reply.strip()})
                replies[name] = reply
                row["prompt_tokens"] = len(prompt)  # the character tokenizer: one id per character
                row[f"{name}_ttft_ms"] = 1000 * ttft
                row[f"{name}_cached"] = cached
            assert len(set(replies.values())) == 1, "the servers' replies differ"
            assert row["uncached_cached"] == 0
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--reply-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="chats; medians reported")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(Path(tmp), a.preset, context_length=a.context)
        ports = {"cached": free_port(), "uncached": free_port()}
        procs = {"cached": start(run, ports["cached"], []),
                 "uncached": start(run, ports["uncached"], ["--prefix-cache-mb", "0"])}
        try:
            urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
            for name, url in urls.items():
                wait_ready(url, procs[name])
            asyncio.run(chat(urls, 1, 4, "Warm-up."))
            chats = [asyncio.run(chat(urls, a.turns, a.reply_tokens, f"Chat {r}.")) for r in range(a.rounds)]
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait()
    rows = []
    for t in range(a.turns):
        runs = [c[t] for c in chats]
        row = {"turn": t + 1, "prompt_tokens": runs[0]["prompt_tokens"], "cached_tokens": runs[0]["cached_cached"]}
        for name in ("cached", "uncached"):
            row[f"{name}_ttft_ms"] = round(statistics.median(r[f"{name}_ttft_ms"] for r in runs), 1)
        row["speedup"] = round(row["uncached_ttft_ms"] / row["cached_ttft_ms"], 2)
        rows.append(row)
        print(f"turn {row['turn']}: prompt {row['prompt_tokens']:4d} tokens, {row['cached_tokens']:4d} from the "
              f"prefix cache; TTFT {row['cached_ttft_ms']:6.1f} ms with it, {row['uncached_ttft_ms']:6.1f} ms "
              f"without ({row['speedup']:.2f}x)")
    if a.json:
        Path(a.json).write_text(json.dumps({"preset": a.preset, "context": a.context,
                                            "reply_tokens": a.reply_tokens, "rounds": a.rounds,
                                            "turns": rows}, indent=1))


if __name__ == "__main__":
    main()
