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


@pytest.mark.parametrize("chunk", [512, 4], ids=["whole-prompts", "4-token-chunks"])
def test_greedy_under_concurrency_equals_generate(engine, model, tok, monkeypatch, chunk):
    """Requests joining a running batch at different times, in reused rows, with different
    lengths: every output equals decoding that prompt alone. Wrong per-row positions (or a
    stale row not masked) would change the tokens. With 4-token chunks the prompts are
    prefilled over many steps while rows move and others decode."""
    import scratchlm.engine as engine_mod

    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", chunk)
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


@pytest.mark.parametrize("chunk", [512, 20], ids=["one-pass", "chunked"])
def test_prompts_admitted_together_share_a_padded_prefill(model, tok, monkeypatch, chunk):
    """Prompts of different lengths admitted in the same step are prefilled together (short
    ones padded) within the step's PREFILL_CHUNK prompt tokens: every output equals decoding
    that prompt alone. Padding seen by a real token, a position advanced by the padded length
    or a first token read at the padded end would change the tokens."""
    import scratchlm.engine as engine_mod

    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", chunk)
    prompts = ["Hello", "T", "The quick brown fox", "0123456789 01", "lazy dog?", "abc"]
    ids = [tok.encode(p) for p in prompts]
    expected = [reference_greedy(model, i, 20, tok.eot_id) for i in ids]
    eng = Engine(model, tok, max_batch=4, max_queue=8, prefix_cache_bytes=0)
    shapes = []
    hook = model.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    events: queue.Queue[Event] = queue.Queue()
    try:
        reqs = eng.submit(ids, GenerationParams(max_tokens=20, sampling=GREEDY), events.put)
        eng.start()  # all six wait; four are admitted in the first step
        for _ in reqs:
            while events.get(timeout=30).finish_reason is None:
                pass
    finally:
        hook.remove()
        eng.stop()
    assert [r.tokens for r in reqs] == expected
    passes = [s for s in shapes if s[1] > 1]
    if chunk == 512:  # the first four (5, 1, 19 and 13 tokens) in one pass, as long as the longest
        assert passes[0] == (4, 19)
    else:  # 20 tokens a step, oldest first: 5, 1 and 14 of the 19 (a pass of 1 and 5 rows, the
        # 14 alone: padding them together would waste more than the chunk), then 5 and 13
        assert passes[:3] == [(2, 5), (1, 14), (2, 13)]


def test_a_failing_prefill_fails_only_its_own_request(model, tok):
    """A new prompt whose prefill raises (out of memory, say) ends with an error; the request
    already decoding finishes as if nothing happened."""
    bad = tok.encode("xyz!")
    real = model.forward

    def forward(idx, *args, **kwargs):  # the real model, except for that one prompt
        if idx.shape[1] == len(bad) and idx[0].tolist() == bad:
            raise RuntimeError("out of memory (injected)")
        return real(idx, *args, **kwargs)

    ids = tok.encode("The quick")
    want = reference_greedy(model, ids, 60, tok.eot_id)
    eng = Engine(model, tok, max_batch=3, max_queue=4).start()
    model.forward = forward
    try:
        running: queue.Queue[Event] = queue.Queue()
        (good,) = eng.submit([ids], GenerationParams(max_tokens=60, sampling=GREEDY), running.put)
        running.get(timeout=30)  # decoding
        with pytest.raises(RuntimeError, match="injected"):
            eng.generate(bad, GenerationParams(max_tokens=5, sampling=GREEDY))
        while running.get(timeout=30).finish_reason is None:
            pass
    finally:
        del model.forward
        eng.stop()
    assert good.tokens == want and good.finish_reason in ("length", "stop")


def test_penalties_match_generate(engine, model, tok):
    """Presence and frequency penalties count each request's own generated tokens, as in
    generate(), also while other requests share the batch."""
    sampling = SamplingConfig(temperature=0, presence_penalty=0.5, frequency_penalty=1.5)
    ids = [tok.encode(p) for p in ("Hello", "The quick brown", "abc")]
    want = [[t for (t,) in generate(model, [i], 30, sampling, eot_id=tok.eot_id) if t != tok.eot_id]
            for i in ids]
    assert want[0] != reference_greedy(model, ids[0], 30, tok.eot_id)  # the penalties act
    reqs, _ = collect(engine, ids, GenerationParams(max_tokens=30, sampling=sampling))
    assert [r.tokens for r in reqs] == want


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
    req = Request([first], GenerationParams(max_tokens=10), sent.append, 0)
    eng._accept(req, tok.encode("a")[0])
    eng._accept(req, first)
    assert [e.text for e in sent] == ["a"]  # half a character: nothing yet
    eng._accept(req, second)
    assert [e.text for e in sent] == ["a", "é"]


