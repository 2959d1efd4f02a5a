"""The walk: turn SOURCE arguments into a stream of inputs (`Item`) and walk-level decisions.

Driven by `scratchlm.ingest.driver.ingest`, which consumes `walk(sources, opts)` lazily. The walk
never lists more than one directory at a time, so memory does not grow with the corpus.

Order is deterministic: sources in the order given; inside a directory, its files by name, then
its subdirectories by name (depth first). Decisions taken here, each yielded as a `Record` for
the manifest: vendored/build directories, `.gitignore`d paths, `--include`/`--exclude`, lock
files, empty or over-size files, non-regular files, broken symlinks and symlink loops, duplicate
repositories and `--licenses`. Everything else becomes an `Item` for a worker.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.ingest import code, database, git
from scratchlm.ingest.document import IngestOptions

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".gz")


def display(name: str) -> str:
    """A path as valid UTF-8 text: undecodable bytes in file names (kept by Python as lone
    surrogates, which cannot be written as UTF-8) become U+FFFD."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass
class Item:
    """One input for a worker: a file, an archive, or a database URL."""

    kind: str  # "file" | "archive" | "database"
    path: str  # where to read it: a filesystem path or the database URL
    source: str  # how the manifest and documents name it
    size: int | None = None
    mtime_ns: int | None = None
    license: str | None = None  # the enclosing repository's license, when known

    def __post_init__(self) -> None:
        self.source = display(self.source)  # `path` keeps the real bytes for opening


@dataclass
class Record:
    """One manifest line. `size`/`mtime_ns` identify the input version for resume."""

    source: str
    status: str  # ok | skipped | failed
    reason: str = ""
    documents: int = 0
    bytes_in: int = 0
    chars_out: int = 0
    seconds: float = 0.0
    size: int | None = None
    mtime_ns: int | None = None
    walk_level: bool = False  # decided by the walk (filters), not by reading the input
    member: bool = False  # an archive member: its bytes are counted in the archive's record

    def __post_init__(self) -> None:
        self.source = display(self.source)

    def to_json(self) -> dict:
        out = {"source": self.source, "status": self.status, "reason": self.reason,
               "documents": self.documents, "bytes_in": self.bytes_in,
               "chars_out": self.chars_out, "seconds": round(self.seconds, 4)}  # fmt: skip
        if self.size is not None:
            out["size"], out["mtime_ns"] = self.size, self.mtime_ns
        return out


@dataclass
class _Dir:
    path: Path
    rel: str  # path relative to the walk's top, "/"-separated; "" for the top
    ignores: tuple[tuple[str, object], ...]  # (.gitignore's directory rel, GitIgnoreSpec)
    license: str | None
    ancestors: frozenset[tuple[int, int]] = field(default_factory=frozenset)


def is_archive(name: str) -> bool:
    """Archives read in place (members become inputs); `.jsonl.gz` counts as a gzip archive."""
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def matches(patterns: list[str], rel: str) -> bool:
    """A glob matches the relative path or, for patterns without '/', the base name."""
    base = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or ("/" not in p and fnmatch.fnmatchcase(base, p)) for p in patterns)


def _gitignored(ignores: tuple[tuple[str, object], ...], rel: str, is_dir: bool) -> bool:
    """Git's rule: the deepest .gitignore with a matching pattern decides; `!` re-includes."""
    verdict = None
    for base, spec in ignores:
        if base and not rel.startswith(base + "/"):
            continue
        sub = rel[len(base) + 1:] if base else rel
        result = spec.check_file(sub + "/" if is_dir else sub)  # type: ignore[attr-defined]
        if result.include is not None:
            verdict = result.include
    return bool(verdict)


def _load_gitignore(path: Path):
    try:
        import pathspec
    except ImportError:
        raise UserError("reading .gitignore files needs pathspec: pip install pathspec") from None

    with open(path, encoding="utf-8", errors="replace") as f:
        return pathspec.GitIgnoreSpec.from_lines(f.read().splitlines())


def _stat_problem(e: OSError) -> tuple[str, str]:
    """(status, reason) for an input we could not stat or list."""
    if e.errno == errno.ELOOP:
        return "skipped", "symlink loop"
    if e.errno == errno.ENOENT:
        return "skipped", "broken symlink or vanished"
    if e.errno == errno.EACCES:
        return "failed", "permission denied"
    return "failed", f"{type(e).__name__}: {e.strerror or e}"


def walk(sources: list[str], opts: IngestOptions, seen_repos: set[str], out_dir: Path | None = None) -> Iterator[Item | Record]:
    """Every input and walk-level decision for the SOURCE arguments, in deterministic order.

    `out_dir` (the corpus being written) is never walked, even when it lies inside a source.
    """
    skip: set[tuple[int, int]] = set()
    if out_dir is not None and out_dir.exists():
        st = out_dir.stat()
        skip.add((st.st_dev, st.st_ino))
    for src in sources:
        if database.is_database_url(src):
            path = database.sqlite_file(src)
            st = path.stat() if path is not None and path.exists() else None
            yield Item("database", src, database.redact(src),
                       st.st_size if st else None, st.st_mtime_ns if st else None)  # fmt: skip
        elif git.is_git_url(src):
            ident = git.normalize_url(src)
            if ident in seen_repos:
                yield Record(src, "skipped", "duplicate repository", walk_level=True)
                continue
            try:
                root = git.clone(src, git.cache_dir(opts.git_cache))
            except Exception as e:  # a failed clone is this source's failure, not the run's
                yield Record(src, "failed", str(e), walk_level=True)
                continue
            yield from _walk_tree(root, opts, seen_repos, src.rstrip("/"), skip)
        elif os.path.isdir(src):
            yield from _walk_tree(Path(src), opts, seen_repos, None, skip)
        elif os.path.lexists(src):
            p = Path(src)
            yield from _file(p, p.name, None, opts, str(p))
        else:
            yield Record(src, "failed", "no such file, directory, repository URL or database URL", walk_level=True)


