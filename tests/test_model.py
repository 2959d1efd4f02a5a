"""Model invariants: causality, KV cache == full recompute, per-row cache positions, init."""

import math

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.model import SMALL_GELU_CPU, KVCache, Transformer, gelu

FAMILIES = {
    "gpt2": dict(arch="gpt2"),
    "llama": dict(arch="llama", n_kv_head=2, bias=False),
    "llama-untied": dict(arch="llama", n_kv_head=4, bias=False, tie_embeddings=False),
}


def tiny(name: str, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, n_layer=2, n_head=4, d_model=32, context_length=48,
                      **{**FAMILIES[name], **kw})
    return Transformer(cfg).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_causal_future_tokens_never_change_past_logits(name):
    model = tiny(name)
    idx = torch.randint(0, 61, (2, 30))
    base, _ = model(idx)
    for t in (0, 7, 29):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 61
        out, _ = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"position < {t} saw token {t}"
        assert not torch.allclose(out[:, t:], base[:, t:])  # the change itself is visible


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("prefill", [[15], [10, 22, 30]], ids=["prefill", "chunked-prefill"])
def test_cached_decoding_equals_full_forward(name, prefill):
    """Prefill (in one piece, or in chunks after the first, which start at a position > 0 and
    must not see their own later tokens), then one token at a time: logits equal a full pass."""
    model = tiny(name)
    idx = torch.randint(0, 61, (3, 40))
    full, _ = model(idx)
    cache = KVCache(model.cfg, 3)
    bounds = [0, *prefill]
    steps = [model(idx[:, a:b], cache=cache)[0] for a, b in zip(bounds, bounds[1:])]
    steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(prefill[-1], 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [40, 40, 40]


@pytest.mark.parametrize("prefill", ["row-by-row", "padded"])
@pytest.mark.parametrize("name", FAMILIES)
def test_cache_rows_advance_independently(name, prefill):
    """Rows prefilled to different lengths (one row at a time, or all in one pass with the
    short ones padded), then decoded together, match the full forward."""
    model = tiny(name)
    idx = torch.randint(0, 61, (3, 30))
    full, _ = model(idx)
    cache = KVCache(model.cfg, 4)  # one spare row that stays unused
    lengths = [4, 11, 20]
    if prefill == "row-by-row":
        for row, n in enumerate(lengths):
            model(idx[row : row + 1, :n], cache=cache, rows=torch.tensor([row]))
    else:
        padded = idx[:, :20].clone()
        for row, n in enumerate(lengths):
            padded[row, n:] = 60  # tokens the rows must never see
        last, _ = model(padded, cache=cache, rows=torch.tensor([0, 1, 2]), last_only=True,
                        lengths=lengths)
        want = torch.stack([full[r, n - 1] for r, n in enumerate(lengths)])
        torch.testing.assert_close(last[:, 0], want, atol=1e-5, rtol=1e-5)
    for k in range(5):
        feed = torch.stack([idx[r, n + k] for r, n in enumerate(lengths)])[:, None]
        out, _ = model(feed, cache=cache, rows=torch.tensor([0, 1, 2]))
        want = torch.stack([full[r, n + k] for r, n in enumerate(lengths)])
        torch.testing.assert_close(out[:, 0], want, atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [9, 16, 25, 0]


def test_reset_row_reuses_slot_without_seeing_stale_keys():
    model = tiny("llama")
    a, b = torch.randint(0, 61, (1, 20)), torch.randint(0, 61, (1, 6))
    cache = KVCache(model.cfg, 1)
    model(a, cache=cache)
    cache.reset([0])
    out, _ = model(b, cache=cache, rows=torch.tensor([0]))
    ref, _ = model(b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_context_is_rejected():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_loss_ignores_masked_targets_and_sum_matches_mean():
    model = tiny("gpt2")
    idx = torch.randint(0, 61, (2, 16))
    targets = torch.randint(0, 61, (2, 16))
    targets[:, :5] = -100
    logits, mean = model(idx, targets)
    _, total = model(idx, targets, reduction="sum")
    manual = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 61), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(mean, manual)
    torch.testing.assert_close(total / 22, mean)


def test_init_weights_table():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, n_layer=8, n_head=4, d_model=256, context_length=64)
    model = Transformer(cfg)
    resid = model.blocks[0].attn.proj.weight.std().item()
    plain = model.blocks[0].attn.qkv.weight.std().item()
    assert abs(plain - 0.02) < 0.002
    assert abs(resid - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.001
    assert model.blocks[0].mlp.up.bias.abs().max() == 0
    assert model.lm_head.weight is model.tok_emb.weight
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002


def test_param_count_and_flops_of_small_preset():
    from scratchlm.config import load_run_config

    cfg = load_run_config("small").model
    cfg.vocab_size = 65
    model = Transformer(cfg)
    # The 10.65M shakespeare model: every weight counted once, position embeddings excluded.
    assert round(model.num_params() / 1e6, 2) == 10.65
    assert model.flops_per_token() > 6 * model.num_params()


def test_rows_none_uses_the_first_rows_of_a_larger_cache():
    """A batch smaller than the cache decodes rows 0..B-1 without touching the others."""
    model = tiny("gpt2")
    idx = torch.randint(0, 61, (2, 12))
    full, _ = model(idx)
    cache = KVCache(model.cfg, 5)
    model(idx[:, :8], cache=cache)
    out, _ = model(idx[:, 8:], cache=cache)
    torch.testing.assert_close(out, full[:, 8:], atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [12, 12, 0, 0, 0]


@pytest.mark.parametrize("numel", [1536, SMALL_GELU_CPU + 1], ids=["torch-kernel", "onednn"])
def test_gelu_matches_torch_on_both_cpu_paths(numel):
    x = torch.randn(1, numel, requires_grad=True)
    ref = torch.nn.functional.gelu(x)
    out = gelu(x, "none")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, g_ref, atol=2e-6, rtol=0)
    assert torch.equal(gelu(x, "tanh"), torch.nn.functional.gelu(x, approximate="tanh"))
    assert torch.backends.mkldnn.enabled  # the process-wide switch is put back
