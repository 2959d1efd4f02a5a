"""JSON, JSON Lines, CSV and TSV: one document per record.

Driven by `scratchlm.ingest.driver` for `.json`, `.jsonl`, `.ndjson`, `.csv`, `.tsv`.

- JSON Lines: one record per line, streamed; source `file.jsonl#line=N` (1-based).
- JSON: a top-level list gives one record per element (`#item=N`, 0-based), anything else one.
- The text of a record is `--text-field` (a dotted path: `body`, `post.body`, `messages.0.text`),
  else its `text` field, else all its string leaves joined by newlines (keys in file order).
  A record without the requested field is dropped and counted in the manifest reason.
- CSV/TSV: `--text-column NAME`, else a `text` column, else every non-empty cell as
  `column: value` lines; source `file.csv#row=N` (1-based, header excluded).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from scratchlm.ingest.document import Document, IngestOptions, Skip
from scratchlm.ingest.text import read_text

csv.field_size_limit(64 * 1024 * 1024)  # one cell may hold a whole article


def string_leaves(value: object) -> Iterator[str]:
    """Every string inside a JSON value, depth first, in document order."""
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from string_leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from string_leaves(v)


def field_at(record: object, dotted: str) -> object | None:
    """Follow a dotted path (`a.b.0.c`) into nested objects and lists; None when absent."""
    node = record
    for part in dotted.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def record_text(record: object, text_field: str | None) -> str | None:
    """The text of one JSON record under the rule in the module docstring."""
    if text_field:
        value = field_at(record, text_field)
    elif isinstance(record, dict) and isinstance(record.get("text"), str):
        value = record["text"]
    else:
        value = record
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return "\n".join(string_leaves(value)) or None


def extract_json(path: Path, opts: IngestOptions) -> Iterator[Document]:
    """Records of a JSON or JSON Lines file (by extension)."""
    text = read_text(path, opts)
    missing = 0
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        records = ((f"line={n}", line) for n, line in enumerate(text.split("\n"), 1) if line.strip())
        parsed: Iterator[tuple[str, object]] = ((where, _loads(line, where)) for where, line in records)
    else:
        data = _loads(text, "file")
        items = data if isinstance(data, list) else [data]
        parsed = ((f"item={i}", item) for i, item in enumerate(items))
    produced = 0
    for where, record in parsed:
        body = record_text(record, opts.text_field)
        if body is None:
            missing += 1
            continue
        produced += 1
        yield Document(text=body, type="json", source=f"{path}#{where}", extractor="json")
    if not produced:
        field = opts.text_field or "text / string leaves"
        raise Skip(f"no record has a text field ({field}); {missing} records without it")


def _loads(s: str, where: str) -> object:
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON at {where}: {e}") from None


def extract_csv(path: Path, opts: IngestOptions) -> Iterator[Document]:
    """Rows of a CSV or TSV file (tab-delimited by extension `.tsv`)."""
    text = read_text(path, opts)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = reader.fieldnames or []
    column = opts.text_column or ("text" if "text" in columns else None)
    if column is not None and column not in columns:
        raise Skip(f"no column {column!r}; columns are {', '.join(columns)}")
    for n, row in enumerate(reader, 1):
        if column is not None:
            body = row.get(column) or ""
        else:
            body = "\n".join(f"{k}: {v}" for k, v in row.items() if k and isinstance(v, str) and v.strip())
        if body.strip():
            yield Document(text=body, type="csv", source=f"{path}#row={n}", extractor="csv")
