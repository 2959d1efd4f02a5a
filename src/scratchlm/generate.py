"""Generation: the ONLY sampling code in scratchlm.

`sample_next_token()` turns logits into token ids; `generate()` runs a model over a batch of
token-id prompts and streams new ids step by step (with the KV cache by default);
`generate_text()` adds the tokenizer: stop strings, streaming text and timing. The CLI
(`scratchlm generate`), the server's engine and in-training samples all use these.

Sampling order, the same everywhere (Hugging Face's, with OpenAI's logit bias and penalties
where vLLM applies them): logit bias -> repetition penalty -> presence and frequency penalties
-> temperature (0 = greedy) -> top-k -> top-p -> min-p -> sample.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from scratchlm.errors import UserError
from scratchlm.model import KVCache, Transformer


MIN_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily."""

FLOAT_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingConfig:
    """How to pick the next token. Validated on construction."""

    temperature: float = 1.0
    """0 (or below MIN_TEMPERATURE) means greedy (argmax); higher flattens the distribution."""
    top_k: int | None = None
    """Keep only the k most likely tokens."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability sums to at least p (nucleus)."""
    min_p: float | None = None
    """Drop tokens whose probability is below min_p times the most likely token's."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already present in the sequence, prompt included (CTRL-style)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated so far (OpenAI's; -2 to 2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated so far (OpenAI's; -2 to 2)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits first (OpenAI's; -100 bans, 100 forces)."""

    def __post_init__(self) -> None:
        # Written as "not (in range)" so that NaN, which compares false with everything, fails.
        if not 0 <= self.temperature < math.inf:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UserError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for tok, bias in self.logit_bias:
            if tok < 0 or not -100 <= bias <= 100:
                raise UserError(f"logit_bias needs token ids >= 0 and biases in [-100, 100], got {tok}: {bias}")

    @property
    def penalised(self) -> bool:
        """Sampling depends on the sequence so far (each row needs its own history)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        # As vLLM: a temperature this close to 0 is greedy (dividing by it overflows fp32).
        return self.temperature < MIN_TEMPERATURE


def sample_next_token(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    history: torch.Tensor | None = None,
    generated: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits: (B, V) -> next token ids (B,). history: (B, L) ids already in each sequence
    (prompt included), for the repetition penalty; generated: (B, G) ids each row generated so
    far, padded with V, for the presence and frequency penalties."""
    logits = logits.float()
    if cfg.logit_bias:
        ids, biases = zip(*cfg.logit_bias)
        logits = logits.index_add(1, torch.tensor(ids, device=logits.device),
                                  torch.tensor(biases, device=logits.device).expand(logits.shape[0], -1))
    if cfg.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if (cfg.presence_penalty or cfg.frequency_penalty) and generated is not None and generated.numel():
        B, V = logits.shape
        counts = torch.zeros(B, V + 1, device=logits.device)  # the last column takes the padding
        counts.scatter_add_(1, generated, torch.ones(generated.shape, device=logits.device))
        counts = counts[:, :V]
        logits = logits - cfg.frequency_penalty * counts - cfg.presence_penalty * (counts > 0).float()
    if cfg.greedy:
        return logits.argmax(dim=-1)
    # A tiny penalty or temperature can push logits to +-inf, and inf - inf is NaN in softmax:
    # clamp to the largest finite values (tokens that overflowed then tie for the top).
    logits = (logits / cfg.temperature).clamp(-FLOAT_MAX, FLOAT_MAX)
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= cfg.top_p
        drop_sorted[:, 0] = False  # also when top_p is below float32's range (it rounds to 0)
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    if cfg.min_p is not None and cfg.min_p > 0:
        floor = cfg.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_fits(prompt_len: int, max_new_tokens: int, context_length: int) -> None:
    """A prompt plus the tokens asked for must fit the context: say so plainly if not."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len == 0:
        raise UserError("the prompt is empty: give at least one token of text")
    if prompt_len + max_new_tokens > context_length:
        raise UserError(
            f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
            f"context of {context_length} tokens; shorten the prompt or ask for fewer tokens"
        )


def check_seed(seed: int) -> None:
    if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise UserError(f"seed must be in [-2**63, 2**64), got {seed}")


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig,
    eot_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[list[int | None]]:
    """Yield, per decoding step, one new id per prompt (None once that prompt has finished).

    A prompt finishes at `eot_id` (which is yielded) or after `max_new_tokens` new tokens.
    With `use_cache`, each prompt is prefilled once and every later step feeds only the newest
    token; without it, every step re-runs the whole sequence (the baseline the cache must beat).
    """
    model.eval()
    device = next(model.parameters()).device
    ctx = model.cfg.context_length
    for p in prompts:
        check_fits(len(p), max_new_tokens, ctx)
    B = len(prompts)
    seqs = [list(p) for p in prompts]
    done = [False] * B
    cache = None
    last_logits: torch.Tensor  # (B, V)
    if use_cache:
        longest = max(len(p) for p in prompts) + max_new_tokens
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.cfg, B, max_len=longest, device=device, dtype=dtype)
        # One prefill pass for all prompts, short ones padded (see Transformer.forward).
        logits, _ = model(padded_batch(prompts, device), cache=cache, last_only=True,
                          lengths=[len(p) for p in prompts])
        last_logits = logits[:, -1]
    else:
        last_logits = _full_forward_last(model, seqs, device)
    for _ in range(max_new_tokens):
        history = _history(seqs, device) if sampling.repetition_penalty != 1.0 else None
        generated = None
        if sampling.presence_penalty or sampling.frequency_penalty:
            new = [s[len(p):] for s, p in zip(seqs, prompts)]
            generated = padded_batch(new, device, pad=last_logits.shape[-1]) if any(new) else None
        nxt = sample_next_token(last_logits, sampling, generator, history, generated).tolist()
        out: list[int | None] = []
        for b in range(B):
            if done[b]:
                out.append(None)
                continue
            seqs[b].append(nxt[b])
            out.append(nxt[b])
            if (eot_id is not None and nxt[b] == eot_id) or len(seqs[b]) - len(prompts[b]) >= max_new_tokens:
                done[b] = True
        yield out
        if all(done):
            return
        if cache is not None:
            # Finished rows keep decoding a dummy token: cheaper than reshaping the batch.
            feed = torch.tensor([[s[-1]] for s in seqs], device=device)  # (B, 1)
            logits, _ = model(feed, cache=cache)
            last_logits = logits[:, -1]
        else:
            last_logits = _full_forward_last(model, seqs, device)


def padded_batch(prompts: list[list[int]], device: torch.device | str = "cpu", pad: int = 0) -> torch.Tensor:
    """(B, longest) ids, shorter prompts padded at the end, for a prefill with `lengths`
    (`Transformer.forward`): the padding's id does not matter, no real token sees it."""
    T = max(len(p) for p in prompts)
    return torch.tensor([p + [pad] * (T - len(p)) for p in prompts], device=device)


