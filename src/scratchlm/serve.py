"""An OpenAI-compatible HTTP server with continuous batching, and a web playground.

Driven by `scratchlm serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--max-batch N]
[--max-queue N] [--api-key KEY]`, which calls `serve()`; tests and embedders use
`create_app()`. Endpoints:

| method, path               | what                                                          |
|----------------------------|---------------------------------------------------------------|
| GET  /                     | the playground (static/index.html; no build step, no CDN)     |
| GET  /health               | liveness, model name, running and waiting requests            |
| GET  /v1/models            | the one served model                                          |
| POST /v1/completions       | text completion; `stream: true` for server-sent events        |
| POST /v1/chat/completions  | chat, rendered with `api.render_chat`; `stream: true` too      |
| GET  /metrics              | Prometheus text: requests, tokens, queue depth, latencies     |

All generation goes through `scratchlm.engine.Engine` (continuous batching over
`generate.sample_next_token`), which `serve` runs in a child process (`EngineProcess`).
Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for bad
input, 401 for a missing or wrong API key, 413 for a body over `MAX_BODY_BYTES`, 429 when the
queue is full, 503 when the engine is not running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from scratchlm.errors import UserError

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as e:  # the server is an optional extra
    raise UserError(f"serving needs FastAPI and uvicorn ({e.name} is missing): "
                    "pip install 'scratchlm[serve]'") from None

from scratchlm.api import (
    CHAT_STOP,
    APIError,
    CountRequests,
    Metrics,
    ParsedRequest,
    bad_request,
    chat_logprobs,
    chat_text,
    completion_logprobs,
    logit_bias_param,
    logprobs_param,
    number_param,
    reject_unsupported,
    stop_list,
)
from scratchlm.engine import Engine, EngineClosed, EventStream, GenerationParams, QueueFull
from scratchlm.engine_process import EngineProcess
from scratchlm.generate import SamplingConfig

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
STREAM_INTERVAL = 0.02
"""Seconds: a stream sends at most one chunk per interval per request, holding the tokens that
arrive meanwhile for the next chunk. The first chunk is never delayed. Fewer, larger writes
leave more CPU to decoding when many clients stream (set SCRATCHLM_STREAM_INTERVAL=0 for one
chunk per token)."""
MAX_CHUNKS_PER_S = 200
"""Server-wide budget of streamed chunks per second: with more open streams than
MAX_CHUNKS_PER_S * interval, each stream's interval grows so the total stays within it. A chunk
costs ~0.75 ms of server CPU on the 2-core Ice Lake (Starlette write, generator resume, JSON),
so at 8 streams x 50 chunks/s the writes alone took a third of the CPU the engine needed."""
MAX_STREAM_INTERVAL = 0.25
"""However many streams are open, each gets a chunk at least this often (seconds), unless
SCRATCHLM_STREAM_INTERVAL asks for a longer interval."""


MAX_BODY_BYTES = 16 * 2**20
"""A request body past this many bytes is refused with a 413 before it is parsed: the prompts
of a full batch of these models' contexts take far less, and the body is held in memory."""


def stream_interval_for(base: float, open_streams: int) -> float:
    """The wait between one stream's chunks when `open_streams` streams share the budget."""
    if base <= 0:
        return 0.0  # one chunk per token, as asked
    return min(max(base, open_streams / MAX_CHUNKS_PER_S), max(base, MAX_STREAM_INTERVAL))

# --- the app ---------------------------------------------------------------------------------


