"""The command line: every subcommand is listed; user errors are one line and exit 2."""

import subprocess
import sys

from scratchlm.cli import build_parser, main

COMMANDS = ["demo", "ingest", "prepare", "train", "eval", "generate", "schedule", "bench",
            "serve", "export", "import-hf"]


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "scratchlm.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in COMMANDS:
        assert cmd in out
    choices = build_parser()._subparsers._group_actions[0].choices
    assert sorted(choices) == sorted(COMMANDS)


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    code = main(["generate", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1


def test_generate_errors_print_nothing_to_stdout(tmp_path, capsys):
    """A bad prompt is reported before the prompt is echoed: stdout stays empty."""
    import torch

    from scratchlm.checkpoint import write_run
    from scratchlm.config import ModelConfig, RunConfig
    from scratchlm.model import Transformer
    from scratchlm.tokenizer import train_char

    tok = train_char(["hello world"])
    tok.save(tmp_path / "tok.json")
    cfg = RunConfig(model=ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16,
                                      context_length=16))
    torch.manual_seed(0)
    write_run(tmp_path / "run", Transformer(cfg.model), cfg, tmp_path / "tok.json")
    for args in (["--prompt", "Zebra"], ["--prompt", "hello", "--max-new-tokens", "50"],
                 ["--prompt", "hello", "--max-new-tokens", "0"],
                 ["--prompt", "hello", "--max-new-tokens", "3", "--seed", str(2**70)]):
        assert main(["generate", str(tmp_path / "run"), *args]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith("error: ")
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("hello")


def test_bench_refuses_options_it_would_ignore(tmp_path, capsys):
    for args in (["bench", "peak", str(tmp_path)], ["bench", "train", str(tmp_path)],
                 ["bench", "decode", str(tmp_path), "--preset", "tiny"],
                 ["bench", "decode", str(tmp_path), "--set", "model.n_layer=1"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "RUN_DIR" in err, (args, err)
