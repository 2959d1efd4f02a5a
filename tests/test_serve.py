"""The HTTP server (scratchlm.serve): a real uvicorn server on a loopback port, driven by the
official `openai` client and by httpx for the error cases."""

from __future__ import annotations

import inspect
import json
import re
import time

import httpx
import pytest
import torch

from scratchlm.checkpoint import write_run
from scratchlm.config import ModelConfig, RunConfig
from scratchlm.generate import SamplingConfig, generate_text
from scratchlm.model import Transformer
from scratchlm.api import CHAT_STOP, render_chat
from scratchlm.serve import (
    MAX_CHUNKS_PER_S, MAX_STREAM_INTERVAL, create_app, running_server, serve, stream_interval_for,
)
from scratchlm.tokenizer import train_char

openai = pytest.importorskip("openai")

TEXT = ("The quick brown fox jumps over the lazy dog. 0123456789\nHello, World! "
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ?:;'\"-_()[]{}<>/\\|@#$%^&*+=~`")
CONTEXT = 256
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory: char tokenizer + untrained 2-layer, width-32 model (wide init so the
    output depends on the prompt)."""
    d = tmp_path_factory.mktemp("run") / "tiny-run"
    tok = train_char([TEXT])
    tok_path = d.parent / "tokenizer.json"
    tok.save(tok_path)
    cfg = RunConfig(model=ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=32,
                                      context_length=CONTEXT))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "emb" in name else 0.15)
    write_run(d, model, cfg, tok_path)
    return d


@pytest.fixture(scope="module")
def server(run_dir):
    with running_server(create_app(run_dir, max_batch=4, max_queue=4)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def wide_run(run_dir):
    """The same tokenizer with a wider model (4 layers, width 384, ~7M parameters): a few ms
    a decode step on one thread, so a long generation in the engine process takes ~1 s."""
    d = run_dir.parent / "wide-run"
    cfg = RunConfig(model=ModelConfig(vocab_size=train_char([TEXT]).vocab_size, n_layer=4, n_head=6,
                                      d_model=384, context_length=CONTEXT))
    torch.manual_seed(0)
    write_run(d, Transformer(cfg.model), cfg, run_dir.parent / "tokenizer.json")
    return d


@pytest.fixture(scope="module", params=["process", "thread"])
def one_slot(request, run_dir, wide_run):
    """One slot, no waiting room: the second concurrent request is refused. A long generation
    must surely still be running when the test acts: the engine process (what `serve` runs)
    serves the wider model; the engine thread's model is slowed to >= 5 ms a step."""
    if request.param == "process":
        app = create_app(wide_run, max_batch=1, max_queue=0)
    else:
        app = create_app(run_dir, max_batch=1, max_queue=0, engine="thread")
        model = app.state.server.engine.model
        fast = model.forward

        def slow_forward(*args, **kwargs):
            time.sleep(0.005)
            return fast(*args, **kwargs)

        model.forward = slow_forward
    with running_server(app) as url:
        yield url


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# --- the openai client ---------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-run"]
    h = httpx.get(server + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny-run" and h["context_length"] == CONTEXT


def test_openai_penalties_equal_generate_text(client, run_dir):
    from scratchlm.checkpoint import load_run

    model, tok, _ = load_run(run_dir)
    sampling = SamplingConfig(temperature=0, presence_penalty=0.4, frequency_penalty=1.2)
    want = generate_text(model, tok, ["Hello"], 24, sampling)[0]
    assert want.text != generate_text(model, tok, ["Hello"], 24, SamplingConfig(temperature=0))[0].text
    r = client.completions.create(model="tiny-run", prompt="Hello", max_tokens=24, temperature=0,
                                  presence_penalty=0.4, frequency_penalty=1.2)
    assert r.choices[0].text == want.text


def test_logit_bias_bans_a_token(client, run_dir):
    """Banning the token greedy decoding picks first changes the text, exactly as the same
    bias does in generate_text; the banned token never appears."""
    from scratchlm.checkpoint import load_run

    model, tok, _ = load_run(run_dir)
    plain = generate_text(model, tok, ["Hello"], 24, SamplingConfig(temperature=0))[0]
    banned = plain.tokens[0]
    sampling = SamplingConfig(temperature=0, logit_bias=((banned, -100.0),))
    want = generate_text(model, tok, ["Hello"], 24, sampling)[0]
    r = client.completions.create(model="tiny-run", prompt="Hello", max_tokens=24, temperature=0,
                                  logit_bias={str(banned): -100})
    assert r.choices[0].text == want.text != plain.text
    assert tok.decode([banned]) not in r.choices[0].text


def test_completion_equals_generate_text(client, run_dir):
    from scratchlm.checkpoint import load_run

    model, tok, _ = load_run(run_dir)
    want = generate_text(model, tok, ["Hello"], 24, SamplingConfig(temperature=0))[0]
    r = client.completions.create(model="tiny-run", prompt="Hello", max_tokens=24, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == want.new_tokens
    parts, reasons = [], []
    for chunk in client.completions.create(model="tiny-run", prompt="Hello", max_tokens=24,
                                           temperature=0, stream=True):
        parts += [c.text for c in chunk.choices]
        reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
    assert "".join(parts) == want.text and reasons == [want.finish_reason]


def test_chat_non_streaming_and_streaming(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=20, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(render_chat(messages))  # char tokenizer: one id per char
    stream = client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_a_chats_next_turn_reuses_the_first_from_the_prefix_cache(server, client, run_dir):
    """The next turn of a chat resends the whole conversation: the tokens the first turn ran
    come from the prefix cache (OpenAI's usage.prompt_tokens_details.cached_tokens), and the
    reply is still what the model gives that prompt from scratch."""
    from scratchlm.checkpoint import load_run

    model, tok, _ = load_run(run_dir)
    before = _metric(server, "scratchlm_prompt_tokens_cached_total")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Foxes?"}]
    r1 = client.chat.completions.create(model="tiny-run", messages=messages, max_tokens=16, temperature=0)
    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "And dogs?"}]
    prompt = render_chat(messages)
    r2 = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=16, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert len(render_chat(messages[:2])) <= cached < len(prompt)
    want = generate_text(model, tok, [prompt], 16, SamplingConfig(temperature=0))[0]
    assert r2.choices[0].text == want.text
    chunks = list(client.completions.create(model="tiny-run", prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompt) - 1  # all but the last
    total = r1.usage.prompt_tokens_details.cached_tokens + cached + len(prompt) - 1
    assert _metric(server, "scratchlm_prompt_tokens_cached_total") - before == total


def test_prefix_cache_and_prefill_chunk_options(run_dir):
    from scratchlm.errors import UserError

    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--prefix-cache-mb"):
            create_app(run_dir, prefix_cache_mb=bad, engine="thread")
    assert create_app(run_dir, prefix_cache_mb=0, engine="thread").state.server.engine.prefix_cache is None
    pc = create_app(run_dir, prefix_cache_mb=1.5, engine="thread").state.server.engine.prefix_cache
    assert pc.max_bytes == 1.5 * 2**20
    with pytest.raises(UserError, match="--prefill-chunk"):
        create_app(run_dir, prefill_chunk=0, engine="thread")
    assert create_app(run_dir, prefill_chunk=16, engine="thread").state.server.engine._chunk() == 16


def test_tokenize_and_detokenize(server, run_dir):
    """vLLM's /tokenize and /detokenize: a prompt's ids (a chat's through the template) as the
    engine would get them, and ids back to text; bad input is a 400."""
    from scratchlm.checkpoint import load_run

    _, tok, _ = load_run(run_dir)
    r = httpx.post(server + "/tokenize", json={"model": "tiny-run", "prompt": "Hello, World!"}).json()
    assert r == {"tokens": tok.encode("Hello, World!"), "count": 13, "max_model_len": CONTEXT}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = httpx.post(server + "/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == tok.encode(render_chat(messages)) and r["count"] == len(r["tokens"])
    ids = tok.encode("The quick brown fox") + [tok.eot_id]
    assert httpx.post(server + "/detokenize", json={"tokens": ids}).json() == {
        "prompt": "The quick brown fox<|endoftext|>"}
    _error(httpx.post(server + "/tokenize", json={"prompt": ["a", "b"]}), 400)
    _error(httpx.post(server + "/tokenize", json={"prompt": "price: 5 €"}), 400)  # € never seen
    _error(httpx.post(server + "/tokenize", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    for bad in ([tok.vocab_size], [-1], [True], "12", None):
        _error(httpx.post(server + "/detokenize", json={"tokens": bad}), 400)
    _error(httpx.post(server + "/detokenize", json={"model": "other", "tokens": [1]}), 400)
    _error(httpx.post(server + "/tokenize", content=b'{"prompt": "a\\ud800b"}'), 400)
    text = httpx.get(server + "/metrics").text  # counted under their own names
    assert re.search(r'^scratchlm_requests_total\{endpoint="/tokenize",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^scratchlm_requests_total\{endpoint="/detokenize",status="400"\} [1-9]', text, re.M)


def test_an_unhandled_error_is_a_counted_500(run_dir):
    app = create_app(run_dir, engine="thread")

    def broken(text):
        raise RuntimeError("a bug (injected)")

    app.state.server.tokenizer.encode = broken
    with running_server(app) as url:
        err = _error(httpx.post(url + "/tokenize", json={"prompt": "Hi"}), 500)
        assert err["type"] == "server_error"
        assert _metric(url, 'scratchlm_requests_total\\{endpoint="/tokenize",status="500"\\}') == 1


def test_chat_template():
    assert render_chat([{"role": "user", "content": "Hi"}]) == "User: Hi\nAssistant:"
    assert CHAT_STOP == "\nUser:"


def test_n_seed_and_stop(client):
    kw = dict(model="tiny-run", prompt="The quick", max_tokens=30, temperature=1.0, seed=7, n=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    greedy = client.completions.create(model="tiny-run", prompt="The quick", max_tokens=30,
                                       temperature=0).choices[0].text
    stop = greedy[5:8]
    assert len(stop) == 3
    r = client.completions.create(model="tiny-run", prompt="The quick", max_tokens=30, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == greedy[: greedy.find(stop)] and r.choices[0].finish_reason == "stop"
    texts, reasons = ["", ""], [None, None]
    for chunk in client.completions.create(stream=True, **kw):  # n=2 streamed: same choices
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.text for c in a.choices] and None not in reasons


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "Hi", "temperature": -1}, "temperature"),
    ({"prompt": "Hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "Hi", "top_p": 0}, "top_p"),
    ({"prompt": "Hi", "n": 0}, "n"),
    ({"prompt": "Hi", "n": 99}, "n"),
    ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "Hi", "stop": 3}, "stop"),
    ({"prompt": "Hi", "model": "gpt-4"}, "model"),
    ({"prompt": "x" * CONTEXT}, "prompt"),
    ({"prompt": ["Hi"] * 9}, "prompt"),  # more prompts than slots and queue hold (4 + 4)
    ({"prompt": "Hi", "max_tokens": CONTEXT}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "\u4e2d"}, "prompt"),  # a character the char tokenizer never saw
    ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "Hi", "logprobs": "3"}, "logprobs"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": [[1, True]]}, "prompt"),  # JSON true is not token id 1
    ({"prompt": "Hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "Hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"1": 101}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"100000": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": [1, 2]}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"\u00b2": 1}}, "logit_bias"),  # a digit to isdigit(), not to int()
    ({"prompt": "Hi", "logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    ({"prompt": "Hi", "frequency_penalty": "1"}, "frequency_penalty"),
    ({"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),  # not streaming
    ({"prompt": "Hi", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
])
def test_bad_completion_requests_are_400(server, body, param):
    err = _error(httpx.post(server + "/v1/completions", json=body), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_assistant_message_without_content_is_accepted(client):
    r = client.chat.completions.create(model="tiny-run", max_tokens=3, messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
        {"role": "user", "content": "Hello"}])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_bad_chat_requests_are_400(server):
    url = server + "/v1/chat/completions"
    assert _error(httpx.post(url, json={"model": "tiny-run"}), 400)["param"] == "messages"
    hi = [{"role": "user", "content": "hi"}]
    assert _error(httpx.post(url, json={"messages": hi, "top_logprobs": 2}), 400)["param"] == "top_logprobs"
    assert _error(httpx.post(url, json={"messages": hi, "logprobs": 3}), 400)["param"] == "logprobs"
    for role in ("robot", ["user"], {"user": 1}, None):
        bad_role = {"messages": [{"role": role, "content": "hi"}]}
        assert _error(httpx.post(url, json=bad_role), 400)["param"] == "messages"
    long = {"messages": [{"role": "user", "content": "x" * CONTEXT}]}
    assert _error(httpx.post(url, json=long), 400)["code"] == "context_length_exceeded"


def test_malformed_json_is_400(server):
    too_many_digits = b'{"prompt": "Hi", "max_tokens": 1' + b"0" * 5000 + b"}"  # Python's int limit
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, too_many_digits):
        r = httpx.post(server + "/v1/completions", content=body,
                       headers={"Content-Type": "application/json"})
        assert _error(r, 400)["code"] == "invalid_json"
    assert _error(httpx.get(server + "/v1/nothing"), 404)["code"] == "not_found"


def test_an_overlong_prompt_is_refused_without_tokenizing_it(server):
    """A text longer than context x the longest token's bytes cannot fit: refused at once."""
    for url, body in (("/v1/completions", {"prompt": "x" * (10 * CONTEXT)}),
                      ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (10 * CONTEXT)}]})):
        err = _error(httpx.post(server + url, json=body), 400)
        assert err["code"] == "context_length_exceeded" and "is at least" in err["message"]
    # /tokenize counts any text, since telling how long it is is what it is for.
    assert httpx.post(server + "/tokenize", json={"prompt": "x" * (10 * CONTEXT)}).json()["count"] == 10 * CONTEXT


def test_a_tokenizer_that_normalizes_is_never_refused_by_length_alone(run_dir):
    """An imported tokenizer may normalize first (here: strip), so a long text can still fit."""
    from tokenizers import normalizers

    from scratchlm.tokenizer import Tokenizer, train_bpe

    hf = train_bpe([TEXT] * 20, 300).hf
    hf.normalizer = normalizers.Strip()
    tok = Tokenizer.from_str(hf.to_str())
    d = run_dir.parent / "normalizing-run"
    tok.save(run_dir.parent / "normalizing-tokenizer.json")
    cfg = RunConfig(model=ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16,
                                      context_length=CONTEXT))
    write_run(d, Transformer(cfg.model), cfg, run_dir.parent / "normalizing-tokenizer.json")
    padded = "hello" + " " * (CONTEXT * int(tok.token_bytes().max()) + 1)  # stripped to "hello"
    with running_server(create_app(d, engine="thread")) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": padded, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(padded)) < CONTEXT


def test_a_body_too_large_is_413(server):
    from scratchlm.serve import MAX_BODY_BYTES

    big = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    declared = httpx.post(server + "/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert _error(declared, 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit applies as the body arrives
        for i in range(0, len(big), 2**20):
            yield big[i : i + 2**20]

    r = httpx.post(server + "/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert _error(r, 413)["code"] == "request_too_large"


def test_a_client_gone_before_its_body_arrived_is_not_a_500(server):
    import socket
    from urllib.parse import urlparse

    def counts() -> dict[str, float]:  # status -> requests to /v1/completions so far
        pattern = r'^scratchlm_requests_total\{endpoint="/v1/completions",status="(\d+)"\} (\S+)$'
        return {k: float(v) for k, v in re.findall(pattern, httpx.get(server + "/metrics").text, re.M)}

    before = counts()
    u = urlparse(server)
    with socket.create_connection((u.hostname, u.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"prompt": ')
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(counts().values()) == sum(before.values()):
        time.sleep(0.05)  # until the request is counted
    after = counts()
    assert after.get("400", 0) == before.get("400", 0) + 1 and after.get("500", 0) == before.get("500", 0)


def test_openai_client_raises_on_400(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-run", prompt="Hi", max_tokens=CONTEXT)


def test_api_key(run_dir):
    with running_server(create_app(run_dir, max_batch=1, api_key=KEY)) as url:
        body = {"prompt": "Hi", "max_tokens": 2}
        _error(httpx.post(url + "/v1/completions", json=body), 401)
        _error(httpx.post(url + "/v1/completions", json=body,
                          headers={"Authorization": "Bearer wrong"}), 401)
        _error(httpx.get(url + "/v1/models"), 401)
        _error(httpx.post(url + "/tokenize", json={"prompt": "Hi"}), 401)
        _error(httpx.post(url + "/detokenize", json={"tokens": [1]}), 401)
        good = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        assert good.completions.create(model="tiny-run", prompt="Hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(url + "/health").status_code == 200  # liveness stays open


def test_stopped_engine_is_503(run_dir):
    app = create_app(run_dir, max_batch=1)
    with running_server(app) as url:
        app.state.server.engine.stop()
        err = _error(httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}), 503)
        assert err["code"] == "engine_unavailable"
        assert httpx.get(url + "/health").status_code == 503


def test_binds_loopback_by_default():
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_busy_or_impossible_port_is_a_one_line_error_before_anything_starts(run_dir, capsys):
    import socket

    from scratchlm.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
        out = capsys.readouterr()
        assert out.out == ""  # no "serving ... at" line for a server that never listened
        assert out.err.startswith(f"error: cannot listen on 127.0.0.1 port {port}: ")
        assert len(out.err.strip().splitlines()) == 1
    assert main(["serve", str(run_dir), "--port", "70000"]) == 2
    assert capsys.readouterr().err == "error: --port must be between 0 and 65535, got 70000\n"


# --- overload and disconnects ---------------------------------------------------------------

LONG = {"prompt": "Hello", "max_tokens": CONTEXT - 10, "ignore_eos": True, "temperature": 0}


def _wait_idle(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(url + "/health").json()["running"]:
        assert time.monotonic() < deadline, "the slot was never freed"
        time.sleep(0.02)


def test_overload_is_429(one_slot):
    with httpx.Client(timeout=30) as http:
        t0 = time.perf_counter()
        with http.stream("POST", one_slot + "/v1/completions", json={**LONG, "stream": True}) as first:
            # Keep the line iterator: dropping it closes the connection, and the server then
            # cancels the first request (which made this test race against the cancel).
            lines = first.iter_lines()
            line = next(lines)  # the first request holds the only slot
            health = httpx.get(one_slot + "/health").json()
            assert line.startswith('data: {"id"') and health["running"] == 1, \
                (line, health, f"{time.perf_counter() - t0:.3f} s after the request")
            err = _error(http.post(one_slot + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}), 429)
            assert err["code"] == "queue_full"
    _wait_idle(one_slot)
    assert 'endpoint="/v1/completions",status="429"' in httpx.get(one_slot + "/metrics").text


def test_stream_interval_grows_with_open_streams_within_the_chunk_budget():
    base = 0.02
    assert stream_interval_for(0.0, 50) == 0.0  # one chunk per token stays one chunk per token
    few = int(base * MAX_CHUNKS_PER_S)  # this many streams fit the budget at the base interval
    assert [stream_interval_for(base, n) for n in (1, few)] == [base, base]
    for n in (few + 1, 2 * few, 8 * few):
        iv = stream_interval_for(base, n)
        assert iv > base and n / iv <= MAX_CHUNKS_PER_S * (1 + 1e-9) or iv == MAX_STREAM_INTERVAL
    assert stream_interval_for(base, 10_000) == MAX_STREAM_INTERVAL
    assert stream_interval_for(0.5, 10_000) == 0.5  # a longer interval asked for is kept


def test_last_chunk_does_not_wait_for_the_stream_interval(run_dir):
    """A stream gathers tokens for up to the stream interval per chunk, but a finished
    request's last chunk goes at once: with a 1 s interval a 3-token stream ends well within
    it (before, the last chunk waited out the interval, and so did the client's next request)."""
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True}
    with running_server(create_app(run_dir, stream_interval=1.0, engine="thread")) as url:
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=30)  # warm-up
        t = time.perf_counter()
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        elapsed = time.perf_counter() - t
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    assert elapsed < 0.6, f"the stream took {elapsed:.2f} s with a 1 s interval"


def test_disconnect_mid_stream_frees_the_slot(one_slot):
    _wait_idle(one_slot)
    before = _metric(one_slot, "scratchlm_generation_tokens_total")
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", one_slot + "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    # Leaving the block closed the connection mid-stream.
    _wait_idle(one_slot)
    assert _metric(one_slot, "scratchlm_generation_tokens_total") - before < LONG["max_tokens"]
    assert _metric(one_slot, "scratchlm_open_streams") == 0  # it no longer shares the budget
    r = httpx.post(one_slot + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_disconnect_while_waiting_for_a_whole_completion(one_slot):
    _wait_idle(one_slot)
    before = _metric(one_slot, "scratchlm_generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(one_slot + "/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.05))
    _wait_idle(one_slot)
    assert _metric(one_slot, "scratchlm_generation_tokens_total") - before < LONG["max_tokens"]


# --- metrics ---------------------------------------------------------------------------------


# --- log-probabilities -------------------------------------------------------------------------


def _reference_logprobs(run_dir, ids: list[int]) -> torch.Tensor:
    """log-softmax of the served model's logits over a whole sequence: row t predicts t + 1."""
    from scratchlm.checkpoint import load_run

    model, _, _ = load_run(run_dir)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].float().log_softmax(-1)


def test_completion_logprobs_with_echo_are_the_models(server, client, run_dir):
    """logprobs with echo (what evaluation harnesses send to score a text): every token of
    prompt and completion gets the model's own log-probability given the tokens before it,
    the first prompt token none; greedy picks the top token; offsets add up to the text."""
    tok = train_char([TEXT])
    prompt = "Hello, World"
    r = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=8, temperature=0,
                                  logprobs=3, echo=True)
    choice = r.choices[0]
    lp = choice.logprobs
    seq = tok.encode("".join(lp.tokens))
    n = len(tok.encode(prompt))
    assert len(seq) == len(lp.tokens) == n + r.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text and choice.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = _reference_logprobs(run_dir, seq)
    for t in range(1, len(seq)):
        assert lp.token_logprobs[t] == pytest.approx(ref[t - 1, seq[t]].item(), abs=1e-4)
        top = ref[t - 1].topk(3)
        assert {tok.decode([i]) for i in top.indices.tolist()} <= set(lp.top_logprobs[t])
        if t >= n:  # generated at temperature 0: the most likely token
            assert seq[t] == top.indices[0].item()
    assert lp.text_offset == [len("".join(lp.tokens[:t])) for t in range(len(seq))]

    without = client.completions.create(model="tiny-run", prompt=prompt, max_tokens=8, temperature=0,
                                        logprobs=0)
    assert without.choices[0].logprobs.tokens == lp.tokens[n:]
    assert without.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[n:], abs=1e-5)
    assert client.completions.create(model="tiny-run", prompt=prompt, max_tokens=2).choices[0].logprobs is None

    # A token-id prompt holding end-of-text: echo leaves it out, as text_offset does.
    ids = tok.encode("Hi") + [tok.eot_id] + tok.encode("yo")
    r = client.completions.create(model="tiny-run", prompt=ids, max_tokens=3, temperature=0, logprobs=0, echo=True)
    choice = r.choices[0]
    assert choice.text.startswith("Hiyo") and tok.decode([tok.eot_id]) not in choice.text
    for token, offset in zip(choice.logprobs.tokens, choice.logprobs.text_offset):
        shown = "" if token == tok.decode([tok.eot_id]) else token
        assert choice.text[offset : offset + len(shown)] == shown


def test_scoring_a_text_that_ends_at_end_of_text(run_dir):
    """lm-evaluation-harness's loglikelihood request (echo, logprobs 1, max_tokens 1): one
    entry per prompt token plus one for the generated token, also when that one is
    end-of-text, so `token_logprobs[ctxlen:-1]` is exactly the continuation's."""
    from test_engine import eot_model  # the same constructed model

    tok = train_char([TEXT])
    d = run_dir.parent / "eot-run"
    model = eot_model(tok)
    write_run(d, model, RunConfig(model=model.cfg), run_dir.parent / "tokenizer.json")
    ids = tok.encode("Hello, World")
    body = {"prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
    with running_server(create_app(d, max_batch=2, engine="thread")) as url:
        r = httpx.post(url + "/v1/completions", json=body, timeout=30).json()
        streamed = [json.loads(line[6:]) for line in httpx.post(
            url + "/v1/completions", json={**body, "stream": True}, timeout=30).text.splitlines()
            if line.startswith("data: {")]
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == "Hello, World"
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][-1] == "<|endoftext|>"
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0].log_softmax(-1)
    want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))] + [ref[-1, tok.eot_id].item()]
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert lp["text_offset"][-1] == len("Hello, World")  # end-of-text takes no room in the text
    got = [t for c in streamed for t in ((c["choices"][0]["logprobs"] or {}).get("tokens") or [])]
    assert got == lp["tokens"]


