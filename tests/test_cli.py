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
