"""The engine in a child process: `EngineProcess` runs an `engine.Engine` in a process of its own
behind the same interface, so that the HTTP side and the model never wait on each other for
Python's interpreter lock.

What `scratchlm serve` runs (through `serve.create_app`); docs/serving.md, "Processes".
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from scratchlm.engine import (Engine, EngineClosed, Event, GenerationParams, QueueFull, Request, _check_chunk,
                              _check_slots, _new_requests, log, pick_threads)
from scratchlm.errors import UserError


class EngineProcess:
    """An `Engine` in a child process, behind the same interface the server uses: `submit`,
    `cancel`, `stop`, the counters and gauges.

    Why a process: Python runs one thread at a time per process, and every torch op hands that
    lock over and takes it back. In one process the HTTP side (the event loop: parsing, JSON,
    server-sent events) and the engine thread take turns on it, so streaming to 8 clients cost
    the engine ~45% of its speed (tiny model on the 2-core CPU: 3,522 tokens/s through HTTP
    against 6,520 for the engine alone). vLLM runs its engine core in its own process for the
    same reason. The child owns the model and the KV cache; the parent keeps a mirror of each
    request (its text, ids, timings), fed by messages that carry every event since the last
    (at most one per `RELAY_INTERVAL`; a first token or a last event goes at once). Two one-way
    pipes carry pickled tuples of plain values (pickle only ever loads what the other process
    of this pair dumped; nothing from a client is unpickled):

        parent -> child: ("submit", [(id, prompt, params), ...]) | ("cancel", id) | ("stop",)
        child -> parent: ("ready", threads) | ("failed", message) first, then
                         ("events", [(id, text, finish_reason, prompt_tokens,
                          completion_tokens, error, ids, logprobs, prompt_logprobs,
                          cached_tokens), ...],
                          (waiting, running, prompt tokens, cached prompt tokens,
                          generation tokens, steps))

    The child exits when the parent's end of the pipe closes, so it never outlives the server.
    """

    def __init__(self, run_dir: str | Path, max_batch: int = 8, max_queue: int = 64,
                 device: str = "cpu", prefix_cache_bytes: int | None = None,
                 prefill_chunk: int | None = None) -> None:
        from scratchlm.checkpoint import read_run_config

        _check_slots(max_batch, max_queue)
        _check_chunk(prefill_chunk)
        self.prefill_chunk = prefill_chunk
        self.run_dir, self.device = str(run_dir), device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefix_cache_bytes = None if prefix_cache_bytes is None else int(prefix_cache_bytes)
        self.context_length = read_run_config(Path(run_dir))[0].model.context_length
        self.threads = ""  # the child's thread choice, known once it is ready
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._reqs: dict[int, Request] = {}  # submitted and not yet finished, by id
        self._closed = False
        self._stopping = False
        self._reader: threading.Thread | None = None
        self.prompt_tokens_total = self.cached_tokens_total = 0
        self.generation_tokens_total = self.steps_total = 0
        self._waiting = self._running = 0

    def start(self) -> EngineProcess:
        """Start the child and wait until it has loaded the model (UserError if it cannot)."""
        if self.process is not None:
            return self
        # A plain `python -c` child, not multiprocessing's spawn: spawn re-runs the parent's
        # main script, which breaks any script that builds a server without a main guard.
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1])  # where this scratchlm is imported from
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        code = ("import sys; from scratchlm.engine_process import _engine_process_main; "
                "_engine_process_main(sys.argv[1:])")
        args = [self.run_dir, self.device, str(self.max_batch), str(self.max_queue),
                str(cmd_r), str(res_w), str(self.prefix_cache_bytes), str(self.prefill_chunk)]
        try:
            self.process = subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                                            pass_fds=(cmd_r, res_w), stdin=subprocess.DEVNULL)
        finally:
            os.close(cmd_r)  # only the child holds these ends now, so either side sees the other go
            os.close(res_w)
        self._commands = Connection(cmd_w, readable=False)
        self._results = Connection(res_r, writable=False)
        try:
            kind, detail = pickle.loads(self._results.recv_bytes())
        except EOFError:
            kind, detail = "failed", ("the engine process exited while loading the model (exit code "
                                      f"{self.process.wait()})")
        if kind != "ready":
            self._closed = True
            self.process.wait()
            raise UserError(detail)
        self.threads = detail
        self._reader = threading.Thread(target=self._read, name="scratchlm-engine-reader", daemon=True)
        self._reader.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child; every unfinished request gets finish_reason "error"."""
        with self._lock:
            self._stopping = self._closed = True
            if self.process is None:
                return
            self._send(("stop",))
        if self._reader is not None:
            self._reader.join(timeout)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._fail_all("the server is shutting down")

    @property
    def alive(self) -> bool:
        return not self._closed and self.process is not None and self.process.poll() is None

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def submit(
        self,
        prompts: Sequence[list[int]],
        params: GenerationParams | Sequence[GenerationParams],
        sink: Callable[[Event], None],
    ) -> list[Request]:
        """As `Engine.submit`. The queue bound counts requests not yet seen to finish, which
        is never fewer than the child holds, so the child never refuses what is sent."""
        reqs = _new_requests(prompts, params, sink, self.context_length)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is not running")
            in_flight = len(self._reqs)
            if in_flight + len(reqs) > self.max_batch + self.max_queue:
                raise QueueFull(
                    f"server overloaded: {in_flight} requests running or waiting (max_batch "
                    f"{self.max_batch}, max_queue {self.max_queue}); retry later"
                )
            for req in reqs:  # before sending: the reader may see their events at once
                self._reqs[req.id] = req
            if not self._send(("submit", [(r.id, r.prompt, r.params) for r in reqs])):
                for req in reqs:
                    del self._reqs[req.id]
                raise EngineClosed("the engine process is not running")
        return reqs

    def cancel(self, req: Request) -> None:
        """Stop a request; its "cancelled" event comes back from the child."""
        with self._lock:
            if req.done or req.cancelled or self._closed:
                return
            req.cancelled = True
            self._send(("cancel", req.id))

    def _send(self, msg: tuple) -> bool:
        """Send a command (with the lock held); False when the child is gone."""
        try:
            self._commands.send_bytes(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))
            return True
        except (OSError, ValueError):
            return False

    def _read(self) -> None:
        """Reader thread: apply the child's events to the mirrors and pass them on."""
        while True:
            try:
                _, events, stats = pickle.loads(self._results.recv_bytes())
            except (EOFError, OSError):
                break
            self._waiting, self._running, self.prompt_tokens_total, self.cached_tokens_total, \
                self.generation_tokens_total, self.steps_total = stats
            now = time.perf_counter()
            for rid, text, reason, prompt_tokens, completion_tokens, error, ids, lps, prompt_lps, \
                    cached in events:
                req = self._reqs.get(rid)
                if req is None:
                    continue
                # A first token, or an end ("stop"/"length") right after the prefill (say a
                # first token that is end-of-text); not a cancel or error before any token.
                if req.t_first_token is None and (ids or reason in ("stop", "length")):
                    req.t_first_token = now
                req.tokens += ids
                req.logprobs += lps
                if prompt_lps is not None:
                    req.prompt_logprobs = prompt_lps
                req.text += text
                if reason is not None:
                    req.finish_reason, req.t_done = reason, now
                    with self._lock:
                        self._reqs.pop(rid, None)
                req.sink(Event(req.index, text, reason, prompt_tokens, completion_tokens, error, ids,
                               lps, prompt_lps, cached))
        with self._lock:
            unexpected = not self._stopping
            self._closed = True
        if unexpected:
            code = self.process.wait()
            log.error("the engine process exited unexpectedly (exit code %s)", code)
            self._fail_all(f"the engine process exited unexpectedly (exit code {code})")

    def _fail_all(self, error: str) -> None:
        with self._lock:
            left, self._reqs = list(self._reqs.values()), {}
            self._waiting = self._running = 0  # the child's last report no longer holds
        now = time.perf_counter()
        for req in left:
            req.finish_reason, req.t_done = "error", now
            req.sink(Event(req.index, "", "error", len(req.prompt), len(req.tokens), error))


