"""The decoder-only transformer, written from torch primitives, and its KV cache.

One `Transformer` serves two families chosen by `ModelConfig.arch`:

| piece      | gpt2                          | llama                               |
|------------|-------------------------------|-------------------------------------|
| norm       | LayerNorm (optional bias)     | RMSNorm                             |
| positions  | learned absolute embeddings   | rotary (RoPE, rotate-half layout)   |
| MLP        | GELU (exact or tanh), 4*d     | SwiGLU, ~8/3*d                      |
| attention  | multi-head                    | grouped-query (n_kv_head <= n_head) |

Attention always goes through `F.scaled_dot_product_attention` and is always causal: without a
cache `is_causal=True`; with a cache the mask is built here from each row's positions, so no
caller can make attention see the future. Used by `scratchlm train`, `generate`, `serve`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.config import ModelConfig


# Up to this many tokens, bf16 attention on CPU runs in fp32 (see Attention.forward).
SHORT_BF16_CPU = 128


class KVCache:
    """Preallocated keys and values for every layer, with a position per batch row.

    Row b holds tokens 0..pos[b]-1. Rows advance independently, which is what continuous
    batching needs: a server can reset one row for a new request while others keep decoding.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or cfg.context_length
        if self.max_len > cfg.context_length:
            raise ValueError(f"cache length {self.max_len} > context_length {cfg.context_length}")
        shape = (batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)  # (B, nkv, L, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pos = torch.zeros(batch_size, dtype=torch.long)  # on CPU: read every step
        self.batch_size = batch_size

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget rows (all when None); their stale entries are masked out by position."""
        if rows is None:
            self.pos.zero_()
        else:
            self.pos[rows] = 0


class _Step:
    """Per-forward cache bookkeeping shared by all layers: where to write, what to attend to.

    Positions are read once into Python ints: a decode step is ~300 tiny ops, so the dozen
    tensor ops this bookkeeping would otherwise cost per step are measurable (see
    docs/performance.md, section 5, "Per-token overhead")."""

    def __init__(self, cache: KVCache, rows: torch.Tensor | None, T: int, B: int | None = None) -> None:
        self.cache = cache
        pos = cache.pos[:B] if rows is None else cache.pos[rows]  # rows None: rows 0..B-1
        starts = pos.tolist()
        start = starts[0]
        self.uniform = rows is None and all(p == start for p in starts)
        self.length = max(starts) + T  # keys to attend over
        if self.length > cache.max_len:
            raise ValueError(f"sequence of {self.length} tokens exceeds cache length {cache.max_len}")
        self.rows = rows
        self.start, self.T = start, T
        device = cache.k[0].device
        if self.uniform:
            positions = torch.arange(start, start + T)[None, :]  # (1, T): the same for every row
        else:
            positions = pos[:, None] + torch.arange(T)  # (B, T)
        if self.uniform and (T == 1 or start == 0):
            self.mask = None  # one new token sees everything before it; a prefill from 0 is plain causal
        else:
            keys = torch.arange(self.length)
            self.mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1).to(device)
        self.positions = positions.to(device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, nkv, T, hs) keys/values; return the keys/values to attend to."""
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        B = k.shape[0]
        if self.uniform:
            if B < ck.shape[0]:  # rows 0..B-1 of a larger cache
                ck, cv = ck[:B], cv[:B]
            ck.narrow(2, self.start, self.T).copy_(k)
            cv.narrow(2, self.start, self.T).copy_(v)
            return ck.narrow(2, 0, self.length), cv.narrow(2, 0, self.length)
        rows = torch.arange(B) if self.rows is None else self.rows
        rows = rows.to(ck.device)
        ck[rows[:, None], :, self.positions] = k.transpose(1, 2)  # (B, T, nkv, hs)
        cv[rows[:, None], :, self.positions] = v.transpose(1, 2)
        if self.rows is None:  # rows 0..B-1: attend through views, no copy
            return ck[:B, :, : self.length], cv[:B, :, : self.length]
        # index_select on the sliced cache: the same rows as ck[rows, :, :length], ~10x faster on CPU.
        return ck[:, :, : self.length].index_select(0, rows), cv[:, :, : self.length].index_select(0, rows)

    def causal(self) -> bool:
        return self.uniform and self.start == 0 and self.T > 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as the llama reference does) so bf16 activations keep precision.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (context_length, head_dim) in the rotate-half layout."""
    hs = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
    angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Residual dropout; a no-op (not even a kernel call) outside training or at p = 0."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


# Below this many numbers exact GELU runs in torch's own kernel instead of oneDNN's. On CPU,
# F.gelu hands exact (erf) GELU on fp32/bf16 to oneDNN, which costs ~12-17 us and a wake-up of
# the thread pool however small the tensor: a decode step's 1,536 numbers took 52 us in place
# against ~4 us in torch's kernel on the 2-core CPU. Past ~16k-32k numbers oneDNN is faster.
SMALL_GELU_CPU = 16384


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """F.gelu(x, approximate=approximate), through the faster CPU kernel for its size."""
    if approximate == "none" and x.device.type == "cpu" and x.numel() <= SMALL_GELU_CPU \
            and torch.backends.mkldnn.enabled:
        # The switch is process-wide; other threads' ops stay correct meanwhile (oneDNN is only
        # ever a faster path, never a different result beyond rounding).
        torch.backends.mkldnn.enabled = False
        try:
            return F.gelu(x)
        finally:
            torch.backends.mkldnn.enabled = True
    return F.gelu(x, approximate=approximate)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hs); cos/sin: (B or 1, 1, T, hs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


# Inside a block nothing goes through nn.Module.__call__: linears are applied as
# F.linear(x, layer.weight, layer.bias) and the norms, attention and MLP through .forward. The
# call machinery (hook checks, attribute lookups) was ~25% of the Python time of a batch-1
# decode step on the 2-core CPU (cProfile), ~9 us a call, for identical arithmetic. The modules
# stay: they name the weights (state dict, export) and own their init. Hooks belong on whole
# blocks (DDP wraps the model; a block is the unit to shard or checkpoint).


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # One fused projection for q, k and v: one matmul instead of three.
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.attn_dropout = cfg.attn_dropout
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        step: _Step | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)  # (B, T, (nh + 2 nkv) hs)
        qkv = qkv.view(B, T, nh + 2 * nkv, hs).transpose(1, 2)  # (B, nh + 2 nkv, T, hs)
        q, k, v = qkv.split([nh, nkv, nkv], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs) x 2
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = nkv != nh
        if step is None:
            p = self.attn_dropout if self.training else 0.0
            if q.dtype == torch.bfloat16 and q.device.type == "cpu" and T <= SHORT_BF16_CPU:
                # torch's CPU attention kernels are slower in bf16 than fp32 at short lengths
                # (shakespeare-char step, T=64, hs=32: 20 ms fp32 flash, 24 ms bf16 math, 27 ms
                # bf16 flash); past ~128 tokens bf16 wins. Upcasting is also more precise.
                with torch.autocast("cpu", enabled=False):
                    y = F.scaled_dot_product_attention(
                        q.float(), k.float(), v.float(), is_causal=True, dropout_p=p, enable_gqa=gqa
                    ).to(q.dtype)
            else:
                y = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, dropout_p=p, enable_gqa=gqa
                )  # (B, nh, T, hs)
        else:
            k, v = step.update(layer, k, v)  # (B, nkv, S, hs)
            if k.dtype != q.dtype:  # an fp32 cache read under autocast
                k, v = k.to(q.dtype), v.to(q.dtype)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=step.mask, is_causal=step.causal(), enable_gqa=gqa
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return dropout(F.linear(y, self.proj.weight, self.proj.bias), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        self.gelu_approximate = cfg.gelu_approximate
        # SwiGLU's gate and up projections are fused into one matmul.
        up_out = 2 * cfg.d_ff if self.swiglu else cfg.d_ff
        self.up = nn.Linear(cfg.d_model, up_out, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.up.weight, self.up.bias)  # (B, T, d_ff or 2*d_ff)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = gelu(h, self.gelu_approximate)
        h = F.linear(h, self.down.weight, self.down.bias)  # (B, T, C)
        return dropout(h, self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, step, layer):  # (B, T, C) -> (B, T, C)
        # .forward, not __call__: see the note above Attention (24 calls a decode step of `small`).
        x = x + self.attn.forward(self.norm1.forward(x), rope, step, layer)
        return x + self.mlp.forward(self.norm2.forward(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (train sets it from the data)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation lives here.

        | parameter                                  | init                           |
        |--------------------------------------------|--------------------------------|
        | token and position embeddings              | normal(0, 0.02)                |
        | linear weights (qkv, MLP up, untied head)  | normal(0, 0.02)                |
        | residual outputs (attn.proj, mlp.down)     | normal(0, 0.02 / sqrt(2 * n_layer)) |
        | linear biases                              | 0                              |
        | norm weights / biases                      | 1 / 0                          |

        The scaled residual init keeps the residual stream's variance from growing with depth
        (GPT-2 paper, section 2.3).
        """
        std = 0.02
        resid_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_resid = name.endswith("attn.proj") or name.endswith("mlp.down")
                nn.init.normal_(module.weight, mean=0.0, std=resid_std if is_resid else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.cfg.tie_embeddings:  # the loop above re-initialised the shared matrix as Linear
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        last_only: bool = False,
        reduction: str = "mean",
        lengths: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids -> logits (B, T, V) (or (B, 1, V) with last_only) and loss.

        targets: (B, T) ids, -100 where no loss is wanted; `reduction="sum"` lets the trainer
        normalise by the token count of a whole accumulated batch.
        cache/rows: decode against `cache`; `rows` picks which cache rows idx's rows are
        (default: rows 0..B-1). Positions continue from each row's `cache.pos`, which advances.
        lengths: with a cache, prompts of different lengths in one pass: row b's tokens are
        idx[b, :lengths[b]] and the rest is padding. Each row's position advances by its own
        length (the padding's keys stay in the cache beyond it, masked out by position and
        overwritten by the row's next tokens), and last_only gives each row's last real token.
        Causality keeps the padding, which comes last, out of every real token's view.
        """
        B, T = idx.shape
        if lengths is not None and (cache is None or len(lengths) != B or not 0 < min(lengths) <= max(lengths) <= T):
            raise ValueError(f"lengths {lengths} need a cache and one length in 1..{T} per row")
        step = _Step(cache, rows, T, B) if cache is not None else None
        if step is None:
            if T > self.cfg.context_length:
                raise ValueError(f"sequence of {T} tokens > context_length {self.cfg.context_length}")
            positions = torch.arange(T, device=idx.device)[None, :]  # (1, T)
        else:
            positions = step.positions  # (B, T)
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)  # (B, T, C)
        else:
            rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, step, i)
        x = self.norm_f(x)
        if cache is not None:
            advance = T if lengths is None else torch.tensor(lengths)
            if rows is None:
                cache.pos[:B] += advance
            else:
                cache.pos[rows] += advance
        if last_only:
            if lengths is None or min(lengths) == T:
                x = x[:, -1:, :]
            else:
                x = x[torch.arange(B, device=x.device), torch.tensor(lengths, device=x.device) - 1][:, None]
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                ignore_index=-100, reduction=reduction,
            )
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; without embeddings by default (the convention for FLOP counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() if not self.cfg.tie_embeddings else 0
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6*N for the weights plus 12*L*d*T for attention scores
        (PaLM appendix B); the forward pass alone is a third of this."""
        T = seq_len or self.cfg.context_length
        c = self.cfg
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.d_model * T