def test_special_tokens_never_show_in_the_text(model, tok):
    """An end-of-text kept by ignore_eos, or a padding id an untrained model picked, is in the
    ids but not in the text (as in vLLM and the OpenAI API)."""
    eng = Engine(model, tok, max_batch=1)
    sent: list[Event] = []
    req = Request([1], GenerationParams(max_tokens=10, ignore_eos=True), sent.append, 0)
    a, b = tok.encode("ab")
    for t in (a, tok.eot_id, tok.pad_id, b):
        eng._accept(req, t)
    assert req.tokens == [a, tok.eot_id, tok.pad_id, b]
    assert "".join(e.text for e in sent) == req.text == "ab"


def test_special_tokens_inside_a_held_character_do_not_break_it():
    """A special token adds no bytes, so it must not count towards the tokens a split
    character may be held back for: the text equals decoding all the ids at once."""
    tok = train_bpe(["héllo wörld ☃ snow 日本語 テキスト emoji 😀😃 " * 20], vocab_size=300)
    ids = tok.encode("テキスト")
    assert tok.decode(ids[:1]).endswith("\ufffd") and len(ids) >= 4  # split inside a character
    eng = Engine(tiny_model(tok.vocab_size), tok, max_batch=1)
    for feed in ([ids[0], tok.pad_id, *ids[1:]], [ids[0], tok.eot_id, tok.pad_id, *ids[1:]]):
        sent: list[Event] = []
        req = Request([1], GenerationParams(max_tokens=20, ignore_eos=True), sent.append, 0)
        for t in feed:
            eng._accept(req, t)
        assert "".join(e.text for e in sent) == req.text == "テキスト"
        assert req.text == tok.decode(feed, skip_special_tokens=True)


# --- the engine in its own process (what `scratchlm serve` runs) ------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok, model):
    from scratchlm.checkpoint import write_run
    from scratchlm.config import RunConfig

    d = tmp_path_factory.mktemp("engine-run")
    tok.save(d / "tokenizer.json")
    write_run(d / "run", model, RunConfig(model=model.cfg), d / "tokenizer.json")
    return d / "run"


def collect(engine, prompts, params) -> tuple[list, dict[int, list[Event]]]:
    """Submit and wait for every request's last event; (requests, events by index)."""
    events: queue.Queue[Event] = queue.Queue()
    reqs = engine.submit(prompts, params, events.put)
    got: dict[int, list[Event]] = {i: [] for i in range(len(prompts))}
    while sum(1 for evs in got.values() if evs and evs[-1].finish_reason) < len(prompts):
        ev = events.get(timeout=30)
        got[ev.index].append(ev)
    return reqs, got