def _engine_process_main(argv: list[str]) -> None:
    """The child side of `EngineProcess` (argv: run_dir device max_batch max_queue fd_in
    fd_out prefix_cache_bytes prefill_chunk): load the run, run an `Engine`, relay its events."""
    from scratchlm.checkpoint import load_run

    run_dir, device = argv[0], argv[1]
    max_batch, max_queue, fd_in, fd_out = (int(a) for a in argv[2:6])
    commands, results = Connection(fd_in, writable=False), Connection(fd_out, readable=False)

    # Ctrl-C reaches the whole process group; the parent decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        prefix_cache_bytes, prefill_chunk = (None if a == "None" else int(a) for a in argv[6:8])
        model, tokenizer, _ = load_run(run_dir, device=device)
        threads = pick_threads(model)
        engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                        prefix_cache_bytes=prefix_cache_bytes, prefill_chunk=prefill_chunk)
    except Exception as e:  # noqa: BLE001 - the parent shows it as a one-line error
        msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        results.send_bytes(pickle.dumps(("failed", msg)))
        return
    relay = _Relay(engine, results)
    live: dict[int, Request] = {}  # running or waiting, for "cancel"
    engine.on_step = relay.flush
    engine.start()
    relay.send(("ready", threads))
    try:
        while True:
            try:
                msg = pickle.loads(commands.recv_bytes())
            except (EOFError, OSError):  # the parent went away
                break
            if msg[0] == "stop":
                break
            if msg[0] == "submit":
                ids = [rid for rid, _, _ in msg[1]]
                reqs = engine.submit([p for _, p, _ in msg[1]], [gp for _, _, gp in msg[1]],
                                     relay.sink_for(ids, live))
                for rid, req in zip(ids, reqs):
                    live[rid] = req
                    if req.done:  # finished before it was recorded
                        live.pop(rid, None)
            elif msg[0] == "cancel" and msg[1] in live:
                engine.cancel(live[msg[1]])
            relay.flush(force=True)
    finally:
        engine.stop()
        try:
            relay.flush(force=True)
        except OSError:
            pass


