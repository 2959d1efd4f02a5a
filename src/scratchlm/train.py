"""Training: `train(cfg, data_dir, out_dir, resume, stop_at)`, one loop that reads top to bottom,
and the small pure helpers it is made of.

Driven by `scratchlm train --data DATA --out RUN [--preset P] [--resume] [--stop-at N]`, the
same command under `torchrun` (then it is DDP), and `scratchlm eval RUN --data DATA`
(`evaluate_run`). docs/training.md walks through the loop.

One optimizer step, in order:

    lr = lr_at(step, cfg.train)      # update step = 1..max_steps: a function of the step only
    for each of grad_accum_steps micro-batches:          # DDP: gradient sync on the last only
        loss = sum of token losses / tokens in the WHOLE accumulated (global) batch
        backward                                         # (fp16: through the GradScaler)
    clip the global gradient norm; optimizer step; zero grads (set_to_none)
    every log_interval: metrics.jsonl + TensorBoard; every eval_interval: val loss, ppl, bits
    per byte, plots, checkpoint (best/ when it improves); SIGINT/SIGTERM: checkpoint and stop

Everything random is a function of (seed, step, micro-batch, rank): the data windows
(`dataset.sample_batch`) and dropout (torch's generator is re-seeded every step). So a resumed
run draws exactly what the uninterrupted run would have, and a run's data does not depend on
how its global batch is split between processes and accumulation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scratchlm import checkpoint as ckpt
from scratchlm.config import RunConfig, TrainConfig
from scratchlm.dataset import TokenData, eval_windows, load_meta, sample_batch
from scratchlm.errors import UserError
from scratchlm.model import Transformer
from scratchlm.schedules import lr_at
from scratchlm.tokenizer import Tokenizer

LN2 = math.log(2.0)

# Peak matmul FLOP/s for MFU. CPU: measured on the reference 2-core machine with 2 threads
# (../shared/REFERENCE_FIGURES.md), scaled by torch's thread count. CUDA: dense tensor-core
# figures from the vendors' data sheets. SCRATCHLM_PEAK_FLOPS overrides both.
CPU_PEAK_FLOPS_2_THREADS = {"fp32": 205e9, "bf16": 786e9, "bf16-master": 786e9}
# bf16 on a CPU without native bf16 (emulated; 2-core Ice Lake, 2048^2 matmul, 2 threads).
CPU_PEAK_FLOPS_EMULATED_BF16_2_THREADS = 57e9
CUDA_PEAK_FLOPS = {  # name substring -> {precision: FLOP/s}; fp32 means TF32 off (plain FP32)
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}


# --- pure helpers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...):
    nccl on CUDA, gloo on CPU. Without torchrun: one process, no group."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    import torch.distributed as dist

    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    env = os.environ
    d = Dist(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))
    if cuda:
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return d


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda if available else cpu; under DDP on CUDA each process takes its local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device={name} but torch sees no CUDA GPU; use train.device=cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise UserError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device("cpu")


def check_precision(precision: str, device_type: str) -> None:
    if precision == "fp16" and device_type != "cuda":
        raise UserError(
            "train.precision=fp16 needs a CUDA GPU (on CPUs fp16 matrix multiplies run at "
            "~1 GFLOP/s); use train.precision=auto (bf16 where the CPU has it, else fp32)"
        )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). Without it
    torch emulates bf16 through fp32 conversions: measured on a 2-core Ice Lake (AVX-512, no
    BF16), a 2048^2 bf16 matmul ran at 57 GFLOP/s against 209 in fp32; on a Zen 5 with
    AVX512-BF16, 786 against 205."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device_type: str) -> tuple[str, str]:
    """`train.precision` -> (the precision to run, why). `auto` picks the fastest precision the
    device runs well; an explicit choice is kept (a slow one gets a note)."""
    if precision != "auto":
        if precision in ("bf16", "bf16-master") and device_type == "cpu" and not cpu_has_native_bf16():
            return precision, ("note: this CPU has no native bf16 matrix multiply (AVX512-BF16 "
                               "or AMX), so bf16 runs several times slower than fp32 here; "
                               "train.precision=auto picks fp32")
        return precision, ""
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: bf16 autocast (the GPU supports bf16)"
        return "fp16", "auto: fp16 autocast with a gradient scaler (the GPU has no bf16)"
    if cpu_has_native_bf16():
        return "bf16-master", "auto: bf16-master (the CPU multiplies bf16 natively)"
    return "fp32", "auto: fp32 (the CPU has no native bf16 matrix multiply)"


def autocast_context(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: bf16/fp16 autocast (weights stay fp32), or nothing
    (fp32, and bf16-master, whose compute weights are already bf16)."""
    if precision in ("fp32", "bf16-master"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype)