class _Server:
    """What the endpoints share: the engine, the tokenizer, the model's name and limits."""

    def __init__(self, engine: Engine | EngineProcess, tokenizer, model_name: str, api_key: str | None,
                 created: int) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.api_key, self.created = api_key, created
        self.context_length = engine.context_length
        # Every token covers at most this many bytes (hence characters) of text, so a longer
        # text than context_length * max_token_bytes cannot fit and need not be tokenized. Not
        # for a tokenizer that normalizes text first (an imported one may: NFC merges characters).
        self.max_token_bytes = (max(1, int(tokenizer.token_bytes().max()))
                                if tokenizer.hf.normalizer is None else None)
        self.metrics = Metrics(engine)
        self.stream_interval = 0.0

    # -- checks --

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                     self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header "
                           "'Authorization: Bearer <key>' with the server's --api-key",
                           "invalid_request_error", None, "invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        too_large = APIError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB",
                             "invalid_request_error", None, "request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_large
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > MAX_BODY_BYTES:
                    raise too_large
        except ClientDisconnect:
            raise bad_request("the client disconnected before the request body arrived", None,
                              "client_disconnected") from None
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:  # ValueError: also a >4300-digit integer
            raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        except RecursionError:
            raise bad_request("the request body is nested too deeply", None, "invalid_json") from None
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_json")
        model = data.get("model")
        if model is not None and model != self.model_name:
            raise bad_request(f"model {model!r} does not exist; this server serves {self.model_name!r} "
                       "(see GET /v1/models)", "model", "model_not_found")
        return data

    def valid_ids(self, ids: list) -> bool:
        """Every item a token id of this tokenizer (JSON booleans are not ids)."""
        return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.tokenizer.vocab_size
                   for t in ids)

    async def encode(self, text: str, param: str, prompt: bool = True) -> list[int]:
        """Token ids of a text, tokenized in a worker thread so that a long text does not hold
        up the event loop (HF tokenizers let go of the interpreter lock). A `prompt` that
        cannot fit the context is refused untokenized."""
        if prompt and self.max_token_bytes and len(text) > self.context_length * self.max_token_bytes:
            raise bad_request(f"'{param}' is at least {-(-len(text) // self.max_token_bytes)} tokens, "
                              f"but this model's context is {self.context_length} tokens",
                              param, "context_length_exceeded")
        try:
            return await run_in_threadpool(self.tokenizer.encode, text)
        except UserError as e:  # e.g. a character the char tokenizer never saw
            raise bad_request(f"cannot tokenize '{param}': {e}", param) from None

    def check_count(self, sequences: int, param: str) -> None:
        capacity = self.engine.max_batch + self.engine.max_queue
        if sequences > capacity:
            raise bad_request(f"{sequences} sequences (prompts x n) exceed the server's capacity of "
                              f"{capacity}", param)

    def parse(self, data: dict, prompts: list[list[int]], prompt_param: str, default_max: int | None,
              extra_stop: list[str], prompt_texts: list[str]) -> ParsedRequest:
        chat = prompt_param == "messages"
        reject_unsupported(data, chat=chat)
        logprobs = logprobs_param(data, chat)
        for p in prompts:
            if not p:
                raise bad_request(f"'{prompt_param}' is empty: give at least one token of text", prompt_param)
            if len(p) >= self.context_length:
                raise bad_request(f"the prompt is {len(p)} tokens, but this model's context is "
                           f"{self.context_length} tokens (and at least one new token must fit)",
                           prompt_param, "context_length_exceeded")
        max_tokens = data.get("max_tokens")
        if max_tokens is None:
            max_tokens = data.get("max_completion_tokens")
        longest = max(len(p) for p in prompts)
        if max_tokens is None:
            max_tokens = self.context_length - longest if default_max is None else default_max
            max_tokens = min(max_tokens, self.context_length - longest)
        max_tokens = number_param({"max_tokens": max_tokens}, "max_tokens", None, 1, 1e12, integer=True)
        if longest + max_tokens > self.context_length:
            raise bad_request(f"this model's context is {self.context_length} tokens, but the request asks "
                       f"for {longest + max_tokens} ({longest} in the prompt, {max_tokens} in the "
                       "completion); shorten the prompt or lower max_tokens", "max_tokens",
                       "context_length_exceeded")
        temperature = number_param(data, "temperature", 1.0, 0.0, 2.0)
        top_p = number_param(data, "top_p", None, 0.0, 1.0, lo_open=True)
        top_k = number_param(data, "top_k", None, -1, self.tokenizer.vocab_size, integer=True)
        min_p = number_param(data, "min_p", None, 0.0, 1.0)
        rep = number_param(data, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)
        presence = number_param(data, "presence_penalty", 0.0, -2.0, 2.0)
        frequency = number_param(data, "frequency_penalty", 0.0, -2.0, 2.0)
        n = number_param(data, "n", 1, 1, self.engine.max_batch, integer=True)
        seed = number_param(data, "seed", None, -(2**63), 2**63 - 1, integer=True)
        stream = data.get("stream", False) or False
        if not isinstance(stream, bool):
            raise bad_request("'stream' must be true or false", "stream")
        opts = data.get("stream_options")
        if opts is not None and not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
        opts = opts or {}
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise bad_request("'stream_options' must be an object like {\"include_usage\": true}",
                              "stream_options")
        echo = data.get("echo", False) or False
        ignore_eos = data.get("ignore_eos", False) or False
        for name, flag in (("echo", echo), ("ignore_eos", ignore_eos)):
            if not isinstance(flag, bool):
                raise bad_request(f"'{name}' must be true or false", name)
        sampling = SamplingConfig(temperature=float(temperature),
                                  top_k=top_k if top_k and top_k > 0 else None,  # 0 or -1: off
                                  top_p=top_p, min_p=min_p, repetition_penalty=float(rep),
                                  presence_penalty=float(presence), frequency_penalty=float(frequency),
                                  logit_bias=logit_bias_param(data, self.tokenizer.vocab_size))
        stop = stop_list(data) + extra_stop
        params, expanded, texts = [], [], []
        for p, text in zip(prompts, prompt_texts):
            for j in range(n):
                params.append(GenerationParams(max_tokens=max_tokens, sampling=sampling, stop=stop,
                                               seed=None if seed is None else seed + j,
                                               ignore_eos=ignore_eos, logprobs=logprobs,
                                               prompt_logprobs=echo and not chat and logprobs is not None))
                expanded.append(p)
                texts.append(text)
        self.check_count(len(expanded), "n")
        return ParsedRequest(expanded, params, n, stream, bool(opts.get("include_usage")), texts, echo,
                             logprobs)

    def start(self, parsed: ParsedRequest) -> EventStream:
        try:
            return EventStream(self.engine, parsed.prompts, parsed.params)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", None, "queue_full") from None
        except EngineClosed as e:
            raise APIError(503, str(e), "server_error", None, "engine_unavailable") from None


