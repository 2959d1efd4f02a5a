"""The `scratchlm` command: one subcommand per step of the pipeline, each a thin call into the
library. No logic lives here beyond turning flags into arguments.

    scratchlm demo                      # build a corpus, train ~2 minutes, sample
    scratchlm ingest SRC... --out CORPUS
    scratchlm prepare INPUT... --out DATA
    scratchlm train --data DATA --out RUN [--preset P] [--config F.toml] [--set k=v]
    scratchlm eval RUN --data DATA
    scratchlm generate RUN --prompt TEXT
    scratchlm schedule cosine --lr 0.002 --steps 5000 --at 0,2500,5000
    scratchlm bench peak|train|decode
    scratchlm serve RUN
    scratchlm export RUN --format hf|gguf --out PATH
    scratchlm import-hf PATH --out RUN

User mistakes raise `UserError`; `main()` prints them as one `error:` line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from scratchlm.errors import UserError


def _cmd_demo(a: argparse.Namespace) -> int:
    from scratchlm.demo import run_demo

    run_demo(out_dir=a.out, seconds=a.seconds)
    return 0


def _cmd_ingest(a: argparse.Namespace) -> int:
    from scratchlm.ingest import ingest
    from scratchlm.ingest.document import IngestOptions

    opts = IngestOptions(
        workers=a.workers, include=a.include, exclude=a.exclude, ocr=not a.no_ocr,
        ocr_engine=a.ocr_engine, min_chars=a.min_chars, dedup=a.dedup,
        licenses=[x.strip().lower() for x in a.licenses.split(",")] if a.licenses else [],
        text_field=a.text_field, text_column=a.text_column,
        max_file_bytes=int(a.max_file_mb * 1024 * 1024), scrub_secrets=not a.no_scrub_secrets,
        table=a.table, column=a.column, where_column=a.where_column, where_value=a.where_value,
        query=a.query, quality_filter=not a.no_quality_filter, compression=a.compress,
        shard_bytes=int(a.shard_mb * 1024 * 1024), progress=not a.json, git_cache=a.git_cache,
    )
    summary = ingest(a.sources, a.out, opts, json_summary=a.json)
    if a.json:
        print(json.dumps(summary))
    return 0 if summary.get("documents", 0) > 0 else 1


def _cmd_prepare(a: argparse.Namespace) -> int:
    from scratchlm.dataset import prepare

    meta = prepare(a.inputs, a.out, tokenizer_kind=a.tokenizer, vocab_size=a.vocab_size,
                   val_fraction=a.val_fraction, seed=a.seed, tokenizer_file=a.tokenizer_file)
    if a.json:
        print(json.dumps(meta))
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from scratchlm.config import load_run_config
    from scratchlm.train import train

    base = None
    if a.resume and a.preset is None and a.config is None:
        from scratchlm.checkpoint import read_run_config

        base = read_run_config(a.out)[0]  # resuming continues the run's own settings
    cfg = load_run_config(a.preset, a.config, a.set, base=base)
    train(cfg, data_dir=a.data, out_dir=a.out, resume=a.resume, stop_at=a.stop_at,
          init_from=a.init_from)
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from scratchlm.train import evaluate_run

    result = evaluate_run(a.run_dir, a.data)
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>14}: {v}")
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    import dataclasses

    from scratchlm.checkpoint import load_run
    from scratchlm.generate import SamplingConfig, check_fits, check_seed, generate_text

    sampling = SamplingConfig(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                              min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                              presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty)
    model, tokenizer, _ = load_run(a.run_dir)
    stream = not a.json and len(a.prompt) == 1

    def on_text(i: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    for p in a.prompt:  # every prompt checked before anything is printed
        check_fits(len(tokenizer.encode(p)), a.max_new_tokens, model.cfg.context_length)
    if a.seed is not None:
        check_seed(a.seed)
    if stream:
        sys.stdout.write(a.prompt[0])
    results = generate_text(model, tokenizer, a.prompt, a.max_new_tokens, sampling, stop=a.stop,
                            seed=a.seed, use_cache=not a.no_cache,
                            on_text=on_text if stream else None)
    if a.json:
        out = [dict(dataclasses.asdict(r), text=r.text) for r in results]
        for o in out:
            o.pop("extra", None)
        print(json.dumps(out[0] if len(out) == 1 else out))
    elif stream:
        sys.stdout.write("\n")
    else:
        for p, r in zip(a.prompt, results):
            print(f"--- {p!r}\n{p}{r.text}")
    return 0


def _cmd_schedule(a: argparse.Namespace) -> int:
    from scratchlm.schedules import schedule_cli

    return schedule_cli(a)


def _cmd_bench(a: argparse.Namespace) -> int:
    from scratchlm import bench

    if a.run_dir and a.what != "decode":
        raise UserError(f"RUN_DIR is read only by `bench decode`; `bench {a.what}` times a fresh "
                        "model (choose it with --preset and --set)")
    if a.run_dir and (a.preset is not None or a.set):
        raise UserError("--preset and --set build a throwaway run; with RUN_DIR, `bench decode` "
                        "times that run as it is")
    a.preset = a.preset or "small"
    result = {"peak": bench.bench_peak, "train": bench.bench_train, "decode": bench.bench_decode}[
        a.what
    ](a)
    if a.json:
        print(json.dumps(result))
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from scratchlm.serve import serve

    serve(a.run_dir, host=a.host, port=a.port, max_batch=a.max_batch, api_key=a.api_key,
          max_queue=a.max_queue, prefix_cache_mb=a.prefix_cache_mb, prefill_chunk=a.prefill_chunk)
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from scratchlm.export import export_hf
    from scratchlm.gguf_export import export_gguf

    path = (export_hf if a.format == "hf" else export_gguf)(a.run_dir, a.out)
    print(f"wrote {path}")
    return 0


def _cmd_import_hf(a: argparse.Namespace) -> int:
    from scratchlm.export import import_hf

    path = import_hf(a.path, a.out)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scratchlm",
        description="Train decoder-only transformer language models from scratch on your own "
        "documents, then evaluate, sample, serve and export them.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo", help="build a corpus from local docs, train ~2 minutes, sample")
    s.add_argument("--out", default="runs/demo", help="where the corpus, data and run go")
    s.add_argument("--seconds", type=float, default=120.0, help="training time budget")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("ingest", help="turn files, archives, repositories, databases into a corpus")
    s.add_argument("sources", nargs="+", metavar="SOURCE", help="file, directory, archive, git repo/URL or database URL")
    s.add_argument("--out", required=True, help="corpus directory to write")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--include", action="append", default=[], metavar="GLOB")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    s.add_argument("--no-ocr", action="store_true", help="do not OCR images or scanned PDF pages")
    s.add_argument("--ocr-engine", choices=["auto", "rapidocr", "tesseract"], default="auto")
    s.add_argument("--min-chars", type=int, default=1)
    s.add_argument("--dedup", choices=["exact", "near", "none"], default="exact")
    s.add_argument("--licenses", default="", help="comma list of licenses to keep (git sources)")
    s.add_argument("--text-field", help="JSON: dotted path of the text field")
    s.add_argument("--text-column", help="CSV/TSV: column holding the text")
    s.add_argument("--max-file-mb", type=float, default=64.0, help="skip larger files")
    s.add_argument("--no-scrub-secrets", action="store_true", help="keep keys/tokens found in text")
    s.add_argument("--table", help="database: table to read")
    s.add_argument("--column", help="database: text column")
    s.add_argument("--where-column", help="database: filter column")
    s.add_argument("--where-value", help="database: filter value (bound, never formatted)")
    s.add_argument("--query", help="database: read-only SELECT")
    s.add_argument("--no-quality-filter", action="store_true", help="keep documents the quality heuristics would drop")
    s.add_argument("--compress", choices=["none", "gz", "zst"], default="none", help="shard compression")
    s.add_argument("--shard-mb", type=float, default=128.0, help="rotate shards at this size")
    s.add_argument("--git-cache", help="where remote repositories are cloned")
    s.add_argument("--json", action="store_true", help="print a JSON summary")
    s.set_defaults(func=_cmd_ingest)

    s = sub.add_parser("prepare", help="train a tokenizer and write token shards")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="text file, directory or ingest corpus")
    s.add_argument("--out", required=True, help="data directory to write")
    s.add_argument("--tokenizer", choices=["bpe", "char"], default="bpe")
    s.add_argument("--vocab-size", type=int, default=4096)
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tokenizer-file", metavar="TOKENIZER_JSON",
                   help="reuse this tokenizer (e.g. RUN/tokenizer.json, to fine-tune that run)")
    s.add_argument("--json", action="store_true", help="print meta.json")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("train", help="train a model (under torchrun: DDP)")
    s.add_argument("--data", required=True, help="data directory from `scratchlm prepare`")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--preset", help="named preset: tiny, shakespeare-char, small, gpt2-124m, llama-125m")
    s.add_argument("--config", help="TOML file with [model] and [train] tables")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.add_argument("--resume", action="store_true", help="continue from the run directory")
    s.add_argument("--stop-at", type=int, help="stop (with a checkpoint) at this step")
    s.add_argument("--init-from", metavar="RUN_DIR",
                   help="start from another run's weights and model config (fine-tuning)")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("eval", help="loss, perplexity and bits per byte on the validation split")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--data", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("generate", help="sample text from a trained model")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, -2 to 2")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, -2 to 2")
    s.add_argument("--stop", action="append", default=[], metavar="STR")
    s.add_argument("--seed", type=int)
    s.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_generate)

    s = sub.add_parser("schedule", help="print a learning-rate schedule's values")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--lr", type=float, required=True)
    s.add_argument("--steps", type=int, required=True, help="schedule horizon T_max")
    s.add_argument("--min-lr", type=float, default=0.0)
    s.add_argument("--warmup-steps", type=int, default=0)
    s.add_argument("--gamma", type=float, default=0.1)
    s.add_argument("--step-size", type=int, default=1000)
    s.add_argument("--decay-fraction", type=float, default=0.2)
    s.add_argument("--pct-start", type=float, default=0.3)
    s.add_argument("--at", help="comma-separated steps (default: 11 evenly spaced)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", metavar="FILE", help="write a PNG of the schedule")
    s.set_defaults(func=_cmd_schedule)

    s = sub.add_parser("bench", help="measure matmul peak, training and decoding speed")
    s.add_argument("what", choices=["peak", "train", "decode"])
    s.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="decode: the run to measure")
    s.add_argument("--preset", help="train, and decode without RUN_DIR: model preset (default small)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.add_argument("--precisions", default="fp32,bf16", help="train: comma list")
    s.add_argument("--steps", type=int, default=5, help="train: timed steps per precision")
    s.add_argument("--new-tokens", type=int, default=512, help="decode: tokens to generate")
    s.add_argument("--vs-transformers", action="store_true", help="decode: also time HF generate()")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server and web playground")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    s.add_argument("--api-key", help="require Authorization: Bearer KEY")
    s.add_argument("--prefix-cache-mb", type=float, default=None, metavar="MB",
                   help="memory for finished requests' keys and values, reused by prompts that "
                        "start with the same tokens (default: as much as the KV cache; 0: off)")
    s.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prompt tokens prefilled per step, between which running requests decode "
                        "(default 512; smaller: shorter stalls, longer first tokens)")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("export", help="export a run to Hugging Face or GGUF")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--format", choices=["hf", "gguf"], required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("import-hf", help="make a run directory from a Hugging Face checkpoint")
    s.add_argument("path", metavar="PATH")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_import_hf)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