class MasterWeights:
    """`precision = "bf16-master"`: forward and backward run on a bf16 copy of the model; its
    gradients are moved to the fp32 module, which the optimizer updates and checkpoints save,
    and the updated weights are copied back. Unlike autocast there is no cast per op per step
    (shakespeare-char step on 2 CPU threads: 23 ms autocast, 18 ms bf16-master)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.compute = copy.deepcopy(model).to(torch.bfloat16)  # tied weights stay tied
        self.master = list(model.parameters())
        self.low = list(self.compute.parameters())

    def grads_to_master(self) -> None:
        for m, low in zip(self.master, self.low):
            m.grad = None if low.grad is None else low.grad.float()
            low.grad = None

    @torch.no_grad()
    def weights_from_master(self) -> None:
        torch._foreach_copy_(self.low, self.master)


def configure_optimizer(
    model: torch.nn.Module, tcfg: TrainConfig, device_type: str = "cpu"
) -> torch.optim.AdamW:
    """AdamW with weight decay on >= 2-D weights only (matrices and embeddings; not biases or
    norm gains), with the fused kernel on CPU and CUDA. Measured on the 2-core CPU for the
    shakespeare-char model, 1 thread: step() takes 0.47 ms fused, 1.52 ms foreach, 1.74 ms
    with the for-loop implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(
        groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), fused=fused,
        foreach=None if fused else True,
    )


def derive_grad_accum(tcfg: TrainConfig, context_length: int, world_size: int) -> tuple[int, str]:
    """grad_accum_steps from tokens_per_step (when set), and a line saying how it was derived."""
    per_micro = tcfg.batch_size * context_length * world_size
    if tcfg.tokens_per_step <= 0:
        accum = tcfg.grad_accum_steps
        return accum, (f"grad_accum_steps = {accum} (set); {accum * per_micro:,} tokens per "
                       f"optimizer step = {tcfg.batch_size} x {context_length} x {world_size} "
                       f"process(es) x {accum}")
    exact = tcfg.tokens_per_step / per_micro
    accum = max(1, round(exact))
    how = "" if accum == exact else (
        f" (rounded from {exact:.3f}: {tcfg.tokens_per_step:,} is not a multiple of {per_micro:,})"
    )
    return accum, (f"grad_accum_steps = {accum} = tokens_per_step {tcfg.tokens_per_step:,} / "
                   f"({tcfg.batch_size} x {context_length} x {world_size} process(es)){how}; "
                   f"{accum * per_micro:,} tokens per optimizer step")