def create_app(run_dir: str | Path, max_batch: int = 8, api_key: str | None = None,
               max_queue: int = 64, *, model_name: str | None = None, device: str = "cpu",
               stream_interval: float | None = None, engine: str = "process",
               prefix_cache_mb: float | None = None, prefill_chunk: int | None = None) -> FastAPI:
    """Load RUN_DIR and build the app; the engine runs until the app's shutdown.

    Args:
        run_dir: a scratchlm run directory (`load_run`).
        max_batch: slots of the continuous batch.
        api_key: when set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <api_key>`.
        max_queue: requests that may wait for a slot before the server answers 429.
        model_name: the id clients pass as `model` (default: the run directory's name).
        stream_interval: see `STREAM_INTERVAL` (default: $SCRATCHLM_STREAM_INTERVAL or that).
        engine: "process" (what `serve` runs): the model lives in a child process
            (`EngineProcess`, which says why), started here so that a run that cannot load
            fails now; "thread": an `Engine` thread in this process, started with the app
            (tests reach its model through `app.state.server.engine.model`).
        prefix_cache_mb: memory for finished requests' keys and values, which later prompts
            that start with the same tokens reuse (`prefix_cache.PrefixCache`); None: as much as the
            KV cache, 0: none.
        prefill_chunk: prompt tokens prefilled per engine step (default `engine.PREFILL_CHUNK`).

    Example:
        >>> app = create_app("runs/demo/run")          # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    from scratchlm.checkpoint import load_run
    from scratchlm.tokenizer import Tokenizer

    if engine not in ("process", "thread"):
        raise ValueError(f"engine must be 'process' or 'thread', got {engine!r}")
    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}")
    if max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {max_queue}")
    if prefix_cache_mb is not None and not 0 <= prefix_cache_mb < float("inf"):
        raise UserError(f"--prefix-cache-mb must be a number >= 0, got {prefix_cache_mb}")
    prefix_bytes = None if prefix_cache_mb is None else int(prefix_cache_mb * 2**20)
    if prefill_chunk is not None and prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty; give a key or leave the option out")
    run_dir = Path(run_dir)
    if stream_interval is None:
        raw = os.environ.get("SCRATCHLM_STREAM_INTERVAL", str(STREAM_INTERVAL))
        try:
            stream_interval = float(raw)
        except ValueError:
            raise UserError(f"SCRATCHLM_STREAM_INTERVAL must be a number of seconds, got {raw!r}") from None
    if not 0 <= stream_interval <= 1:
        raise UserError(f"the stream interval must be in [0, 1] seconds, got {stream_interval}")
    if engine == "process":
        eng: Engine | EngineProcess = EngineProcess(run_dir, max_batch, max_queue, device,
                                                    prefix_cache_bytes=prefix_bytes,
                                                    prefill_chunk=prefill_chunk).start()
        tokenizer = Tokenizer.load(run_dir / "tokenizer.json")  # the child has checked the run
    else:
        model, tokenizer, _ = load_run(run_dir, device=device)
        eng = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                     prefix_cache_bytes=prefix_bytes, prefill_chunk=prefill_chunk)
    name = model_name or run_dir.resolve().name
    created = int((run_dir / "config.json").stat().st_mtime)
    srv = _Server(eng, tokenizer, name, api_key, created)
    srv.stream_interval = stream_interval

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng.start()
        try:
            yield
        finally:
            eng.stop()

    app = FastAPI(title="scratchlm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv
    app.add_middleware(CountRequests, metrics=srv.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), "invalid_request_error", None,
                       "not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = eng.alive
        body = {"status": "ok" if alive else "unavailable", "model": name,
                "context_length": srv.context_length, "running": eng.running,
                "waiting": eng.queue_depth, "max_batch": eng.max_batch,
                "auth": api_key is not None}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(srv.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        srv.check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": srv.created, "owned_by": "scratchlm",
             "max_model_len": srv.context_length}]})

    @app.post("/v1/completions")
    async def completions(request: Request):
        srv.check_auth(request)
        data = await srv.read_json(request)
        raw = data.get("prompt")
        if isinstance(raw, str):
            raw = [raw]
        if isinstance(raw, list) and raw and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            raw = [raw]  # one prompt given as token ids
        if not isinstance(raw, list) or not raw or not all(isinstance(p, (str, list)) for p in raw):
            raise bad_request("'prompt' must be a string, a list of strings, or token ids", "prompt")
        srv.check_count(len(raw), "prompt")  # before tokenizing any of them
        prompts, texts = [], []
        for p in raw:
            if isinstance(p, str):
                prompts.append(await srv.encode(p, "prompt"))
                texts.append(p)
            else:
                if not srv.valid_ids(p):
                    raise bad_request("token-id prompts must hold ids in [0, vocab_size)", "prompt")
                prompts.append(list(p))
                # As echo shows it: without special tokens, which also take no room in text_offset.
                texts.append(srv.tokenizer.decode(p, skip_special_tokens=True))
        parsed = srv.parse(data, prompts, "prompt", default_max=16, extra_stop=[], prompt_texts=texts)
        return await _respond(srv, request, parsed, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        srv.check_auth(request)
        data = await srv.read_json(request)
        text = chat_text(data)
        parsed = srv.parse(data, [await srv.encode(text, "messages")], "messages", default_max=None,
                           extra_stop=[CHAT_STOP], prompt_texts=[text])
        return await _respond(srv, request, parsed, chat=True)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        """vLLM's extension: the ids of a `prompt` (or of `messages` through the chat template)
        and how many, to check a prompt against the context before sending it."""
        srv.check_auth(request)
        data = await srv.read_json(request)
        if "messages" in data:  # counted whatever their length: that is what this is for
            ids = await srv.encode(chat_text(data), "messages", prompt=False)
        elif isinstance(data.get("prompt"), str):
            ids = await srv.encode(data["prompt"], "prompt", prompt=False)
        else:
            raise bad_request("give a 'prompt' string or chat 'messages'", "prompt")
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": srv.context_length})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        """vLLM's extension: the text of token ids (special tokens by their names)."""
        srv.check_auth(request)
        data = await srv.read_json(request)
        ids = data.get("tokens")
        if not isinstance(ids, list) or not srv.valid_ids(ids):
            raise bad_request(f"'tokens' must be a list of token ids in 0..{srv.tokenizer.vocab_size - 1}",
                              "tokens")
        return JSONResponse({"prompt": srv.tokenizer.decode(ids)})

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        err = APIError(500, f"internal server error: {type(exc).__name__}", "server_error")
        return JSONResponse(err.body(), status_code=500)

    return app