def _walk_tree(top: Path, opts: IngestOptions, seen_repos: set[str], display: str | None,
               skip: set[tuple[int, int]]) -> Iterator[Item | Record]:
    """Depth-first walk of one directory tree; `display` replaces `top` in sources (clones)."""

    def shown(rel: str) -> str:
        prefix = display if display is not None else str(top)
        return f"{prefix}/{rel}" if rel else prefix

    real_top = os.path.realpath(top)

    def inside_top(entry: os.DirEntry) -> bool:
        """A symlink whose target lies inside this tree: the walk reaches the target anyway."""
        if not entry.is_symlink() or not os.path.exists(entry.path):  # loops and dangling: see _file
            return False
        target = os.path.realpath(entry.path)
        return target == real_top or target.startswith(real_top + os.sep)

    stack = [_Dir(top, "", (), None)]
    while stack:
        d = stack.pop()
        try:
            st = d.path.stat()
        except OSError as e:
            status, reason = _stat_problem(e)
            yield Record(shown(d.rel), status, reason, walk_level=True)
            continue
        key = (st.st_dev, st.st_ino)
        if key in skip:
            yield Record(shown(d.rel), "skipped", "the output directory", walk_level=True)
            continue
        if key in d.ancestors:
            yield Record(shown(d.rel), "skipped", "symlink loop (links to an enclosing directory)", walk_level=True)
            continue
        license, ignores = d.license, d.ignores
        if git.is_repository(d.path):
            remote = git.remote_url(d.path)
            ident = remote or (git.normalize_url(display) if display and not d.rel else str(d.path.resolve()))
            if ident in seen_repos:
                yield Record(shown(d.rel), "skipped", f"duplicate repository ({ident})", walk_level=True)
                continue
            seen_repos.add(ident)
            license = git.detect_license(d.path)
            if opts.licenses and (license or "none") not in {x.lower() for x in opts.licenses}:
                yield Record(shown(d.rel), "skipped", f"license {license or 'none'} not in --licenses", walk_level=True)
                continue
            ignores = ()  # a nested repository has its own ignore rules
        gitignore = d.path / ".gitignore"
        if gitignore.is_file():
            try:
                ignores = ignores + ((d.rel, _load_gitignore(gitignore)),)
            except OSError:
                pass  # an unreadable .gitignore ignores nothing, like git
        try:
            with os.scandir(d.path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            status, reason = _stat_problem(e)
            yield Record(shown(d.rel), status, reason, walk_level=True)
            continue
        subdirs: list[_Dir] = []
        for entry in entries:
            rel = f"{d.rel}/{entry.name}" if d.rel else entry.name
            try:
                is_dir = entry.is_dir()  # follows symlinks; loops are caught by `ancestors`
            except OSError:
                is_dir = False
            if is_dir or entry.is_symlink():
                if inside_top(entry):
                    yield Record(shown(rel), "skipped", "symlink into the same source (read there)", walk_level=True)
                    continue
            if is_dir:
                if code.is_vendored_dir(entry.name):
                    if entry.name not in (".git", "__pycache__"):  # too common to be worth a line
                        yield Record(shown(rel), "skipped", "vendored, build or tool directory", walk_level=True)
                elif ignores and _gitignored(ignores, rel, True):
                    yield Record(shown(rel), "skipped", "ignored by .gitignore", walk_level=True)
                elif opts.exclude and matches(opts.exclude, rel):
                    yield Record(shown(rel), "skipped", "matches --exclude", walk_level=True)
                else:
                    subdirs.append(_Dir(Path(entry.path), rel, ignores, license, d.ancestors | {key}))
            elif ignores and _gitignored(ignores, rel, False):
                yield Record(shown(rel), "skipped", "ignored by .gitignore", walk_level=True)
            elif entry.name != ".git":
                yield from _file(Path(entry.path), rel, license, opts, shown(rel))
        stack.extend(reversed(subdirs))


def _file(path: Path, rel: str, license: str | None, opts: IngestOptions, source: str) -> Iterator[Item | Record]:
    """The Item for one file, or the Record saying why it is not read."""
    try:
        st = path.stat()
    except OSError as e:
        status, reason = _stat_problem(e)
        yield Record(source, status, reason, walk_level=True)
        return
    if opts.exclude and matches(opts.exclude, rel):
        yield Record(source, "skipped", "matches --exclude", walk_level=True)
        return
    if opts.include and not matches(opts.include, rel) and not is_archive(path.name):  # members are filtered
        yield Record(source, "skipped", "matches no --include", walk_level=True)
        return
    size, mtime = st.st_size, st.st_mtime_ns
    if not stat.S_ISREG(st.st_mode):
        yield Record(source, "skipped", "not a regular file", walk_level=True)
    elif code.is_metadata_file(path.name):
        yield Record(source, "skipped", "repository or tool metadata", walk_level=True)
    elif code.is_lock_file(path.name):
        yield Record(source, "skipped", "lock file", size=size, mtime_ns=mtime)
    elif size == 0:
        yield Record(source, "skipped", "empty file", size=size, mtime_ns=mtime)
    elif is_archive(path.name):
        yield Item("archive", str(path), source, size, mtime, license)
    elif size > opts.max_file_bytes:
        yield Record(source, "skipped", f"larger than max_file_bytes ({opts.max_file_bytes})",
                     bytes_in=0, size=size, mtime_ns=mtime)  # fmt: skip
    else:
        yield Item("file", str(path), source, size, mtime, license)