def test_streamed_logprobs_equal_the_whole_response(server, client):
    kw = dict(model="tiny-run", prompt="The quick", max_tokens=20, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kw).choices[0].logprobs
    tokens, lps, offsets, text = [], [], [], ""
    for chunk in client.completions.create(stream=True, **kw):
        c = chunk.choices[0]
        text += c.text
        if c.logprobs is not None:
            tokens += c.logprobs.tokens
            lps += c.logprobs.token_logprobs
            offsets += c.logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset and "".join(tokens) == text
    assert lps[0] is None and lps[1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-5)


def test_chat_logprob_bytes_join_into_the_reply():
    """A byte-level token that is half a character shows U+FFFD as its text, but its bytes
    are its own: joined, they give the reply."""
    from scratchlm.api import chat_logprobs
    from scratchlm.tokenizer import train_bpe

    tok = train_bpe(["héllo wörld ☃ 日本語 テキスト emoji 😀😃 " * 20], vocab_size=300)
    ids = tok.encode("テキスト 😀")
    content = chat_logprobs(tok, ids, [(-1.0, [(i, -1.0)]) for i in ids])["content"]
    assert any("\ufffd" in c["token"] for c in content)
    assert bytes(b for c in content for b in c["bytes"]).decode() == "テキスト 😀"
    assert content[0]["top_logprobs"][0]["bytes"] == content[0]["bytes"]