# --- responses -------------------------------------------------------------------------------


async def _respond(srv: _Server, request: Request, parsed: ParsedRequest, chat: bool):
    t0 = time.perf_counter()
    stream = srv.start(parsed)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if parsed.stream:
        return StreamingResponse(
            _sse(srv, stream, parsed, chat, rid, created, t0), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(srv, request, stream, parsed, chat, rid, created, t0)


def _finish_metrics(srv: _Server, stream: EventStream, t0: float) -> None:
    srv.metrics.latency.observe(time.perf_counter() - t0)
    for req in stream.requests:
        srv.metrics.observe_sequence(req)


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(srv, request, stream: EventStream, parsed: ParsedRequest, chat: bool, rid: str,
                    created: int, t0: float):
    """Non-streaming: gather every choice; a client that leaves cancels its sequences."""
    k = len(parsed.prompts)
    texts, reasons = [""] * k, [None] * k
    ids: list[list[int]] = [[] for _ in range(k)]
    entries: list[list] = [[] for _ in range(k)]
    prompt_tokens = completion_tokens = cached_tokens = 0
    error = None

    async def collect() -> None:
        nonlocal prompt_tokens, completion_tokens, cached_tokens, error
        while not stream.finished:
            for ev in await stream.next_batch():
                texts[ev.index] += ev.text
                if ev.prompt_logprobs is not None:  # echo: the prompt's tokens come first
                    ids[ev.index] += parsed.prompts[ev.index]
                    entries[ev.index] += ev.prompt_logprobs
                ids[ev.index] += ev.ids
                entries[ev.index] += ev.logprobs
                if ev.finish_reason is not None:
                    reasons[ev.index] = ev.finish_reason
                    completion_tokens += ev.completion_tokens
                    if ev.index % parsed.n == 0:  # n copies of one prompt count it once
                        prompt_tokens += ev.prompt_tokens
                        cached_tokens += ev.cached_tokens
                    error = error or ev.error

    collector = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collector.done():
            collector.cancel()
        if not stream.finished:
            stream.cancel()
    if not collector.done() or collector.cancelled():
        return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
    collector.result()
    _finish_metrics(srv, stream, t0)
    if error:
        raise APIError(500, error, "server_error")
    usage = _usage(prompt_tokens, completion_tokens, cached_tokens)
    choices = []
    for i in range(k):
        logprobs = None
        if parsed.logprobs is not None:
            logprobs = (chat_logprobs(srv.tokenizer, ids[i], entries[i]) if chat
                        else completion_logprobs(srv.tokenizer, ids[i], entries[i])[0])
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i].lstrip()},
                            "logprobs": logprobs, "finish_reason": reasons[i]})
        else:
            text = parsed.prompt_texts[i] + texts[i] if parsed.echo else texts[i]
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reasons[i]})
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": created, "model": srv.model_name, "choices": choices,
                         "usage": usage})


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _sse_line(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _sse(srv: _Server, stream: EventStream, parsed: ParsedRequest, chat: bool, rid: str,
               created: int, t0: float) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's format, ending with `data: [DONE]`. Starlette cancels
    this generator when the client disconnects; `finally` then frees the slots."""
    k = len(parsed.prompts)
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": srv.model_name}
    started = [False] * k  # chat: leading whitespace of the reply is dropped until text starts
    offsets = [0] * k  # completions with logprobs: where the next token's text starts
    prompt_tokens = completion_tokens = cached_tokens = 0
    # With echo and logprobs, the prompt's text waits for its log-probabilities (first event).
    echo_now = parsed.echo and parsed.logprobs is None

    def chunk(i: int, text: str | None, reason: str | None, ids=(), entries=()) -> dict:
        logprobs = None
        if parsed.logprobs is not None and entries:
            if chat:
                logprobs = chat_logprobs(srv.tokenizer, list(ids), list(entries))
            else:
                logprobs, offsets[i] = completion_logprobs(srv.tokenizer, list(ids), list(entries), offsets[i])
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        return {**base, "choices": [choice]}

    srv.metrics.open_streams += 1
    try:
        for i in range(k):
            if chat:
                role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}
                yield _sse_line({**base, "choices": [role]})
            elif echo_now:
                yield _sse_line(chunk(i, parsed.prompt_texts[i], None))
        last_send = 0.0
        while not stream.finished:
            interval = stream_interval_for(srv.stream_interval, srv.metrics.open_streams)
            wait = interval - (time.perf_counter() - last_send)
            if wait > 0:  # gather this much output into one chunk (fewer, larger writes)
                await stream.hold(wait)
            events = await stream.next_batch()
            last_send = time.perf_counter()
            pieces: dict[int, list] = {}  # index -> [text, finish_reason, ids, logprobs]
            for ev in events:
                if ev.error:  # then [DONE], as vLLM does, so a client's loop ends as usual
                    yield _sse_line(APIError(500, ev.error, "server_error").body()) + b"data: [DONE]\n\n"
                    return
                piece = pieces.setdefault(ev.index, ["", None, [], []])
                if ev.prompt_logprobs is not None and parsed.echo:
                    piece[0] += parsed.prompt_texts[ev.index]
                    piece[2] += parsed.prompts[ev.index]
                    piece[3] += ev.prompt_logprobs
                piece[0] += ev.text
                piece[2] += ev.ids
                piece[3] += ev.logprobs
                if ev.finish_reason is not None:
                    piece[1] = ev.finish_reason
                    completion_tokens += ev.completion_tokens
                    if ev.index % parsed.n == 0:
                        prompt_tokens += ev.prompt_tokens
                        cached_tokens += ev.cached_tokens
            out = []
            for i, (text, reason, ids, entries) in pieces.items():
                if chat and not started[i]:
                    text = text.lstrip()
                    started[i] = bool(text)
                if text or entries:
                    out.append(_sse_line(chunk(i, text, None, ids, entries)))
                if reason is not None:
                    out.append(_sse_line(chunk(i, None, reason)))
            if out:
                yield b"".join(out)
        if parsed.include_usage:
            yield _sse_line({**base, "choices": [],
                             "usage": _usage(prompt_tokens, completion_tokens, cached_tokens)})
        yield b"data: [DONE]\n\n"
        _finish_metrics(srv, stream, t0)
    finally:
        srv.metrics.open_streams -= 1
        if not stream.finished:
            stream.cancel()


# --- the command -----------------------------------------------------------------------------

def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          api_key: str | None = None, max_queue: int = 64, prefix_cache_mb: float | None = None,
          prefill_chunk: int | None = None) -> None:
    """`scratchlm serve`: load the run and serve it until interrupted (Ctrl-C)."""
    sock = listen(host, port)  # first: a busy port fails before the model loads
    try:
        app = create_app(run_dir, max_batch=max_batch, api_key=api_key, max_queue=max_queue,
                         prefix_cache_mb=prefix_cache_mb, prefill_chunk=prefill_chunk)
    except BaseException:
        sock.close()
        raise
    srv: _Server = app.state.server
    threads = srv.engine.threads
    if host not in LOOPBACK_HOSTS:
        print(f"warning: binding to {host}: the server is reachable from other machines"
              + ("" if api_key else " and has no --api-key"), file=sys.stderr)
    print(f"serving {srv.model_name!r} (context {srv.context_length}, max batch {max_batch}, "
          f"{threads}) at {_url(host, sock)}/  - playground at /, OpenAI API at /v1", flush=True)
    _uvicorn(app).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or a one-line error saying why not."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host} port {port}: {e.strerror or e}; choose another "
                        "--port (or --host), or stop what is using it") from None
    return sock


def _uvicorn(app: FastAPI):
    """The uvicorn server for `app` (serve and running_server run it on their own socket)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))


def _url(host: str, sock: socket.socket) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{sock.getsockname()[1]}"


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                   timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn from a background thread (tests, notebooks, benchmarks);
    yields the base URL. port=0 picks a free port (bound here, so there is no race).

    Example:
        >>> with running_server(create_app("runs/demo/run")) as url:  # doctest: +SKIP
        ...     httpx.get(url + "/health").json()
    """
    sock = listen(host, port)
    server = _uvicorn(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="scratchlm-uvicorn")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield _url(host, sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
