"""Git repositories: clone URLs, detect each repository's license, identify it by remote URL.

Driven by `scratchlm.ingest.driver`: a source that is a URL (`https://...`, `git@host:org/repo`,
`ssh://`, `git://`) is cloned with `git clone --depth 1` into a cache directory (reused on the
next run); any directory holding `.git`, given directly or met during a walk, is a repository.
For each repository the driver asks:

- `detect_license(root)`: an SPDX-style id (`mit`, `apache-2.0`, `gpl-3.0`, `bsd-3-clause`, ...)
  recognised from the canonical wording in `LICENSE*` / `COPYING*` / `LICENCE*`, or `unknown`
  when such a file exists but matches nothing, or None when there is none. The id is recorded on
  every document of the repository; `--licenses mit,apache-2.0` keeps only those repositories.
- `remote_url(root)`: the normalised `origin` URL (read from `.git/config`, no subprocess), so
  the same repository given twice (a clone and its URL, or two clones) is ingested once.

git runs with an argument list (never a shell) and `GIT_TERMINAL_PROMPT=0`, so a private URL
fails fast instead of waiting for a password.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from scratchlm.errors import UserError

LICENSE_FILES = ("LICENSE", "LICENCE", "COPYING", "LICENSE-MIT", "LICENSE-APACHE", "UNLICENSE")
CLONE_TIMEOUT_S = 600

# (id, phrases that must all occur), first match wins; phrases are compared after lower-casing
# and collapsing whitespace, so line wrapping in the license file does not matter.
LICENSE_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("agpl-3.0", ("gnu affero general public license",)),
    ("lgpl-3.0", ("gnu lesser general public license", "version 3")),
    ("lgpl-2.1", ("gnu lesser general public license",)),
    ("lgpl-2.1", ("gnu library general public license",)),
    ("gpl-3.0", ("gnu general public license", "version 3")),
    ("gpl-2.0", ("gnu general public license", "version 2")),
    ("apache-2.0", ("apache license", "version 2.0")),
    ("mpl-2.0", ("mozilla public license", "2.0")),
    ("epl-2.0", ("eclipse public license", "2.0")),
    ("bsl-1.0", ("boost software license",)),
    ("unlicense", ("this is free and unencumbered software released into the public domain",)),
    ("cc0-1.0", ("cc0 1.0 universal",)),
    ("bsd-3-clause", ("redistribution and use in source and binary forms", "neither the name")),
    ("bsd-2-clause", ("redistribution and use in source and binary forms",)),
    ("isc", ("permission to use, copy, modify, and/or distribute this software for any purpose",)),
    ("mit", ("permission is hereby granted, free of charge",)),
    ("zlib", ("this software is provided 'as-is'", "altered source versions must be plainly marked")),
    ("wtfpl", ("do what the fuck you want to public license",)),
]
_URL = re.compile(r"^(?:https?://|ssh://|git://|file://|git\+\w+://|[\w.\-]+@[\w.\-]+:)")


def is_git_url(source: str) -> bool:
    """True for a repository address to clone (https, ssh, git, file, or scp-like `git@host:path`)."""
    return bool(_URL.match(source))


def normalize_url(url: str) -> str:
    """One spelling per repository: `git@github.com:A/b.git` == `https://github.com/a/b`."""
    u = url.strip()
    m = re.match(r"^[\w.\-]+@([\w.\-]+):(.+)$", u)
    if m:
        u = f"{m.group(1)}/{m.group(2)}"
    else:
        u = re.sub(r"^(?:git\+)?\w+://", "", u)
        u = re.sub(r"^[^/@]+@", "", u)  # credentials or ssh user
    u = re.sub(r"(?:\.git)?/*$", "", u)
    return u.lower()


def is_repository(path: Path) -> bool:
    """A directory with a `.git` directory (or a `.git` file, as in worktrees/submodules)."""
    return (path / ".git").exists()


def remote_url(root: Path) -> str | None:
    """The normalised URL of `origin` (or the first remote) from `.git/config`, or None."""
    config = root / ".git" / "config"
    if not config.is_file():
        return None
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        parser.read(config, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return None
    sections = [s for s in parser.sections() if s.startswith("remote ")]
    sections.sort(key=lambda s: s != 'remote "origin"')
    for section in sections:
        url = parser.get(section, "url", fallback=None)
        if url:
            return normalize_url(url)
    return None


def identify_license(text: str) -> str:
    """The license id for a license text, or `unknown`."""
    flat = " ".join(text.lower().split())
    for spdx, phrases in LICENSE_RULES:
        if all(p in flat for p in phrases):
            return spdx
    return "unknown"


def detect_license(root: Path) -> str | None:
    """The repository's license from its top-level license files; None when it has none."""
    try:
        names = sorted(p for p in root.iterdir() if p.is_file())
    except OSError:
        return None
    candidates = [p for p in names if p.name.upper().split(".")[0] in LICENSE_FILES]
    for path in candidates:
        try:
            spdx = identify_license(path.read_text(encoding="utf-8", errors="replace")[:100_000])
        except OSError:
            continue
        if spdx != "unknown":
            return spdx
    return "unknown" if candidates else None


def cache_dir(option: str | None) -> Path:
    """Where URLs are cloned: the option, else $XDG_CACHE_HOME/scratchlm/git."""
    if option:
        return Path(option)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scratchlm" / "git"


def clone(url: str, cache: Path) -> Path:
    """Shallow-clone `url` into the cache (once); returns the working tree. Raises UserError."""
    if shutil.which("git") is None:
        raise UserError("git is not installed; install it (apt-get install git) to ingest URLs")
    name = re.sub(r"[^\w.\-]+", "-", normalize_url(url).rsplit("/", 1)[-1])[:40]
    dest = cache / f"{name}-{hashlib.sha256(normalize_url(url).encode()).hexdigest()[:12]}"
    if is_repository(dest):
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".clone-", dir=cache))
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    try:
        proc = subprocess.run(
            ["git", "clone", "--depth", "1", "--quiet", "--", url, str(tmp / "repo")],
            env=env, capture_output=True, text=True, timeout=CLONE_TIMEOUT_S, check=False,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["git clone failed"])[-1]
            raise UserError(f"cannot clone {url}: {last}")
        os.replace(tmp / "repo", dest)  # atomic: a half-finished clone is never reused
    except subprocess.TimeoutExpired:
        raise UserError(f"cloning {url} took over {CLONE_TIMEOUT_S} s; clone it yourself and pass the path") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