def resolve_config(cfg: RunConfig, meta: dict[str, Any], world_size: int) -> tuple[RunConfig, str]:
    """A copy of cfg with the values that come from the data and the job filled in."""
    cfg = copy.deepcopy(cfg)
    vocab = int(meta["vocab_size"])
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise UserError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's tokenizer "
            f"({vocab} ids); set model.vocab_size=0 to take it from the data"
        )
    accum, how = derive_grad_accum(cfg.train, cfg.model.context_length, world_size)
    cfg.train.grad_accum_steps = accum
    return cfg, how


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for MFU: $SCRATCHLM_PEAK_FLOPS, else the tables above."""
    env = os.environ.get("SCRATCHLM_PEAK_FLOPS")
    if env:
        try:
            return float(env)
        except ValueError:
            raise UserError(
                f"SCRATCHLM_PEAK_FLOPS must be a number (FLOP/s), got {env!r}"
            ) from None
    if device.type == "cpu":
        peak = CPU_PEAK_FLOPS_2_THREADS.get(precision, 0.0)
        if precision.startswith("bf16") and not cpu_has_native_bf16():
            peak = CPU_PEAK_FLOPS_EMULATED_BF16_2_THREADS
        return peak * torch.get_num_threads() / 2 or None
    name = torch.cuda.get_device_name(device)
    for key, table in CUDA_PEAK_FLOPS.items():
        if key in name:
            return table.get(precision)
    return None


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of torch's generator (dropout) for one optimizer step of one process."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + rank * 0xC2B2AE3D) % (1 << 62)


def backward_accumulated(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    grad_scale: float,
    precision: str,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    no_sync: Any = None,
) -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step; returns the summed loss.

    Each micro-batch's loss is the SUM over its target tokens times `grad_scale`, which the
    caller sets to 1 / (target tokens in the whole accumulated batch) (times the process count
    under DDP, which averages gradients over processes). So the gradient is that of the mean
    token loss of the whole batch: 4 micro-batches of 2 give the gradient of 1 batch of 8, even
    when micro-batches hold different numbers of targets (ignore_index -100). Averaging
    per-micro-batch means instead would weight a token by 1 / its micro-batch's count.

    `no_sync`: DDP's `no_sync` context manager: gradients are all-reduced only on the last
    micro-batch's backward.
    """
    loss_sum = torch.zeros((), device=device)
    last = len(batches) - 1
    for m, (x, y) in enumerate(batches):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with no_sync() if no_sync is not None and m < last else contextlib.nullcontext():
            with autocast_context(precision, device.type):
                _, loss = model(x, y, reduction="sum")
            scaled = loss * grad_scale
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()
    return loss_sum


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: TokenData,
    context_length: int,
    batch_size: int,
    max_batches: int | None,
    precision: str,
    device: torch.device,
) -> dict[str, float]:
    """Mean validation loss over the deterministic (evenly spread) windows of `eval_windows`.

    Returns {"loss": nats per token, "tokens": targets counted, "perplexity", "bits_per_byte"}.
    Bits per byte = loss / ln 2 / (UTF-8 bytes per token of the split), comparable across
    tokenizers.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for x, y in eval_windows(data, context_length, batch_size, max_batches=max_batches):
        count += int((y != -100).sum())  # counted on the CPU copy: no device sync
        with autocast_context(precision, device.type):
            _, loss = model(x.to(device), y.to(device), reduction="sum")
        total += loss.double()
    model.train(was_training)
    loss = total.item() / max(count, 1)
    return {"loss": loss, "tokens": count, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss / LN2 / data.bytes_per_token}


def evaluate_run(run_dir: str | Path, data_dir: str | Path) -> dict[str, Any]:
    """`scratchlm eval RUN --data DATA`: loss, perplexity and bits per byte over the whole
    validation split, deterministically (in order, non-overlapping windows).

    The run's tokenizer.json must be the data's (same file content): a model evaluated on ids
    from another vocabulary would give meaningless numbers.
    """
    from scratchlm.checkpoint import load_run, read_run_config

    cfg, _ = read_run_config(run_dir)
    load_meta(data_dir)  # a missing or foreign DATA_DIR is a one-line error
    _check_same_tokenizer(Path(run_dir) / "tokenizer.json", Path(data_dir) / "tokenizer.json")
    device = resolve_device("auto")
    precision, _ = resolve_precision(cfg.train.precision, device.type)
    if precision == "fp16" and device.type != "cuda":
        precision = "fp32"  # an fp16 run evaluated on a CPU
    model, _, cfg = load_run(run_dir, device)
    val = TokenData(data_dir, "val")
    r = evaluate(model, val, cfg.model.context_length, cfg.train.batch_size, None, precision,
                 device)
    return {"val_loss": r["loss"], "perplexity": r["perplexity"],
            "bits_per_byte": r["bits_per_byte"], "tokens": r["tokens"]}


def _check_same_tokenizer(run_tok: Path, data_tok: Path) -> None:
    if not run_tok.is_file():
        raise UserError(f"{run_tok.parent} has no tokenizer.json: the run is incomplete")
    if not data_tok.is_file():
        raise UserError(f"{data_tok.parent} has no tokenizer.json; run `scratchlm prepare` again")
    # Compared as loaded tokenizers: the same vocabulary and rules, whatever the JSON layout.
    if Tokenizer.load(run_tok).to_str() != Tokenizer.load(data_tok).to_str():
        raise UserError(
            f"the run's tokenizer ({run_tok}) differs from the data's ({data_tok}); use the "
            "data directory the run was trained on, or prepare data with that tokenizer"
        )


# --- run-directory bookkeeping -----------------------------------------------------------------


class StopSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM set `requested` instead of killing the process;
    the loop checks it after each step, saves a checkpoint and returns. A second Ctrl-C
    interrupts at once."""

    def __init__(self) -> None:
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then "
              "stopping (Ctrl-C again to quit without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _say(msg: str, dist_info: Dist) -> None:
    if dist_info.is_main:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def _busy_cpu_hint(device: torch.device) -> str | None:
    """A hint when several torch threads will compete with other jobs for the CPU cores: an
    OpenMP thread waiting for a busy core stalls every step (4x slower measured; see
    docs/training.md). Only advice: the thread count is the user's choice."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    if device.type != "cpu" or threads < 2 or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if load < cores:
        return None
    return (f"note: the CPU is busy (load average {load:.1f} on {cores} cores) and torch uses "
            f"{threads} threads; if steps are slow, run with OMP_NUM_THREADS=1")


def _start_run_dir(
    out: Path, cfg: RunConfig, data_dir: Path, resume: bool
) -> tuple[int, dict[str, Any] | None, Path | None]:
    """Check RUN_DIR against the request; (start step, trainer state, resume source) on resume."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if not resume:
        if (out / "config.json").exists() or (out / ckpt.TRAINER_STATE).exists():
            raise UserError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        return 0, None, None
    saved, _ = ckpt.read_run_config(out)
    # The tokenizer first: other data has another vocabulary, which would read as a model change.
    _check_same_tokenizer(out / "tokenizer.json", data_dir / "tokenizer.json")
    if dataclasses.asdict(saved.model) != dataclasses.asdict(cfg.model):
        a, b = dataclasses.asdict(saved.model), dataclasses.asdict(cfg.model)
        diff = ", ".join(f"model.{k} {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k])
        raise UserError(
            f"cannot resume {out} with a different architecture ({diff}); pass the run's original "
            "--preset/--config/--set, or train into a new --out"
        )
    source, state = ckpt.find_resume_checkpoint(out)
    ta, tb = dataclasses.asdict(saved.train), dataclasses.asdict(cfg.train)
    changed = [f"train.{k} {ta[k]!r} -> {tb[k]!r}" for k in ta if ta[k] != tb[k]]
    if changed:
        print(f"resume: training settings changed: {', '.join(changed)}", file=sys.stderr)
    return int(state["step"]), state, source


# --- the loop ----------------------------------------------------------------------------------


def train(
    cfg: RunConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    resume: bool = False,
    stop_at: int | None = None,
    init_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train a model on DATA_DIR into RUN_DIR; returns the last metrics (step, loss, val_loss...).

    Args:
        cfg: the run's configuration; model.vocab_size 0 takes the data's vocabulary.
        data_dir: a directory written by `scratchlm prepare`.
        out_dir: the run directory (must not hold a run unless `resume`).
        resume: continue RUN_DIR's latest checkpoint exactly (same config required).
        stop_at: stop after this optimizer step, with a checkpoint; the schedule still runs to
            `max_steps`, so resuming later continues the same curve.
        init_from: start a new run from another run's weights (fine-tuning, e.g. after
            `scratchlm import-hf`): its model config is used, and DATA_DIR must have been
            prepared with its tokenizer (`scratchlm prepare --tokenizer-file RUN/tokenizer.json`).
    """
    t_start = time.perf_counter()
    # --- setup: processes, device, data, config ---------------------------------------------
    tcfg = cfg.train
    data_dir, out = Path(data_dir), Path(out_dir)
    meta = load_meta(data_dir)
    if init_from is not None:
        if resume:
            raise UserError("--init-from starts a new run from another's weights and --resume "
                            "continues this one; use one of them")
        init_from = Path(init_from)
        cfg = dataclasses.replace(cfg, model=ckpt.read_run_config(init_from)[0].model)
        _check_same_tokenizer(init_from / "tokenizer.json", data_dir / "tokenizer.json")
    train_data, val_data = TokenData(data_dir, "train"), TokenData(data_dir, "val")
    if stop_at is not None and not 1 <= stop_at <= tcfg.max_steps:
        raise UserError(
            f"--stop-at must be between 1 and train.max_steps={tcfg.max_steps}, got {stop_at}"
        )
    device = resolve_device(tcfg.device)  # validated before any process group exists
    precision, precision_note = resolve_precision(tcfg.precision, device.type)
    check_precision(precision, device.type)
    dist_info = init_distributed(tcfg.device)
    device = resolve_device(tcfg.device, dist_info.local_rank)
    cfg, accum_how = resolve_config(cfg, meta, dist_info.world_size)
    tcfg, mcfg = cfg.train, cfg.model
    for split in (train_data, val_data):  # fail now, not at the first evaluation
        if len(split) < mcfg.context_length + 1:
            raise UserError(
                f"the {split.split} split of {data_dir} has {len(split)} tokens, fewer than "
                f"context_length + 1 = {mcfg.context_length + 1}; use a shorter "
                "model.context_length or more text"
            )
    start_step, state, source = _start_run_dir(out, cfg, data_dir, resume)
    if dist_info.ddp:  # every process has checked RUN_DIR before rank 0 writes into it
        import torch.distributed as dist

        dist.barrier()
    end_step = stop_at if stop_at is not None else tcfg.max_steps
    if start_step >= end_step:
        raise UserError(
            f"{out} is already at step {start_step}; nothing to do up to step {end_step}"
        )
    B, T, accum = tcfg.batch_size, mcfg.context_length, tcfg.grad_accum_steps
    W = dist_info.world_size
    config_json = {
        "format_version": ckpt.FORMAT_VERSION, **cfg.to_dict(),
        "data": {"data_dir": str(data_dir.resolve()), "meta": meta},
        "derived": {
            "grad_accum_steps": accum, "world_size": W, "tokens_per_step": B * T * accum * W,
            "precision": precision,
        },
    }
    _say(accum_how, dist_info)
    if precision_note:
        _say(precision_note, dist_info)

    # --- model, optimizer, state -----------------------------------------------------------
    torch.manual_seed(tcfg.seed)
    model = Transformer(mcfg)
    if source is not None:
        ckpt.load_weights(model, source / "model.safetensors")
    elif init_from is not None:
        ckpt.load_weights(model, init_from / "model.safetensors")
        _say(f"initialised from {init_from}", dist_info)
    model.to(device).train()
    optimizer = configure_optimizer(model, tcfg, device.type)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    best_val, elapsed_before = math.inf, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        best_val, elapsed_before = state["best_val_loss"], state["elapsed_s"]
        _say(f"resuming {out} from step {start_step} ({source})", dist_info)
    master = MasterWeights(model) if precision == "bf16-master" else None
    compute = master.compute if master is not None else model  # runs forward and backward
    fwd_model: torch.nn.Module = compute  # what the loop calls: maybe DDP-wrapped and compiled
    if dist_info.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd_model = DDP(compute, device_ids=[device.index] if device.type == "cuda" else None)
    ddp_model = fwd_model
    if tcfg.compile:
        fwd_model = torch.compile(fwd_model)

    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(out)
        if source is None:
            extra = {k: config_json[k] for k in ("data", "derived")}
            ckpt.write_run(out, model, cfg, data_dir / "tokenizer.json", extra=extra)
    log = ckpt.MetricsLog(out, start_step) if dist_info.is_main else None
    flops_per_token = model.flops_per_token(T)
    peak = peak_flops(device, precision)
    _say(f"model: {mcfg.arch}, {model.num_params():,} parameters, {flops_per_token / 1e6:.2f} "
         f"MFLOP/token; device {device}, precision {precision}, {W} process(es), "
         f"{torch.get_num_threads()} threads", dist_info)

    busy = _busy_cpu_hint(device)
    if busy:
        _say(busy, dist_info)

    def save(step: int) -> None:
        """Checkpoint (rank 0): weights, optimizer, scaler, step, RNG states, data cursor."""
        trainer_state = {
            "format_version": ckpt.FORMAT_VERSION, "step": step,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": ckpt.rng_state(), "best_val_loss": best_val,
            "elapsed_s": elapsed_before + time.perf_counter() - t_start,
            "data": {"seed": tcfg.seed, "next_step": step, "world_size": W,
                     "grad_accum_steps": accum},
        }
        ckpt.save_checkpoint(out, model, trainer_state, config_json, data_dir / "tokenizer.json",
                             keep_last=tcfg.keep_last)

    def run_eval(step: int) -> dict[str, float]:
        r = evaluate(compute, val_data, T, B, tcfg.eval_steps, precision, device)
        _say(f"step {step}: val loss {r['loss']:.4f}, ppl {r['perplexity']:.2f}, "
             f"bpb {r['bits_per_byte']:.4f} ({r['tokens']:,} tokens)", dist_info)
        return {"val_loss": r["loss"], "val_ppl": r["perplexity"], "val_bpb": r["bits_per_byte"]}

    # --- the loop ----------------------------------------------------------------------------
    from tqdm import tqdm

    bar = tqdm(total=end_step, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not dist_info.is_main, file=sys.stderr)
    last: dict[str, Any] = {"step": start_step}
    saved_step = start_step  # the step of the newest checkpoint
    loss_sum = torch.zeros((), device=device)  # summed token losses since the last log line
    tokens_seen = 0  # targets since the last log line (global)
    t_log = time.perf_counter()
    step = start_step
    with StopSignal() as stop:
        while step < end_step:
            lr = lr_at(step + 1, tcfg)  # update number step+1 of max_steps
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(step_seed(tcfg.seed, step, dist_info.rank))  # dropout masks
            # This process's micro-batches. The global micro-batch index m*W + rank makes the
            # data depend only on the global batch: 1 process x accum 2 == 2 processes x accum 1.
            batches = [sample_batch(train_data, B, T, tcfg.seed, step, m * W + dist_info.rank)
                       for m in range(accum)]
            n_tokens = sum(int((y != -100).sum()) for _, y in batches)
            stop_now = bool(stop.requested)
            if dist_info.ddp:  # every process needs the global token count and the stop flag
                t = torch.tensor([n_tokens, int(stop_now)], dtype=torch.int64, device=device)
                dist.all_reduce(t)
                n_tokens, stop_now = int(t[0]), bool(t[1])
            if stop_now:
                break
            # DDP averages gradients over W processes: scale so the result is sum / n_tokens.
            loss_sum += backward_accumulated(
                fwd_model, batches, W / max(n_tokens, 1), precision, device, scaler,
                no_sync=ddp_model.no_sync if dist_info.ddp else None,
            )
            if master is not None:
                master.grads_to_master()
            if tcfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if master is not None:
                master.weights_from_master()
            step += 1
            tokens_seen += n_tokens
            bar.update(1)

            # --- log, evaluate, save ---------------------------------------------------------
            is_last = step == end_step
            do_eval = step % tcfg.eval_interval == 0 or step == tcfg.max_steps
            do_save = is_last or (step % tcfg.checkpoint_interval == 0 if tcfg.checkpoint_interval
                                  else do_eval)
            if step % tcfg.log_interval == 0 or do_eval or is_last:
                if dist_info.ddp:
                    dist.all_reduce(loss_sum)
                now = time.perf_counter()
                tok_s = tokens_seen / (now - t_log)
                last = {"step": step, "loss": loss_sum.item() / max(tokens_seen, 1), "lr": lr,
                        "tokens_per_s": tok_s,
                        "mfu": flops_per_token * tok_s / (peak * W) if peak else None,
                        "elapsed_s": elapsed_before + now - t_start}
                if do_eval and dist_info.is_main:
                    last.update(run_eval(step))
                    if last["val_loss"] < best_val:
                        best_val = last["val_loss"]
                        ckpt.save_best(out, model, config_json, data_dir / "tokenizer.json",
                                       step, best_val)
                if log is not None:
                    log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                                mfu=f"{last['mfu']:.1%}" if last["mfu"] else "n/a", refresh=False)
                loss_sum.zero_()
                tokens_seen = 0
                if dist_info.is_main and do_save:
                    save(step)
                    saved_step = step
                if do_eval and dist_info.is_main:
                    from scratchlm.plots import plot_run

                    plot_run(out)
                t_log = time.perf_counter()  # evaluation and saving do not count as throughput
            elif do_save and dist_info.is_main:
                save(step)
                saved_step = step
    bar.close()
    stopped_by_signal = stop.requested
    if dist_info.is_main:
        if log is not None:
            log.close()
        if saved_step != step:  # stopped by a signal between checkpoints
            save(step)
        step_dir = out / ckpt.CHECKPOINTS / ckpt.step_dir_name(step)
        where = step_dir if step_dir.is_dir() else out  # keep_last=0 keeps only RUN_DIR's files
        if step < tcfg.max_steps:
            _say(f"stopped at step {step}; checkpoint {where}; continue with --resume", dist_info)
        else:
            took = time.perf_counter() - t_start
            _say(f"done: {step} steps in {took:.1f} s; run directory {out}", dist_info)
    if dist_info.ddp:
        # gloo can abort at exit while the model and optimizer still hold its buffers.
        del fwd_model, ddp_model, model, optimizer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    if stopped_by_signal == signal.SIGINT:
        raise KeyboardInterrupt
    return last