RELAY_INTERVAL = 0.005
"""Seconds: the child sends the parent at most one message per this interval (a first token
or a last event goes at once). One message per step cost the tiny model's single stream ~35%
of its speed on the 2-core CPU (the wake-ups of two processes per token); streams send a chunk
every 20-40 ms anyway."""


class _Relay:
    """The child's outbox: events gathered on the engine thread, sent as one message."""

    def __init__(self, engine: Engine, conn: Connection) -> None:
        self.engine, self.conn = engine, conn
        self.lock = threading.Lock()
        self.outbox: list[tuple] = []
        self.urgent = False
        self.started: set[int] = set()  # ids that have had an event
        self.sent_stats: tuple = ()
        self.last = 0.0

    def send(self, msg: tuple) -> None:
        self.conn.send_bytes(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))

    def sink_for(self, ids: list[int], live: dict[int, Request]) -> Callable[[Event], None]:
        """The sink of a submitted group whose parent-side ids are `ids`."""
        def sink(ev: Event) -> None:
            rid = ids[ev.index]
            with self.lock:
                self.outbox.append((rid, ev.text, ev.finish_reason, ev.prompt_tokens,
                                    ev.completion_tokens, ev.error, ev.ids, ev.logprobs,
                                    ev.prompt_logprobs, ev.cached_tokens))
                if rid not in self.started or ev.finish_reason is not None:
                    self.urgent = True
                    self.started.add(rid)
                if ev.finish_reason is not None:
                    self.started.discard(rid)
                    live.pop(rid, None)
        return sink

    def flush(self, force: bool = False) -> None:
        """Send what is waiting, if it is due (engine thread after each step; main thread,
        forced, after each command)."""
        e = self.engine
        with self.lock:
            now = time.perf_counter()
            if not (force or self.urgent or now - self.last >= RELAY_INTERVAL):
                return
            stats = (e.queue_depth, e.running, e.prompt_tokens_total, e.cached_tokens_total,
                     e.generation_tokens_total, e.steps_total)
            if self.outbox or stats != self.sent_stats:
                self.send(("events", self.outbox, stats))
                self.outbox, self.sent_stats, self.last = [], stats, now
            self.urgent = False
