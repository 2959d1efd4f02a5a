"""Ingest: turn files, folders, archives, git repositories and databases into a training corpus.

Driven by `scratchlm ingest SOURCE... --out CORPUS_DIR`, which calls `ingest()`. The output is
`CORPUS_DIR/part-NNNNN.jsonl[.gz|.zst]` (one JSON document per line: id, sha256, text, source,
type, extractor, language, license) plus `manifest.jsonl` (one line per input seen) and a
hidden `.ingest/` folder of resume state. `scratchlm prepare` reads `part-*.jsonl*`.

Module map: `walk` (sources -> inputs), `driver` (workers, shards, manifest, resume), one module
per kind of source (`text`, `code`, `web`, `structured`, `database`, `git`, `archive`, and the
PDF/image/office extractors `pdf`, `ocr`, `office`), and `clean` (normalise, scrub, filter,
dedup). How it all works, for a reader: docs/ingest.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.ingest.document import Document, IngestOptions, Skip

__all__ = ["Document", "IngestOptions", "Skip", "ingest"]


def _check(sources: list[str], opts: IngestOptions) -> None:
    """User mistakes found before any work starts, each one line naming what to do."""
    from scratchlm.ingest import database, git

    if not sources:
        raise UserError("no SOURCE given: pass files, folders, archives, repository URLs or database URLs")
    if opts.workers < 1:
        raise UserError(f"--workers must be at least 1 (got {opts.workers})")
    if opts.dedup not in ("exact", "near", "none"):
        raise UserError(f"--dedup {opts.dedup!r}: choose exact, near or none")
    if opts.compression not in ("none", "gz", "zst"):
        raise UserError(f"compression {opts.compression!r}: choose none, gz or zst")
    if opts.max_file_bytes < 1:
        raise UserError("--max-file-mb must be positive")
    remote = [s for s in sources if database.is_database_url(s) or git.is_git_url(s)]
    if not remote and not any(os.path.lexists(s) for s in sources):
        shown = ", ".join(sources[:3]) + (" ..." if len(sources) > 3 else "")
        raise UserError(f"no such file or directory: {shown}")
    for s in sources:
        if "://" in s and not database.is_database_url(s) and not git.is_git_url(s) and not os.path.exists(s):
            raise UserError(f"unsupported URL {s!r}: expected a git URL (https://, ssh://, git@) or a database URL (sqlite:///path.db)")
        if database.is_database_url(s):
            database.check_source(s, opts)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the corpus")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"--out {out} is not writable")


def ingest(sources: list[str], out_dir: str | Path, options: IngestOptions, json_summary: bool = False) -> dict:
    """Ingest every source into `out_dir` and return the summary.

    Args:
        sources: files, directories, archives, git repository paths or URLs, database URLs.
        out_dir: the corpus directory; re-running with the same one resumes.
        options: see `IngestOptions` (the `scratchlm ingest` flags).
        json_summary: the caller prints the summary as JSON (`scratchlm ingest --json`), so
            stdout is kept clean; otherwise a one-line report is printed to stdout.
    Returns:
        The summary dict: `documents` (in the corpus), `ok`/`skipped`/`failed`/`resumed` input
        counts, `types`, `bytes_in`, `chars_out`, `duplicates_removed`, `seconds`, `out_dir`, ...
    Example:
        >>> ingest(["docs/", "sqlite:///tickets.db"], "corpus", IngestOptions(table="t", column="body"))
    """
    from scratchlm.ingest.driver import run

    _check(sources, options)
    _check_out(Path(out_dir))
    summary = run(sources, Path(out_dir), options).to_json()
    if not json_summary:
        types = ", ".join(f"{n} {t}" for t, n in summary["types"].items()) or "none"
        print(
            f"ingested {summary['documents_written']} documents ({types}) from {summary['ok']} inputs "
            f"in {summary['seconds']:.1f} s; skipped {summary['skipped']}, failed {summary['failed']}, "
            f"resumed {summary['resumed']}, duplicates removed {summary['duplicates_removed']}; "
            f"corpus {summary['out_dir']} holds {summary['documents']} documents "
            f"(details: {Path(out_dir) / 'manifest.jsonl'})",
            file=sys.stdout,
        )
    return summary
