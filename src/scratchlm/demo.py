"""`scratchlm demo`: the whole pipeline on text every machine has, in about two minutes on a CPU.

1. ingest: the project's own `docs/` (when run from a checkout) and the Python standard
   library's `.py` files (found through `sysconfig`; tests and vendored packages left out);
2. prepare: a byte-level BPE tokenizer and token shards;
3. train: a small llama-family model, its step count sized to the time budget by timing a few
   steps first, so the learning-rate schedule decays over the real run;
4. sample a few completions and print where everything went.
"""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path

import torch

from scratchlm.config import RunConfig, load_run_config
from scratchlm.errors import UserError

DEMO_MODEL = [
    "model.arch=llama", "model.n_layer=4", "model.n_head=4", "model.d_model=128",
    "model.context_length=128", "model.bias=false", "model.dropout=0.0",
]
DEMO_TRAIN = [
    "train.batch_size=16", "train.lr=2e-3", "train.min_lr=2e-4", "train.warmup_steps=30",
    "train.beta2=0.99", "train.weight_decay=0.1", "train.precision=auto", "train.eval_steps=10",
    "train.log_interval=10",
]
PROMPTS = ["def ", "import ", "class Parser:\n    def __init__(self", "# Training a model"]
# Left out of the standard-library corpus: installed packages, test suites, IDLE, vendored
# wheels. Patterns without "/" match a file or directory name, which prunes whole directories.
STDLIB_EXCLUDES = ["site-packages", "test", "tests", "idle_test", "idlelib", "lib2to3",
                   "ensurepip", "turtledemo", "config-3*", "__pycache__", "pydoc_data"]


def demo_sources() -> list[str]:
    """Text that exists wherever scratchlm runs: its docs (in a checkout) and the stdlib."""
    sources = []
    docs = Path(__file__).resolve().parents[2] / "docs"
    if docs.is_dir():
        sources.append(str(docs))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise UserError(f"the Python standard library was not found at {stdlib}")
    sources.append(str(stdlib))
    return sources


def run_demo(out_dir: str | Path = "runs/demo", seconds: float = 120.0) -> None:
    from scratchlm.checkpoint import load_run
    from scratchlm.dataset import prepare
    from scratchlm.generate import SamplingConfig, generate_text
    from scratchlm.ingest import ingest
    from scratchlm.ingest.document import IngestOptions
    from scratchlm.train import train

    out = Path(out_dir)
    corpus, data, run = out / "corpus", out / "data", out / "run"
    t0 = time.perf_counter()
    print(f"[1/4] ingest: {', '.join(demo_sources())} -> {corpus}")
    opts = IngestOptions(workers=2, include=["*.py", "*.md"], exclude=STDLIB_EXCLUDES, ocr=False)
    summary = ingest(demo_sources(), corpus, opts)
    print(f"      {summary.get('documents')} documents, {summary.get('chars_out', 0) / 1e6:.1f}M characters")

    print(f"[2/4] prepare: byte-level BPE tokenizer + token shards -> {data}")
    meta = prepare([str(corpus)], data, tokenizer_kind="bpe", vocab_size=2048, val_fraction=0.02, seed=0)
    print(f"      {meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens")

    cfg = load_run_config(None, None, DEMO_MODEL + DEMO_TRAIN)
    cfg.model.vocab_size = meta["vocab_size"]
    steps = _steps_for_budget(cfg, seconds)
    cfg.train.max_steps = steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, steps // 5)
    cfg.train.eval_interval = max(1, steps // 4)
    print(f"[3/4] train: {steps} steps sized for ~{seconds:.0f} s -> {run}")
    train(cfg, data_dir=data, out_dir=run)

    print("[4/4] samples (temperature 0.8, top-k 50):")
    model, tokenizer, _ = load_run(run)
    sampling = SamplingConfig(temperature=0.8, top_k=50)
    results = generate_text(model, tokenizer, PROMPTS, 80, sampling, seed=0)
    for prompt, r in zip(PROMPTS, results):
        print("-" * 60)
        print(prompt + r.text)
    print("-" * 60)
    print(f"done in {time.perf_counter() - t0:.0f} s. Everything is under {out}/:")
    print(f"  corpus    {corpus}/   (JSON Lines documents + manifest.jsonl)")
    print(f"  data      {data}/     (tokenizer.json, train.bin, val.bin, meta.json)")
    print(f"  run       {run}/      (model.safetensors, config.json, metrics.jsonl)")
    print(f"  plots     {run}/loss.png {run}/lr.png {run}/throughput.png")
    print(f"next: scratchlm generate {run} --prompt 'def '   |   scratchlm serve {run}")


def _steps_for_budget(cfg: RunConfig, seconds: float) -> int:
    """Time a few optimizer steps of this model on random tokens and size the run to fit."""
    from scratchlm.bench import TrainVariant
    from scratchlm.model import Transformer
    from scratchlm.train import resolve_precision

    torch.manual_seed(0)
    precision, _ = resolve_precision(cfg.train.precision, "cpu")  # what train will run
    variant = TrainVariant(precision, precision, False, Transformer(cfg.model), cfg.train)
    B, T, V = cfg.train.batch_size, cfg.model.context_length, cfg.model.vocab_size
    x = torch.randint(0, V, (B, T))
    times = [variant.step(x, x) for _ in range(4)]
    per_step = sorted(times[1:])[1]  # median of the warm steps
    # Short timings are optimistic, and evaluation, logging and checkpoints take their share:
    # measured, a 120 s budget sized at 85% ran 139 s, so size at 70%.
    return max(20, int(seconds * 0.70 / per_step))
