"""Continuous batching (scratchlm.engine): per-row positions, joining and leaving, sampling,
stop strings, streaming text, the bounded queue and cancellation."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.engine import Engine, EngineClosed, Event, GenerationParams, QueueFull, Request
from scratchlm.generate import SamplingConfig, generate, generate_text
from scratchlm.model import Transformer
from scratchlm.tokenizer import train_bpe, train_char

TEXT = "The quick brown fox jumps over the lazy dog. 0123456789\nHello, World! abcdefghijklmnopqrstuvwxyz?"
GREEDY = SamplingConfig(temperature=0)


def tiny_model(vocab_size: int, context_length: int = 128, seed: int = 0) -> Transformer:
    """2 layers, width 32; weights drawn wide so that outputs depend strongly on every position
    and on what attention reads from the cache (the default init makes an untrained model
    repeat one character, which tests little). With these weights, leaving out the cache reset
    of a reused slot, or moving a row without its keys, fails the greedy test below."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab_size, n_layer=2, n_head=4, d_model=32,
                                    context_length=context_length))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "emb" in name else 0.6 if "attn" in name else 0.15)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return train_char([TEXT])


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


@pytest.fixture
def engine(model, tok):
    eng = Engine(model, tok, max_batch=3, max_queue=16).start()
    yield eng
    eng.stop()


def reference_greedy(model, ids: list[int], max_new: int, eot_id: int) -> list[int]:
    """generate.generate on this prompt alone; end-of-text excluded (as the engine reports)."""
    out = [step[0] for step in generate(model, [ids], max_new, GREEDY, eot_id=eot_id)]
    return [t for t in out if t != eot_id]


def test_greedy_under_concurrency_equals_generate(engine, model, tok):
    """Requests joining a running batch at different times, in reused rows, with different
    lengths: every output equals decoding that prompt alone. Wrong per-row positions (or a
    stale row not masked) would change the tokens."""
    prompts = ["Hello", "T", "The quick brown fox jumps", "0123456789 0123", "lazy dog?", "abc",
               "World! The quick", "xyz"]
    max_new = [40, 7, 25, 60, 3, 33, 18, 50]
    ids = [tok.encode(p) for p in prompts]
    expected = [reference_greedy(model, i, m, tok.eot_id) for i, m in zip(ids, max_new)]
    assert len({tuple(e) for e in expected}) == len(prompts)  # the outputs differ: a real test
    results = [None] * len(prompts)

    def client(i: int) -> None:
        time.sleep(0.002 * i)  # arrive while others are decoding
        results[i] = engine.generate(ids[i], GenerationParams(max_tokens=max_new[i], sampling=GREEDY))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for res, exp, m in zip(results, expected, max_new):
        assert res.tokens == exp
        assert res.finish_reason == ("length" if len(exp) == m else "stop")
        assert res.text == tok.decode(exp)
        assert res.completion_tokens == len(exp)
    assert engine.running == 0 and engine.queue_depth == 0


def test_matches_generate_text(engine, model, tok):
    """The engine's text equals the CLI's generate_text (same sampling core, same stop rules)."""
    prompt = "The quick"
    want = generate_text(model, tok, [prompt], 30, GREEDY)[0]
    got = engine.generate(tok.encode(prompt), GenerationParams(max_tokens=30, sampling=GREEDY))
    assert (got.text, got.finish_reason) == (want.text, want.finish_reason)


def test_long_generation_does_not_block_a_new_request(model, tok):
    eng = Engine(model, tok, max_batch=2, max_queue=4).start()
    try:
        long_events: queue.Queue[Event] = queue.Queue()
        (long,) = eng.submit([tok.encode("Hello")], GenerationParams(max_tokens=120, ignore_eos=True,
                                                                      sampling=GREEDY), long_events.put)
        long_events.get(timeout=10)  # the long one is decoding
        short = eng.generate(tok.encode("abc"), GenerationParams(max_tokens=3, ignore_eos=True))
        assert short.finish_reason == "length" and short.completion_tokens == 3
        assert not long.done  # the short one started, ran and finished inside the long one
        assert long.t_first_token is not None
    finally:
        eng.stop()
    assert long.finish_reason in ("length", "error")


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine, tok):
    params = GenerationParams(max_tokens=30, sampling=SamplingConfig(temperature=1.0, top_k=20),
                              seed=1234, ignore_eos=True)
    alone = engine.generate(tok.encode("Hello"), params)
    sink: queue.Queue[Event] = queue.Queue()
    others = engine.submit([tok.encode("abc"), tok.encode("xyz")],
                           GenerationParams(max_tokens=40, sampling=SamplingConfig(temperature=1.0)),
                           sink.put)
    crowded = engine.generate(tok.encode("Hello"), params)
    assert crowded.tokens == alone.tokens
    other_seed = engine.generate(tok.encode("Hello"), GenerationParams(
        max_tokens=30, sampling=params.sampling, seed=99, ignore_eos=True))
    assert other_seed.tokens != alone.tokens
    for r in others:
        engine.cancel(r)


