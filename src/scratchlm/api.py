"""The OpenAI-compatible wire protocol of `scratchlm serve`: the chat template, OpenAI-shaped
errors, request validation helpers and the Prometheus metrics. `scratchlm.serve` builds the
FastAPI app from these; keeping them here leaves that module to routes and the event loop.
"""

from __future__ import annotations

import json
import math
from typing import Any

from scratchlm.engine import Engine, GenerationParams

# --- the chat template -----------------------------------------------------------------------

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"
"""Generation stops here: a base model would otherwise go on to write the user's next turn."""


def render_chat(messages: list[dict[str, str]]) -> str:
    """The chat template for base models: one line per message, then the assistant's cue.

    >>> render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    'System: Be brief.\\nUser: Hi\\nAssistant:'

    The reply is what the model writes after "Assistant:", up to the first "\\nUser:" (a stop
    string) or end-of-text, with its leading whitespace removed.
    """
    lines = [f"{CHAT_ROLES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


def chat_text(data: dict) -> str:
    """A chat request's `messages`, checked (a 400 names the message at fault), through the
    chat template: what /v1/chat/completions sends the engine."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in CHAT_ROLES:
            raise bad_request(f"messages[{i}] needs a 'role' of {', '.join(CHAT_ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if content is None and m["role"] == "assistant":  # as OpenAI allows (a tool-call turn)
            content = ""
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string", "messages")
        flat.append({"role": m["role"], "content": content})
    return render_chat(flat)


# --- errors ----------------------------------------------------------------------------------


class APIError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# --- metrics ---------------------------------------------------------------------------------


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count), rendered as text."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for le, n in zip(self.buckets, self.counts):
            out.append(f'{self.name}_bucket{{le="{le:g}"}} {n}')
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.count}',
                f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return out


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters and histograms of the API (updated on the event loop; no locks needed)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.requests: dict[tuple[str, int], int] = {}
        self.open_streams = 0  # streaming responses in progress; they share the chunk budget
        self.latency = Histogram("scratchlm_request_latency_seconds",
                                 "Time from receiving a generation request to its last token.",
                                 LATENCY_BUCKETS)
        self.ttft = Histogram("scratchlm_time_to_first_token_seconds",
                              "Time from queueing a sequence to its first new token.", LATENCY_BUCKETS)
        self.tpot = Histogram("scratchlm_time_per_output_token_seconds",
                              "Mean time between a sequence's new tokens after the first.",
                              (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))

    def count_request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def observe_sequence(self, req) -> None:
        """Timings of one finished engine request."""
        if req.t_first_token is None:
            return
        self.ttft.observe(req.t_first_token - req.t_submit)
        if req.t_done is not None and len(req.tokens) > 1:
            self.tpot.observe((req.t_done - req.t_first_token) / (len(req.tokens) - 1))

    def render(self) -> str:
        e = self.engine
        out = ["# HELP scratchlm_requests_total HTTP API requests by endpoint and status code.",
               "# TYPE scratchlm_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            out.append(f'scratchlm_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        for name, kind, help, value in (
            ("scratchlm_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
             e.prompt_tokens_total),
            ("scratchlm_prompt_tokens_cached_total", "counter",
             "Prompt tokens whose keys and values came from the prefix cache.", e.cached_tokens_total),
            ("scratchlm_generation_tokens_total", "counter", "New tokens generated.",
             e.generation_tokens_total),
            ("scratchlm_decode_steps_total", "counter", "Batched decode steps run.", e.steps_total),
            ("scratchlm_queue_depth", "gauge", "Requests waiting for a slot.", e.queue_depth),
            ("scratchlm_running_requests", "gauge", "Requests holding a slot.", e.running),
            ("scratchlm_max_batch", "gauge", "Slots (sequences decoded together).", e.max_batch),
            ("scratchlm_max_queue", "gauge", "Waiting requests allowed before 429.", e.max_queue),
            ("scratchlm_open_streams", "gauge", "Streaming responses in progress.", self.open_streams),
        ):
            out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]
        for h in (self.latency, self.ttft, self.tpot):
            out += h.render()
        return "\n".join(out) + "\n"


API_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


class CountRequests:
    """ASGI middleware: count API responses (`API_ENDPOINTS` and any other /v1 path) by
    endpoint and status, streams included. Any other /v1 path counts as "other": a label made
    of what a client typed could break the exposition format and would grow without limit. An
    unhandled error counts as a 500 (its response is sent outside this middleware)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1/") or path in API_ENDPOINTS):
            await self.app(scope, receive, send)
            return
        label = path if path in API_ENDPOINTS else "other"
        started = False

        async def counting_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.count_request(label, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.metrics.count_request(label, 500)
            raise


# --- request validation ----------------------------------------------------------------------


def number_param(data: dict, name: str, default, lo: float, hi: float, integer: bool = False,
            lo_open: bool = False):
    value = data.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad_request(f"'{name}' must be {kind}, got {json.dumps(value)}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_request(f"'{name}' must be finite, got {value}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise bad_request(f"'{name}' must be {low} and <= {hi:g}, got {value}", name)
    return value


def logit_bias_param(data: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: {"token id": bias in [-100, 100]} -> sorted (id, bias) pairs."""
    raw = data.get("logit_bias")
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise bad_request("'logit_bias' must be an object of {\"token id\": bias}", "logit_bias")
    out = {}
    for key, bias in raw.items():
        # isdigit() alone admits "²" and numbers too long for int(): ASCII, and short.
        tok = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 12 else -1
        if not 0 <= tok < vocab_size:
            raise bad_request(f"'logit_bias' key {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
        out[tok] = number_param({"logit_bias": bias}, "logit_bias", 0.0, -100.0, 100.0)
    return tuple(sorted((tok, float(b)) for tok, b in out.items()))


def stop_list(data: dict) -> list[str]:
    stop = data.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(stop) > 4:
        raise bad_request(f"'stop' takes at most 4 strings, got {len(stop)}", "stop")
    return [s for s in stop if s]


def reject_unsupported(data: dict, chat: bool) -> None:
    """Fields we do not implement: refuse clearly rather than silently ignore."""
    if chat:
        for name in ("tools", "functions", "tool_choice", "function_call"):
            if data.get(name):
                raise bad_request(f"'{name}' is not supported: this is a base model without tool calling", name)
        fmt = data.get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format")
    else:
        if data.get("suffix"):
            raise bad_request("'suffix' (insertion) is not supported", "suffix")
        if data.get("best_of") not in (None, 1) and data.get("best_of") != data.get("n", 1):
            raise bad_request("'best_of' other than n is not supported", "best_of")


MAX_LOGPROBS = 20
"""The most alternatives per token a request may ask for (vLLM's default limit)."""


def logprobs_param(data: dict, chat: bool) -> int | None:
    """How many alternatives per token a request wants, None for no log-probabilities.
    Completions: `logprobs` = 0..20; chat: `logprobs: true`, with `top_logprobs` = 0..20."""
    if not chat:
        return None if data.get("logprobs") is False else number_param(
            data, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    want = data.get("logprobs")
    if want not in (None, True, False):
        raise bad_request("'logprobs' must be true or false", "logprobs")
    top = number_param(data, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
    if top is not None and not want:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if want else None


def _scored_ids(tokenizer, ids: list[int], entries: list) -> list[int]:
    """The ids that `entries` score: one more entry than ids is a last end-of-text's."""
    return [*ids, tokenizer.eot_id] if len(entries) == len(ids) + 1 else ids


def completion_logprobs(tokenizer, ids: list[int], entries: list, offset: int = 0) -> tuple[dict, int]:
    """The completions API's `logprobs` object for these ids, and the offset after them: each
    token's text, logprob (None for a prompt's first token), a {text: logprob} of the most
    likely ones (the chosen token always among them, as OpenAI and vLLM do) and its offset in
    the text, counted as vLLM does (the running length of the tokens' texts; a special token,
    which the text leaves out, takes no room)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, entry in zip(_scored_ids(tokenizer, ids, entries), entries, strict=True):
        text = tokenizer.decode([tid])
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(tokenizer.decode([tid], skip_special_tokens=True))
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry[0])
        top = {tokenizer.decode([i]): v for i, v in entry[1]}
        top.setdefault(text, entry[0])
        out["top_logprobs"].append(top)
    return out, offset


def chat_logprobs(tokenizer, ids: list[int], entries: list) -> dict:
    """The chat API's `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]};
    `bytes` are the token's own, also when it is part of a character (its text then shows
    U+FFFD), so a client can join them into the text."""
    def item(tid: int, logprob: float) -> dict:
        return {"token": tokenizer.decode([tid]), "logprob": logprob, "bytes": list(tokenizer.bytes_of(tid))}

    return {"content": [{**item(tid, entry[0]), "top_logprobs": [item(i, v) for i, v in entry[1]]}
                        for tid, entry in zip(_scored_ids(tokenizer, ids, entries), entries, strict=True)]}


class ParsedRequest:
    """A validated generation request."""

    def __init__(self, prompts: list[list[int]], params: list[GenerationParams], n: int,
                 stream: bool, include_usage: bool, prompt_texts: list[str], echo: bool,
                 logprobs: int | None = None) -> None:
        self.prompts, self.params, self.n = prompts, params, n
        self.stream, self.include_usage = stream, include_usage
        self.prompt_texts, self.echo = prompt_texts, echo
        self.logprobs = logprobs  # alternatives per token; None: no log-probabilities
