"""Where a training step's time goes: torch.profiler over one step per precision variant.

    python benchmarks/profile_train_step.py --batch 16 fp32 bf16 bf16:no-attn-dropout bf16-master:no-attn-dropout

Each variant is a `scratchlm.bench` training variant (fp32, bf16 autocast, bf16-master, +compile)
of the `small` preset, optionally with `:no-attn-dropout` (Attention.attn_dropout set to 0 on the
modules, residual dropout kept: what the flash-attention kernel on CPU needs). One warm-up step,
then one profiled step; prints the top ops by self CPU time. The table in docs/performance.md
("Where the time of a training step goes") comes from this script.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from scratchlm import bench
from scratchlm.model import Attention, Transformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="precision[+compile][:no-attn-dropout]")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--top", type=int, default=14)
    a = p.parse_args()
    cfg = bench._train_config(argparse.Namespace(preset=a.preset, set=[f"train.batch_size={a.batch}"]))
    torch.manual_seed(0)
    init = Transformer(cfg.model)
    T = cfg.model.context_length
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (a.batch, T), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (a.batch, T), generator=g)
    for spec in a.variants:
        precision, _, option = spec.partition(":")
        label, base, compiled = bench._parse_precisions(precision)[0]
        v = bench.TrainVariant(label, base, compiled, init, cfg.train)
        if option == "no-attn-dropout":
            for m in v.model.modules():
                if isinstance(m, Attention):
                    m.attn_dropout = 0.0
        for _ in range(2 if compiled else 1):
            v.step(x, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            v.step(x, y)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"== {spec}: total self CPU {total / 1e6:.2f} s")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: a.top]:
            print(f"   {e.key[:58]:58} {e.self_cpu_time_total / 1e6:7.3f} s "
                  f"{100 * e.self_cpu_time_total / total:5.1f}%  calls={e.count}")


if __name__ == "__main__":
    main()