def _stream(engine, prompt_ids, params) -> tuple[list[str], Event]:
    events: queue.Queue[Event] = queue.Queue()
    engine.submit([prompt_ids], params, events.put)
    deltas = []
    while True:
        ev = events.get(timeout=10)
        deltas.append(ev.text)
        if ev.finish_reason:
            return deltas, ev


def test_stop_string_cuts_text_and_is_never_streamed(engine, model, tok):
    ids = tok.encode("The quick")
    full = tok.decode(reference_greedy(model, ids, 40, tok.eot_id))
    stop = full[8:11]  # a 3-character string the greedy output is known to contain
    assert len(stop) == 3
    cut = full.find(stop)
    deltas, last = _stream(engine, ids, GenerationParams(max_tokens=40, sampling=GREEDY, stop=[stop, "@@"]))
    assert "".join(deltas) == full[:cut]
    assert last.finish_reason == "stop"
    streamed = ""
    for d in deltas:  # no delta ever showed text that a stop string later took back
        streamed += d
        assert full[:cut].startswith(streamed)


def test_max_tokens_and_usage(engine, tok):
    ids = tok.encode("Hello")
    res = engine.generate(ids, GenerationParams(max_tokens=5, ignore_eos=True))
    assert (res.finish_reason, res.completion_tokens, res.prompt_tokens) == ("length", 5, len(ids))
    with pytest.raises(Exception, match="context"):
        engine.generate(ids, GenerationParams(max_tokens=200))  # 5 + 200 > context 128


def test_queue_is_bounded(model, tok):
    eng = Engine(model, tok, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    params = GenerationParams(max_tokens=4)
    eng.submit([tok.encode("a")], params, lambda ev: None)
    eng.submit([tok.encode("b")], params, lambda ev: None)
    with pytest.raises(QueueFull):
        eng.submit([tok.encode("c")], params, lambda ev: None)
    with pytest.raises(QueueFull):  # groups are all or nothing
        Engine(model, tok, max_batch=1, max_queue=1).submit([[1], [2], [3]], params, lambda ev: None)
    eng.stop()
    with pytest.raises(EngineClosed):
        eng.submit([tok.encode("d")], params, lambda ev: None)


def test_cancel_frees_the_slot(model, tok):
    eng = Engine(model, tok, max_batch=1, max_queue=2).start()
    try:
        events: queue.Queue[Event] = queue.Queue()
        (req,) = eng.submit([tok.encode("Hello")], GenerationParams(max_tokens=120, ignore_eos=True),
                            events.put)
        events.get(timeout=10)
        eng.cancel(req)
        res = eng.generate(tok.encode("abc"), GenerationParams(max_tokens=4, ignore_eos=True), timeout=10)
        assert res.completion_tokens == 4
        assert req.finish_reason == "cancelled" and len(req.tokens) < 120
        assert eng.running == 0
    finally:
        eng.stop()


def test_streaming_holds_back_incomplete_utf8():
    """A character split over two byte-level tokens is sent whole, once both have arrived."""
    tok = train_bpe(["plain ascii text only " * 20], vocab_size=300)
    (first, second) = tok.encode("é")  # no merge covers it: two byte tokens
    eng = Engine(tiny_model(tok.vocab_size), tok, max_batch=1)
    sent: list[Event] = []
    req = Request([first], GenerationParams(max_tokens=10), sent.append, 0, torch.device("cpu"))
    eng._accept(req, tok.encode("a")[0])
    eng._accept(req, first)
    assert [e.text for e in sent] == ["a"]  # half a character: nothing yet
    eng._accept(req, second)
    assert [e.text for e in sent] == ["a", "é"]