def _assert_logprobs_close(a: list, b: list) -> None:
    """Entries equal up to float rounding (a batch of another size rounds differently)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert x[0] == pytest.approx(y[0], abs=1e-5)
            assert [i for i, _ in x[1]] == [i for i, _ in y[1]]
            assert [v for _, v in x[1]] == pytest.approx([v for _, v in y[1]], abs=1e-5)


@pytest.mark.parametrize("chunk", [512, 4], ids=["whole-prompt", "4-token-chunks"])
def test_logprobs_are_the_models_log_softmax(engine, model, tok, monkeypatch, chunk):
    """Each new token's log-probability and the most likely alternatives are the log-softmax
    of the model's raw logits at that position (not of the tempered or filtered ones), and the
    prompt's come from the same full forward pass, also when the prompt is prefilled a chunk at
    a time (each chunk scores the tokens after its own)."""
    import scratchlm.engine as engine_mod

    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", chunk)
    prompt = tok.encode("The quick brown")
    params = GenerationParams(max_tokens=12, sampling=SamplingConfig(temperature=1.5, top_k=5), seed=1,
                              ignore_eos=True, logprobs=3, prompt_logprobs=True)
    (req,), events = collect(engine, [prompt], params)
    seq = prompt + req.tokens
    with torch.no_grad():
        lp = model(torch.tensor([seq]))[0][0].float().log_softmax(-1)  # position t predicts t + 1
    want = [(lp[t - 1, seq[t]].item(), list(zip(lp[t - 1].topk(3).indices.tolist(),
                                                lp[t - 1].topk(3).values.tolist())))
            for t in range(1, len(seq))]
    assert req.prompt_logprobs[0] is None
    _assert_logprobs_close(req.prompt_logprobs[1:] + req.logprobs, want)
    assert [x for e in events[0] for x in e.logprobs] == req.logprobs
    assert events[0][0].prompt_logprobs == req.prompt_logprobs
    assert len(req.logprobs) == len(req.tokens) == 12


def eot_model(tok) -> Transformer:
    """A model that always predicts end-of-text: the final norm outputs one fixed vector
    (weight 0, bias e) and only end-of-text's output row points along it."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16,
                                    context_length=64, tie_embeddings=False))
    with torch.no_grad():
        e = torch.randn(16)
        model.norm_f.weight.zero_()
        model.norm_f.bias.copy_(e)
        model.lm_head.weight.normal_(0, 0.01)
        model.lm_head.weight[tok.eot_id] = e
    return model.eval()


def test_end_of_text_is_scored_too(tok):
    """A reply that stops at end-of-text has no token for it, but its logprobs end with
    end-of-text's entry (an evaluation may ask how likely the text is to end there)."""
    model = eot_model(tok)
    prompt = tok.encode("Hello")
    eng = Engine(model, tok, max_batch=2).start()
    try:
        (req,), events = collect(eng, [prompt], GenerationParams(max_tokens=5, sampling=GREEDY, logprobs=2))
    finally:
        eng.stop()
    with torch.no_grad():
        lp = model(torch.tensor([prompt]))[0][0, -1].log_softmax(-1)
    assert req.tokens == [] and req.finish_reason == "stop"
    ((chosen, top),) = req.logprobs
    assert chosen == pytest.approx(lp[tok.eot_id].item(), abs=1e-5) and top[0][0] == tok.eot_id
    assert [x for e in events[0] for x in e.logprobs] == req.logprobs


def test_engine_process_equals_the_engine_in_this_process(run_dir, engine, tok):
    """Same requests (greedy, seeded sampling, a stop string) through the child process and
    through an in-process engine: the same text, ids, finish reasons and token counts; the
    parent's mirrors and counters follow the child's."""
    from scratchlm.engine_process import EngineProcess

    prompts = [tok.encode(p) for p in ("Hello", "The quick", "abc")]
    params = [GenerationParams(max_tokens=40, sampling=GREEDY),
              GenerationParams(max_tokens=30, sampling=SamplingConfig(temperature=1.0, top_k=20), seed=7,
                               logprobs=2, prompt_logprobs=True, ignore_eos=True),
              GenerationParams(max_tokens=50, sampling=GREEDY, stop=["o"])]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child runs this small model: the same logits, bit for bit
    try:
        want_reqs, want = collect(engine, prompts, params)
    finally:
        torch.set_num_threads(before)
    # 3 requests, 2 slots: one waits (a prefix cache of a float number of bytes, as Engine takes,
    # and prompts prefilled 4 tokens a step: the outputs do not change)
    child = EngineProcess(run_dir, max_batch=2, max_queue=4, prefix_cache_bytes=2.0**20,
                          prefill_chunk=4).start()
    try:
        assert child.alive and "thread" in child.threads
        reqs, got = collect(child, prompts, params)
        for i in range(3):
            assert "".join(e.text for e in got[i]) == "".join(e.text for e in want[i]) == reqs[i].text
            assert [t for e in got[i] for t in e.ids] == reqs[i].tokens == want_reqs[i].tokens
            assert got[i][-1].finish_reason == want[i][-1].finish_reason
            assert got[i][-1].completion_tokens == len(reqs[i].tokens)
            assert reqs[i].t_submit <= reqs[i].t_first_token <= reqs[i].t_done
            assert [x for e in got[i] for x in e.logprobs] == reqs[i].logprobs
            _assert_logprobs_close(reqs[i].logprobs, want_reqs[i].logprobs)
            _assert_logprobs_close(reqs[i].prompt_logprobs or [], want_reqs[i].prompt_logprobs or [])
        assert len(reqs[1].logprobs) == len(reqs[1].tokens) == 30 and len(reqs[1].prompt_logprobs) == len(prompts[1])
        assert got[1][0].prompt_logprobs == reqs[1].prompt_logprobs
        assert child.generation_tokens_total == sum(len(r.tokens) for r in reqs)
        assert child.running == 0 and child.queue_depth == 0
    finally:
        child.stop()
    assert not child.alive and child.process.returncode == 0
    with pytest.raises(EngineClosed):
        child.submit([prompts[0]], params[0], lambda ev: None)