def _full_forward_last(model: Transformer, seqs: list[list[int]], device) -> torch.Tensor:
    """Uncached: run every sequence from its start and keep the last position's logits."""
    if len({len(s) for s in seqs}) == 1:
        logits, _ = model(torch.tensor(seqs, device=device), last_only=True)
        return logits[:, -1]
    return torch.stack([model(torch.tensor([s], device=device), last_only=True)[0][0, -1] for s in seqs])


def _history(seqs: list[list[int]], device) -> torch.Tensor:
    """(B, L) ids for the repetition penalty; short rows are padded by repeating their first id."""
    L = max(len(s) for s in seqs)
    return torch.tensor([s + [s[0]] * (L - len(s)) for s in seqs], device=device)


@dataclass
class Generation:
    """The result of generating from one prompt."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length"
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    extra: dict = field(default_factory=dict)


def generate_text(
    model: Transformer,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    sampling: SamplingConfig,
    stop: list[str] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Generation]:
    """Generate from text prompts; `on_text(i, piece)` streams each prompt's new text as it
    becomes final (stop strings and incomplete UTF-8 sequences are held back until decided)."""
    ids = [tokenizer.encode(p) for p in prompts]
    generator = None
    if seed is not None:
        check_seed(seed)
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    stop = [s for s in (stop or []) if s]
    new: list[list[int]] = [[] for _ in prompts]
    emitted = [0] * len(prompts)  # characters of new text already streamed
    finished: list[str | None] = [None] * len(prompts)
    texts = [""] * len(prompts)
    t0 = time.perf_counter()
    t_first = None
    for step_ids in generate(model, ids, max_new_tokens, sampling, tokenizer.eot_id, use_cache, generator):
        if t_first is None:
            t_first = time.perf_counter()
        for b, tok in enumerate(step_ids):
            if tok is None or finished[b]:
                continue
            if tok == tokenizer.eot_id:
                finished[b] = "stop"
            else:
                new[b].append(tok)
            text = tokenizer.decode(new[b], skip_special_tokens=True)  # as the server's text
            cut = find_stop(text, stop)
            if cut is not None:
                text, finished[b] = text[:cut], "stop"
            texts[b] = text
            final = text if finished[b] else stable_prefix(text, stop)
            if on_text is not None and len(final) > emitted[b]:
                on_text(b, final[emitted[b]:])
            emitted[b] = max(emitted[b], len(final))
        if all(finished):
            break
    t_end = time.perf_counter()
    results = []
    prefill_s = (t_first or t_end) - t0
    for b in range(len(prompts)):
        if on_text is not None and len(texts[b]) > emitted[b]:
            on_text(b, texts[b][emitted[b]:])
        n_new = len(new[b])
        decode_s = t_end - (t_first or t_end)
        results.append(Generation(
            text=texts[b], tokens=new[b], prompt_tokens=len(ids[b]), new_tokens=n_new,
            finish_reason=finished[b] or "length",
            prefill_tokens_per_s=sum(len(i) for i in ids) / prefill_s if prefill_s > 0 else 0.0,
            decode_tokens_per_s=(n_new - 1) / decode_s if decode_s > 0 and n_new > 1 else 0.0,
        ))
    return results


def find_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None


def stable_prefix(text: str, stop: list[str]) -> str:
    """The part of text that can no longer change: hold back a trailing replacement char (an
    incomplete multi-byte character) and any tail that could still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return text[:end]