def test_chat_logprobs(server, client):
    kw = dict(model="tiny-run", messages=[{"role": "user", "content": "Hello"}], max_tokens=10,
              temperature=0, logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.token == item.top_logprobs[0].token  # greedy
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert item.bytes == list(item.token.encode())
    streamed = [item for chunk in client.chat.completions.create(stream=True, **kw) if chunk.choices
                for item in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else [])]
    assert [i.token for i in streamed] == [i.token for i in content]
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_metrics(server, client):
    client.completions.create(model="tiny-run", prompt="Hello", max_tokens=4)
    text = httpx.get(server + "/metrics").text
    for line in ("# TYPE scratchlm_requests_total counter", "# TYPE scratchlm_queue_depth gauge",
                 "# TYPE scratchlm_request_latency_seconds histogram",
                 "# TYPE scratchlm_time_to_first_token_seconds histogram",
                 'scratchlm_request_latency_seconds_bucket{le="+Inf"}'):
        assert line in text
    assert re.search(r'^scratchlm_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text, re.M)
    assert _metric(server, "scratchlm_generation_tokens_total") >= 4
    assert _metric(server, "scratchlm_queue_depth") == 0
    assert _metric(server, "scratchlm_max_batch") == 4
    count = _metric(server, "scratchlm_request_latency_seconds_count")
    assert count >= 1
    # A path a client made up is counted, but under "other": it must not break the format.
    assert httpx.get(server + '/v1/a"b%0Ac').status_code == 404
    text = httpx.get(server + "/metrics").text
    assert re.search(r'^scratchlm_requests_total\{endpoint="other",status="404"\} [1-9]', text, re.M)
    assert all(re.fullmatch(r'(# .*|[a-z_]+(\{[a-z]+="[^"\n]*"(,[a-z]+="[^"\n]*")*\})? \S+)', line)
               for line in text.splitlines()), text


@pytest.mark.parametrize("extreme", [{"temperature": 1e-40}, {"temperature": 0.7, "repetition_penalty": 1e-300},
                                     {"temperature": 0.7, "top_p": 1e-50}])  # top_p rounds to 0 in fp32
def test_extreme_sampling_values_neither_fail_nor_disturb_others(server, extreme):
    """Values that overflow fp32 once divided by (a near-zero temperature or penalty) still
    sample, and a request running beside them is not failed with them."""
    body = {"prompt": "Hello", "max_tokens": 40, "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server + "/v1/completions", json={**body, "stream": True}) as other:
            lines = other.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # running
            r = http.post(server + "/v1/completions", json={**body, "max_tokens": 5, **extreme})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 5
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert rest[-1]["choices"][0]["finish_reason"] == "length"


def test_sse_wire_format(server):
    with httpx.stream("POST", server + "/v1/completions", timeout=30,
                      json={"prompt": "Hi", "max_tokens": 5, "stream": True, "ignore_eos": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