def test_engine_process_queue_bound_and_cancel(run_dir, tok):
    """The parent refuses beyond max_batch + max_queue without asking the child (it counts
    requests until it sees them finish); a cancel reaches the child, frees the slot, and the
    request ends "cancelled" before its max_tokens."""
    from scratchlm.engine_process import EngineProcess

    child = EngineProcess(run_dir, max_batch=1, max_queue=0).start()
    try:
        long = GenerationParams(max_tokens=100, ignore_eos=True)
        events: queue.Queue[Event] = queue.Queue()
        (req,) = child.submit([tok.encode("Hello")], long, events.put)
        with pytest.raises(QueueFull):
            child.submit([tok.encode("abc")], long, lambda ev: None)
        child.cancel(req)
        while (ev := events.get(timeout=30)).finish_reason is None:
            pass
        assert ev.finish_reason == "cancelled" and req.done and len(req.tokens) < 100
        _, got = collect(child, [tok.encode("abc")], GenerationParams(max_tokens=5, ignore_eos=True))
        assert got[0][-1].finish_reason == "length" and got[0][-1].completion_tokens == 5
    finally:
        child.stop()


def test_engine_process_death_fails_its_requests(run_dir, tok):
    """If the child dies (killed, out of memory), running requests end with an error event
    instead of hanging, and the engine reports itself closed."""
    import os
    import signal

    from scratchlm.engine_process import EngineProcess

    child = EngineProcess(run_dir, max_batch=1, max_queue=4).start()
    events: queue.Queue[Event] = queue.Queue()
    child.submit([tok.encode("Hello")] * 3, GenerationParams(max_tokens=120, ignore_eos=True), events.put)
    events.get(timeout=30)  # a first token: the child has reported one running and two waiting
    assert (child.running, child.queue_depth) == (1, 2)
    os.kill(child.process.pid, signal.SIGKILL)
    ends = []
    while len(ends) < 3:
        ev = events.get(timeout=30)
        if ev.finish_reason is not None:
            ends.append(ev)
    assert {e.finish_reason for e in ends} == {"error"}
    assert all("exited unexpectedly" in e.error for e in ends)
    assert not child.alive
    assert (child.running, child.queue_depth) == (0, 0)  # not the dead child's last report
    with pytest.raises(EngineClosed):
        child.submit([tok.encode("abc")], GenerationParams(max_tokens=5), lambda ev: None)
    child.stop()  # harmless after the fact


def test_engine_process_exits_with_its_parent(run_dir, tmp_path):
    """A parent that dies without cleaning up (kill -9) leaves no engine process behind: the
    child sees its command pipe close and exits."""
    import os
    import subprocess
    import sys

    script = ("import os, sys; from scratchlm.engine_process import EngineProcess\n"
              f"e = EngineProcess({str(run_dir)!r}).start()\n"
              "print(e.process.pid, flush=True); os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie counts as gone: it is no longer running (its parent exited, init reaps it).
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.1)
    pytest.fail(f"engine process {pid} still running 30 s after its parent died")


def test_engine_process_unloadable_run_is_a_user_error(run_dir, tmp_path):
    """Damaged weights: the child's load error comes back as the parent's one-line UserError."""
    import shutil

    from scratchlm.engine_process import EngineProcess
    from scratchlm.errors import UserError

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError) as e:
        EngineProcess(bad).start()
    assert "\n" not in str(e.value) and str(e.value)


