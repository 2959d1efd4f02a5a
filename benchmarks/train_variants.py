"""Model-change experiments for `bench train`, side by side in one process.

    python benchmarks/train_variants.py 64 4 fp32~nad,bf16~nad,bf16-master~nad,bf16-master~nad~f32attn,bf16-master+compile~nad~f32attn

Arguments: batch size, timed steps, comma list of variants. A variant is a `scratchlm bench train`
precision (fp32, bf16, bf16-master, +compile) with options after `~`, which patch the model
*without editing model.py* to measure a proposed change:
- `nad`: no dropout on the attention probabilities (Attention.attn_dropout = 0, now the default; residual dropout kept),
  so CPU SDPA can use its flash kernel;
- `f32attn`: run scaled_dot_product_attention in fp32 when q is bf16 (cast in, cast out);
- `res`: cast the residual stream to bf16 after the embeddings (under autocast).
The variants alternate step by step after their warm-up; prints wall median, best and CPU-time
ratios against the first variant. Used for the "what limits the ratio" figures of
benchmarks/README.md (Core section).
"""

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

import scratchlm.model as M
from scratchlm import bench

_sdpa = F.scaled_dot_product_attention
STATE = {"f32": False}


def sdpa(q, k, v, *a, **kw):
    if STATE["f32"] and q.dtype == torch.bfloat16:
        return _sdpa(q.float(), k.float(), v.float(), *a, **kw).to(q.dtype)
    return _sdpa(q, k, v, *a, **kw)


class CastBF16(torch.nn.Module):
    def forward(self, x):
        return x.to(torch.bfloat16) if torch.is_autocast_enabled("cpu") else x


def main() -> None:
    B, steps, specs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    cfg = bench._train_config(argparse.Namespace(preset="small", set=[f"train.batch_size={B}"]))
    # model.py calls F.scaled_dot_product_attention: give it a namespace with the switchable one.
    M.F = type("F", (), {k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    M.F.scaled_dot_product_attention = staticmethod(sdpa)
    torch.manual_seed(0)
    init = M.Transformer(cfg.model)
    vs = []
    for s in specs:
        parts = s.split("~")
        label, base, comp = bench._parse_precisions(parts[0])[0]
        v = bench.TrainVariant(s, base, comp, init, cfg.train)
        v.f32 = "f32attn" in parts
        if "nad" in parts:
            for mod in v.model.modules():
                if isinstance(mod, M.Attention):
                    mod.attn_dropout = 0.0
        if "res" in parts:
            v.model.drop = torch.nn.Sequential(CastBF16(), v.model.drop)
        vs.append(v)
    g = torch.Generator().manual_seed(0)
    T = cfg.model.context_length
    x = torch.randint(0, cfg.model.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (B, T), generator=g)
    for v in vs:
        STATE["f32"] = v.f32
        for _ in range(2 if v.compiled else 1):
            v.warmup_s.append(v.step(x, y))
        v.cpu_times.clear()
        print("warm-up", v.label, [round(t, 1) for t in v.warmup_s], flush=True)
    for i in range(steps):
        for v in vs[i % len(vs):] + vs[: i % len(vs)]:
            STATE["f32"] = v.f32
            v.times.append(v.step(x, y))
        print(i, [(v.label, round(v.times[-1], 2)) for v in vs], flush=True)
    f, cf = statistics.median(vs[0].times), statistics.median(vs[0].cpu_times)
    for v in vs:
        m, cm = statistics.median(v.times), statistics.median(v.cpu_times)
        print(f"{v.label:34} wall median {m:.2f}s x{f / m:.2f} | best {min(v.times):.2f}s "
              f"x{min(vs[0].times) / min(v.times):.2f} | cpu x{cf / cm:.2f} | loss {v.losses[-1]:.3f}")


if __name__ == "__main__":
    main()
