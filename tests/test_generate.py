"""The sampling core: cached == uncached greedy decoding, batching, each sampling filter, stop
strings and streaming."""

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import UserError
from scratchlm.generate import SamplingConfig, generate, generate_text, sample_next_token
from scratchlm.model import Transformer
from scratchlm.tokenizer import train_char

TEXT = "the quick brown fox jumps over the lazy dog. " * 4


def tiny(arch: str, vocab: int, context: int = 96) -> Transformer:
    torch.manual_seed(1)
    kw = dict(n_kv_head=2, bias=False) if arch == "llama" else {}
    return Transformer(ModelConfig(arch=arch, vocab_size=vocab, n_layer=2, n_head=4, d_model=32,
                                   context_length=context, **kw)).eval()


def run(model, prompts, n, sampling, use_cache, eot=None, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    rows = [[] for _ in prompts]
    for step in generate(model, prompts, n, sampling, eot, use_cache, gen):
        for r, t in zip(rows, step):
            if t is not None:
                r.append(t)
    return rows


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_with_and_without_cache_identical(arch):
    model = tiny(arch, 50)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]
    greedy = SamplingConfig(temperature=0)
    assert run(model, prompts, 40, greedy, True) == run(model, prompts, 40, greedy, False)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_ragged_prompts_equal_one_by_one(arch):
    model = tiny(arch, 50)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    greedy = SamplingConfig(temperature=0)
    together = run(model, prompts, 25, greedy, True)
    alone = [run(model, [p], 25, greedy, True)[0] for p in prompts]
    assert together == alone


def test_sampling_with_cache_matches_without_for_same_seed():
    model = tiny("llama", 50)
    cfg = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9)
    assert run(model, [[1, 2, 3]], 30, cfg, True, seed=7) == run(model, [[1, 2, 3]], 30, cfg, False, seed=7)
    assert run(model, [[1, 2, 3]], 30, cfg, True, seed=7) != run(model, [[1, 2, 3]], 30, cfg, True, seed=8)


def test_stops_at_eot_and_counts_only_new_tokens():
    model = tiny("gpt2", 50)
    greedy = SamplingConfig(temperature=0)
    free = run(model, [[1, 2, 3]], 20, greedy, True)[0]
    assert len(free) == 20  # max_new_tokens counts new tokens, not the prompt
    eot = free[5]
    stopped = run(model, [[1, 2, 3]], 20, greedy, True, eot=eot)[0]
    assert stopped == free[: free.index(eot) + 1]


def test_prompt_that_does_not_fit_is_a_user_error():
    model = tiny("gpt2", 50, context=16)
    with pytest.raises(UserError, match="context of 16"):
        list(generate(model, [[1] * 10], 7, SamplingConfig(temperature=0)))
    with pytest.raises(UserError, match="empty"):
        list(generate(model, [[]], 1, SamplingConfig(temperature=0)))


def test_filters_keep_only_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    top_k = sample_next_token(logits, SamplingConfig(temperature=1.0, top_k=2), g)
    assert set(top_k.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)
    # top_p keeps the smallest prefix whose mass reaches p
    p = float(probs[:2].sum()) + 1e-3
    top_p = sample_next_token(logits, SamplingConfig(temperature=1.0, top_p=p), g)
    assert set(top_p.tolist()) == {0, 1, 2}
    min_p = sample_next_token(logits, SamplingConfig(temperature=1.0, min_p=float(probs[2] / probs[0]) - 1e-4), g)
    assert set(min_p.tolist()) == {0, 1, 2}
    assert sample_next_token(logits[:1], SamplingConfig(temperature=0)).item() == 0
    # A top_p too small for float32 (it rounds to 0) still keeps the most likely token.
    tiny = sample_next_token(logits[:50], SamplingConfig(temperature=1.0, top_p=1e-50), g)
    assert set(tiny.tolist()) == {0}


def test_repetition_penalty_demotes_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    history = torch.tensor([[0]])
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.5)
    assert sample_next_token(logits, greedy, history=history).item() == 1
    neg = SamplingConfig(temperature=0, repetition_penalty=1.5)
    out = sample_next_token(torch.tensor([[-1.0, -1.2]]), neg, history=torch.tensor([[0]]))
    assert out.item() == 1  # negative logits are multiplied, pushing them further down


def test_logit_bias_bans_and_forces_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0], [0.0, 3.0, 1.0]])
    ban = SamplingConfig(temperature=0, logit_bias=((1, -100.0),))
    assert sample_next_token(logits, ban).tolist() == [0, 2]
    force = SamplingConfig(temperature=1.0, logit_bias=((2, 100.0),))
    assert sample_next_token(logits, force, torch.Generator().manual_seed(0)).tolist() == [2, 2]
    with pytest.raises(UserError, match="logit_bias"):
        SamplingConfig(logit_bias=((1, 101.0),))


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.tensor([[2.0, 1.5, 1.0]])
    generated = torch.tensor([[0, 0, 3]])  # token 0 twice, then padding (id V = 3)
    freq = SamplingConfig(temperature=0, frequency_penalty=0.3)  # 2.0 - 2 x 0.3 < 1.5
    assert sample_next_token(logits, freq, generated=generated).item() == 1
    once = SamplingConfig(temperature=0, presence_penalty=0.3)  # 2.0 - 0.3 > 1.5: once, not twice
    assert sample_next_token(logits, once, generated=generated).item() == 0
    assert sample_next_token(logits, SamplingConfig(temperature=0, presence_penalty=0.6),
                             generated=generated).item() == 1
    # The prompt does not count (unlike the repetition penalty's history).
    assert sample_next_token(logits, freq, history=torch.tensor([[0, 0]])).item() == 0
    # In generate(): a greedy run that repeats itself repeats less with a frequency penalty.
    model = tiny("gpt2", 50)
    plain = run(model, [[1, 2, 3]], 40, SamplingConfig(temperature=0), True)[0]
    penalised = run(model, [[1, 2, 3]], 40, SamplingConfig(temperature=0, frequency_penalty=2.0), True)[0]
    assert len(set(penalised)) > len(set(plain))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0), dict(top_p=1.5),
                                 dict(min_p=2), dict(repetition_penalty=0), dict(presence_penalty=2.5),
                                 dict(frequency_penalty=-3), dict(temperature=float("nan")),
                                 dict(temperature=float("inf")), dict(repetition_penalty=float("nan")),
                                 dict(top_p=float("nan")), dict(presence_penalty=float("nan"))])
def test_invalid_sampling_is_user_error(bad):
    with pytest.raises(UserError):
        SamplingConfig(**bad)


def test_generate_text_streams_exactly_the_final_text_and_honours_stop():
    tok = train_char([TEXT])
    model = tiny("gpt2", tok.vocab_size)
    pieces = []
    greedy = SamplingConfig(temperature=0)
    [free] = generate_text(model, tok, ["the "], 30, greedy)
    assert free.new_tokens == 30 and free.finish_reason == "length"
    [res] = generate_text(model, tok, ["the "], 30, greedy, on_text=lambda i, s: pieces.append(s))
    assert "".join(pieces) == res.text == free.text
    stop = free.text[10:12]
    pieces.clear()
    [cut] = generate_text(model, tok, ["the "], 30, greedy, stop=[stop], on_text=lambda i, s: pieces.append(s))
    assert cut.text == free.text[: free.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text


def test_unknown_character_in_prompt_is_user_error():
    tok = train_char([TEXT])
    model = tiny("gpt2", tok.vocab_size)
    with pytest.raises(UserError):
        generate_text(model, tok, ["Zebra!"], 5, SamplingConfig(temperature=0))