def test_engine_process_loses_no_request_that_finishes_at_once(run_dir, tok):
    """Many one-token requests, submitted while others stream: each one's only event can come
    back before `submit` returns, and every one must still finish (the parent registers a
    request before sending it; it used to register after, and a fast reply was dropped: with
    a 20 ms stall between the two, this test loses requests)."""
    from scratchlm.engine_process import EngineProcess

    child = EngineProcess(run_dir, max_batch=8, max_queue=400).start()
    try:
        finished: queue.Queue[Event] = queue.Queue()

        def sink(ev: Event) -> None:
            if ev.finish_reason is not None:
                finished.put(ev)

        child.submit([tok.encode("Hello")] * 4, GenerationParams(max_tokens=100, ignore_eos=True), sink)
        n, one = 300, GenerationParams(max_tokens=1, ignore_eos=True)
        for i in range(n):
            child.submit([tok.encode("abc"[: 1 + i % 3])], one, sink)
        ends = [finished.get(timeout=30) for _ in range(n + 4)]
        assert sum(e.completion_tokens == 1 for e in ends) == n
    finally:
        child.stop()


# --- the prefix cache ----------------------------------------------------------------------------


def _turns(eng, prompts: list[list[int]], params: GenerationParams) -> list[tuple[Request, Event]]:
    """One request after another (each finishes before the next starts, as chat turns do)."""
    out = []
    for p in prompts:
        (req,), got = collect(eng, [p], params)
        out.append((req, got[0][-1]))
    return out


def test_prefix_cache_reuses_finished_tokens_and_changes_no_output(model, tok):
    """A chat's next turn (the whole conversation so far, then more), a retry, and a prompt
    sharing only a start: each copies the keys and values of the tokens it shares with a
    finished request and runs only the rest, and every output (tokens and log-probabilities)
    is what the same engine without a prefix cache gives."""
    params = GenerationParams(max_tokens=12, sampling=GREEDY, logprobs=2)
    first = tok.encode("The quick brown fox")
    cached = Engine(model, tok, max_batch=2).start()
    plain = Engine(model, tok, max_batch=2, prefix_cache_bytes=0).start()
    try:
        ((req1, last1),) = _turns(cached, [first], params)
        assert last1.cached_tokens == 0
        turn2 = first + req1.tokens + tok.encode(" jumps over")
        retry = list(first)
        partial = first[:17] + tok.encode("lazy dog")  # one whole block of 16 tokens, and one more
        prompts = [turn2, retry, partial]
        got = _turns(cached, prompts, params)
        want = _turns(plain, [first] + prompts, params)[1:]
        # Request 1's row held its prompt and its new tokens but the last (never fed back);
        # turn 2's row then extends it, and a prompt reuses at most all but its last token.
        ran1 = len(first) + len(req1.tokens) - 1
        assert [ev.cached_tokens for _, ev in got] == [ran1, len(first) - 1, 17]
        assert [ev.cached_tokens for _, ev in want] == [0, 0, 0]
        for (req, ev), (ref, ref_ev) in zip(got, want):
            assert req.tokens == ref.tokens and ev.finish_reason == ref_ev.finish_reason
            _assert_logprobs_close(req.logprobs, ref.logprobs)
        assert cached.cached_tokens_total == ran1 + len(first) - 1 + 17
        assert cached.prompt_tokens_total == plain.prompt_tokens_total
        # Turn 2's entry starts with request 1's tokens, so it replaced it.
        assert (first + req1.tokens)[:ran1] not in [e.tokens for e in cached.prefix_cache.entries.values()]
    finally:
        cached.stop()
        plain.stop()


