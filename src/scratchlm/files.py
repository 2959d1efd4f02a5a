"""Atomic file writes, the one way scratchlm puts a file in place, and the one way it reads a
JSON file a user handed it.

Used by checkpoints, tokenizers, plots and exports. The content goes to a temporary file in the
destination's directory and is renamed over the destination, so a crash or Ctrl-C never leaves a
half-written file under the real name. Standard library only (and `errors`), so any module may
import it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # mkstemp makes private files (0600); finished outputs get the usual mode


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) and rename the result to path (same directory, so rename is atomic)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a parent that is a file, read-only, on /proc...: nothing was written
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def usual_permissions(path: Path) -> None:
    """Give `path` (and, for a directory, everything under it) the modes a plain `open`/`mkdir`
    would have under the user's umask: temporary files and directories start private."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~_UMASK)


def read_json(path: str | Path, hint: str = "") -> Any:
    """The parsed content of a JSON file; unreadable text is a one-line `UserError` naming the
    file, the parser's complaint and `hint` (what to do)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is not valid JSON ({e})" + (f"; {hint}" if hint else "")) from None