def _eventually(cond, timeout: float = 10.0) -> None:
    """A finished request's row is stored right after its last event, on the engine thread."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_prefix_cache_stays_within_its_bytes(model, tok):
    """Least recently used entries go first once the budget is reached, and a row longer than
    the whole budget keeps as many of its first tokens as fit (a chat that outgrows it still
    reuses its start)."""
    one_row = 2 * model.cfg.n_layer * model.cfg.n_kv_head * model.cfg.head_dim * 4  # bytes a token
    eng = Engine(model, tok, max_batch=2, prefix_cache_bytes=45 * one_row).start()
    try:
        params = GenerationParams(max_tokens=4, sampling=GREEDY)
        a, b = tok.encode("abcdefghijklmnop"), tok.encode("0123456789 01234")  # 16 + 3 tokens each
        _turns(eng, [a, b], params)
        pc = eng.prefix_cache
        kept = lambda: [(e.tokens[:3], len(e.tokens)) for e in pc.entries.values()]  # noqa: E731
        # (Each prompt is kept once prefilled, and replaced by its whole row when it ends.)
        _eventually(lambda: kept() == [(a[:3], 19), (b[:3], 19)] and pc.nbytes == 38 * one_row)
        _turns(eng, [tok.encode("Hello, World! The qu")], params)  # 20 + 3: a must go
        _eventually(lambda: kept() == [(b[:3], 19), (tok.encode("Hel"), 23)])
        assert pc.nbytes == (19 + 23) * one_row <= pc.max_bytes
        (_, ev), = _turns(eng, [a], params)
        assert ev.cached_tokens == 0

        long_prompt = tok.encode((TEXT * 2)[:60])
        _turns(eng, [long_prompt], params)
        _eventually(lambda: kept() == [(long_prompt[:3], 45)] and pc.nbytes == 45 * one_row)
        (_, ev), = _turns(eng, [long_prompt], params)
        assert ev.cached_tokens == 45
    finally:
        eng.stop()


def test_a_cached_prefix_and_a_long_prompt_admitted_together(model, tok):
    """A row that starts after a long cached prefix and a fresh long prompt, admitted in the
    same step: one padded pass would run the short rest past the end of its cache row (and of
    the position table), so they go in separate passes; both outputs are right."""
    ctx = model.cfg.context_length  # 128
    long_prefix = tok.encode((TEXT * 2)[:100])
    eng = Engine(model, tok, max_batch=3).start()
    try:
        _turns(eng, [long_prefix], GenerationParams(max_tokens=2, sampling=GREEDY))
        extend = long_prefix + tok.encode("abc")
        fresh = tok.encode((TEXT * 2)[3:63])
        assert 100 + len(fresh) > ctx
        reqs, got = collect(eng, [extend, fresh], GenerationParams(max_tokens=8, sampling=GREEDY))
        assert got[0][-1].cached_tokens == 100 and got[1][-1].cached_tokens == 0
        for req, prompt in zip(reqs, [extend, fresh]):
            assert req.finish_reason == "length"
            assert req.tokens == reference_greedy(model, prompt, 8, tok.eot_id)
    finally:
        eng.stop()


def test_prompt_logprobs_never_come_from_the_prefix_cache(model, tok):
    """Scoring a prompt needs the logits at every position, so it runs whole."""
    eng = Engine(model, tok, max_batch=2).start()
    try:
        prompt = tok.encode("The quick brown fox")
        _turns(eng, [prompt], GenerationParams(max_tokens=3, sampling=GREEDY))
        params = GenerationParams(max_tokens=1, sampling=GREEDY, logprobs=1, prompt_logprobs=True)
        ((req, ev),) = _turns(eng, [prompt], params)
        assert ev.cached_tokens == 0
        with torch.no_grad():
            lp = model(torch.tensor([prompt]))[0][0].log_softmax(-1)
        assert [e[0] for e in req.prompt_logprobs[1:]] == pytest.approx(
            [lp[t - 1, prompt[t]].item() for t in range(1, len(prompt))], abs=1e-5)
    finally:
        eng.stop()


@pytest.mark.parametrize("chunk", [512, 16])
def test_prompts_that_arrive_together_with_a_common_start_share_it(model, tok, monkeypatch, chunk):
    """Continuations of one context, or `n` copies of one prompt, submitted at once: the first
    is prefilled (in one step, or five of 16 tokens), the others wait for it and copy the
    tokens they share with it; every output is what an engine without a prefix cache gives."""
    import scratchlm.engine as engine_mod

    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", chunk)
    context = tok.encode((TEXT * 2)[:70])
    prompts = [context + tok.encode(x) for x in ("abc", "Hello", "xyz")] + [context] * 2
    params = GenerationParams(max_tokens=10, sampling=GREEDY, logprobs=1)
    cached = Engine(model, tok, max_batch=5).start()
    plain = Engine(model, tok, max_batch=5, prefix_cache_bytes=0).start()
    try:
        reqs, got = collect(cached, prompts, params)
        want, _ = collect(plain, prompts, params)
        assert [got[i][-1].cached_tokens for i in range(5)] == [0, 70, 70, 69, 69]
        for req, ref in zip(reqs, want):
            assert req.tokens == ref.tokens
            _assert_logprobs_close(req.logprobs, ref.logprobs)
    finally:
        cached.stop()
        plain.stop()


# --- chunked prefill -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tok, arch):
    """With a chunk of 16 tokens, a 100-token prompt arriving while another request decodes is
    prefilled 16 tokens a step, and the running request gets a token between any two chunks
    (it waited for the whole prompt before); both outputs equal decoding each prompt alone."""
    torch.manual_seed(0)
    extra = dict(n_kv_head=2, bias=False) if arch == "llama" else {}
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=32,
                                    context_length=128, arch=arch, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.0 if "emb" in name else 0.6 if "attn" in name else 0.15)
    model.eval()
    short, long_prompt = tok.encode("Hello"), tok.encode((TEXT * 2)[:100])
    want = [[t for (t,) in generate(model, [p], n, GREEDY, eot_id=None)] for p, n in ((short, 40), (long_prompt, 6))]
    eng = Engine(model, tok, max_batch=2, prefix_cache_bytes=0, prefill_chunk=16).start()
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args: calls.append(tuple(args[0].shape)))
    try:
        running: queue.Queue[Event] = queue.Queue()
        (first,) = eng.submit([short], GenerationParams(max_tokens=40, sampling=GREEDY, ignore_eos=True),
                              running.put)
        running.get(timeout=30)  # decoding
        n = len(calls)
        (second,) = eng.submit([long_prompt], GenerationParams(max_tokens=6, sampling=GREEDY,
                                                               ignore_eos=True), lambda ev: None)
        while not (first.done and second.done):
            time.sleep(0.01)
    finally:
        hook.remove()
        eng.stop()
    assert [first.tokens, second.tokens] == want
    chunks = [i for i, shape in enumerate(calls) if i >= n and shape[1] > 1]
    assert [calls[i] for i in chunks] == [(1, 16)] * 6 + [(1, 4)]
    assert all(calls[i + 1] == (1, 1) for i in chunks[:-1])  # the running row's decode step
    assert calls[chunks[-1] + 1] == (2, 1)  # then both decode together


def test_a_failing_prefix_cache_costs_only_the_reuse(model, tok, monkeypatch):
    """The prefix cache only saves work: when keeping a row fails (out of memory while copying
    it, say), the request that finishes, the ones still running, a cancelled one and the next
    one all go on as without a cache."""
    from scratchlm.prefix_cache import PrefixCache

    def store(self, tokens, cache, row):
        raise torch.OutOfMemoryError("out of memory (injected)")

    monkeypatch.setattr(PrefixCache, "store", store)
    prompt = tok.encode("The quick brown fox")
    eng = Engine(model, tok, max_batch=3).start()
    try:
        long_params = GenerationParams(max_tokens=30, sampling=GREEDY, ignore_eos=True)
        sink: queue.Queue[Event] = queue.Queue()
        (doomed,) = eng.submit([prompt], GenerationParams(max_tokens=100, sampling=GREEDY), sink.put)
        reqs, got = collect(eng, [prompt, prompt[:5]], [long_params, GenerationParams(max_tokens=3, sampling=GREEDY)])
        eng.cancel(doomed)
        again = eng.generate(prompt, GenerationParams(max_tokens=5, sampling=GREEDY))
        assert eng.alive
    finally:
        eng.stop()
    assert [got[i][-1].error for i in range(2)] == [None, None]
    want = [t for (t,) in generate(model, [prompt], 30, GREEDY, eot_id=None)]
    assert reqs[0].tokens == want
    assert again.tokens == reference_greedy(model, prompt, 5, tok.eot_id)


def test_copies_of_a_prompt_do_not_wait_for_a_cache_too_small_to_keep_it(model, tok):
    """Eight copies of a 99-token prompt: with a prefix cache too small for the 32 tokens worth
    waiting for, they are prefilled together as without a cache (two passes of the 512-token
    chunk), not one after another."""
    one_row = 2 * model.cfg.n_layer * model.cfg.n_kv_head * model.cfg.head_dim * 4
    prompt = tok.encode((TEXT * 2)[:99])
    passes = []
    hook = model.register_forward_pre_hook(
        lambda mod, args: passes.append(tuple(args[0].shape)) if args[0].shape[1] > 1 else None)
    eng = Engine(model, tok, max_batch=8, prefix_cache_bytes=10 * one_row)
    try:
        reqs = eng.submit([prompt] * 8, GenerationParams(max_tokens=2, sampling=GREEDY), lambda ev: None)
        eng.start()
        _eventually(lambda: all(r.done for r in reqs))
    finally:
        hook.remove()
        eng.stop()
    assert passes == [(6, 99), (3, 99)]
    assert len({tuple(r.tokens) for r in reqs}) == 1


def test_a_row_cancelled_while_prefilling_does_not_hold_back_a_ready_one(model, tok, monkeypatch):
    """A client that goes away while its long prompt is prefilled (after the step's first look
    at cancellations): the row behind it that finished its prompt in that step still decodes in
    the same step."""
    import scratchlm.engine as engine_mod

    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 8)
    decoded = []

    class CancelMidStep(Engine):
        victim = None

        def _prefill_step(self, admitted):
            if self.victim is not None and self.victim.computed >= 8:
                self.victim.cancelled = True  # what cancel() does, at the worst moment
            super()._prefill_step(admitted)

        def _decode_step(self):
            decoded.append([(r.prefilled, r.cancelled) for r in self._active])
            super()._decode_step()

    eng = CancelMidStep(model, tok, max_batch=2, prefix_cache_bytes=0)
    long_prompt, short = tok.encode((TEXT * 2)[:40]), tok.encode("Hello")
    a, b = eng.submit([long_prompt, short], GenerationParams(max_tokens=5, sampling=GREEDY, ignore_eos=True),
                      lambda ev: None)
    eng.victim = a
    eng.start()
    try:
        _eventually(lambda: a.done and b.done)
    finally:
        eng.stop()
    assert a.finish_reason == "cancelled"
    for rows in decoded:  # no ready row ever sits behind one that is not
        ready = [p and not c for p, c in rows]
        assert ready == sorted(ready, reverse=True), rows
    want = [t for (t,) in generate(model, [short], 5, GREEDY, eot_id=None)]
    assert b.tokens == want


def test_a_request_whose_sampling_fails_fails_alone(model, tok, monkeypatch):
    """A bug in sampling (injected for two sampling settings) ends only the requests sampled in
    that call, at their first token or later; those beside them finish as without it."""
    import scratchlm.engine as engine_module

    real = engine_module.sample_next_token
    calls = {0.5: 0, 0.6: 0}

    def flaky(logits, cfg, *args, **kwargs):
        if cfg.temperature in calls:
            calls[cfg.temperature] += 1
            if cfg.temperature == 0.5 or calls[0.6] > 3:  # at the first token / in a decode step
                raise RuntimeError("a sampling bug (injected)")
        return real(logits, cfg, *args, **kwargs)

    monkeypatch.setattr(engine_module, "sample_next_token", flaky)
    prompt = tok.encode("The quick brown fox")
    greedy = GenerationParams(max_tokens=20, sampling=GREEDY, ignore_eos=True)
    eng = Engine(model, tok, max_batch=4).start()
    try:
        reqs, got = collect(eng, [prompt, prompt, prompt[:6], prompt], [
            greedy, GenerationParams(max_tokens=20, sampling=SamplingConfig(temperature=0.5)),
            greedy, GenerationParams(max_tokens=20, sampling=SamplingConfig(temperature=0.6))])
        assert eng.alive
    finally:
        eng.stop()
    assert [got[i][-1].finish_reason for i in range(4)] == ["length", "error", "length", "error"]
    assert "sampling bug" in got[1][-1].error and len(reqs[3].tokens) == 3
    assert reqs[0].tokens == [t for (t,) in generate(model, [prompt], 20, GREEDY, eot_id=None)]
    assert reqs[2].tokens == [t for (t,) in generate(model, [prompt[:6]], 20, GREEDY, eot_id=None)]
