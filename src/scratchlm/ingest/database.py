"""Databases: rows of one table column, or of a read-only query, as documents.

Driven by `scratchlm.ingest.driver` for a source that is a SQLAlchemy URL (`sqlite:///path.db`,
`postgresql://user@host/db`, ...). Two modes, mirroring the `scratchlm ingest` flags:

- `--table T --column C [--where-column W --where-value V]`: `T`, `C` and `W` must name a real
  table/view and real columns (checked against the database's own schema, the error lists the
  valid names); the statement is built with SQLAlchemy Core, which quotes identifiers, and `V`
  is a bound parameter. User strings are never formatted into SQL.
- `--query "SELECT ..."`: one SELECT (or WITH ... SELECT) statement, run on a connection that is
  read-only at the database level where the driver allows it (SQLite `mode=ro` + `query_only`,
  PostgreSQL `postgresql_readonly`, i.e. a READ ONLY transaction) and rolled back afterwards. The first column is the
  text.

Rows stream in batches of `BATCH_ROWS` (server-side cursors where supported), so a table of any
size is read in bounded memory. A row's source is `URL#table=T&row=N` (or `#query&row=N`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from scratchlm.errors import UserError
from scratchlm.ingest.document import Document, IngestOptions

BATCH_ROWS = 1000
URL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql", "duckdb",
               "cockroachdb", "snowflake", "redshift", "bigquery", "clickhouse")  # fmt: skip
_SELECT_ONLY = re.compile(r"^\s*(?:select|with)\b", re.IGNORECASE)


def is_database_url(source: str) -> bool:
    """True for `dialect://...` or `dialect+driver://...` with a known SQL dialect."""
    m = re.match(r"^([a-z][a-z0-9]*)(?:\+[a-z0-9_]+)?://", source)
    return bool(m) and m.group(1) in URL_SCHEMES


def redact(url: str) -> str:
    """The URL with its password hidden, for sources and messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a URL too broken to parse has no password we can find
        return url


def sqlite_file(url: str) -> Path | None:
    """The file behind a `sqlite:///path` URL, or None for other databases / in-memory."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def _engine(url: str):
    """A SQLAlchemy engine; SQLite files are opened read-only so nothing can write to them."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        u = make_url(url)
    except ArgumentError as e:
        raise UserError(f"bad database URL {redact(url)!r}: {e}") from None
    path = sqlite_file(url)
    if u.get_backend_name() == "sqlite":
        if path is None:
            raise UserError(f"database URL {url!r} names no SQLite file (use sqlite:///path.db)")
        if not path.is_file():
            raise UserError(f"no such SQLite database file: {path}")
        import sqlite3

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
            return conn

        return create_engine("sqlite://", creator=connect)
    try:
        return create_engine(u)
    except (NoSuchModuleError, ImportError) as e:
        raise UserError(f"cannot open {redact(url)}: {e} (install the database driver)") from None


def check_source(url: str, opts: IngestOptions) -> None:
    """Validate flags and identifiers before any work starts; raises UserError naming valid ones."""
    if opts.query and opts.table:
        raise UserError("give either --query or --table/--column, not both")
    if opts.query:
        check_query(opts.query)
    elif not (opts.table and opts.column):
        raise UserError(f"database source {redact(url)} needs --table and --column, or --query")
    if bool(opts.where_column) != (opts.where_value is not None):
        raise UserError("--where-column and --where-value go together")
    engine = _engine(url)
    try:
        if not opts.query:
            _table(engine, opts)
    finally:
        engine.dispose()


def check_query(query: str) -> None:
    """One read-only SELECT statement; anything else is refused before it reaches the database."""
    body = query.strip().rstrip(";").strip()
    if not _SELECT_ONLY.match(body) or ";" in body:
        raise UserError("--query must be a single SELECT (or WITH ... SELECT) statement")


def _table(engine, opts: IngestOptions):
    """The reflected Table for --table, after checking every identifier against the schema."""
    from sqlalchemy import MetaData, Table, inspect
    from sqlalchemy.exc import OperationalError

    try:
        inspector = inspect(engine)
        names = sorted(inspector.get_table_names() + inspector.get_view_names())
    except OperationalError as e:
        raise UserError(f"cannot read the database schema: {e.orig}") from None
    if opts.table not in names:
        raise UserError(f"no table {opts.table!r}; tables are: {', '.join(names) or '(none)'}")
    table = Table(opts.table, MetaData(), autoload_with=engine)
    for flag, column in (("--column", opts.column), ("--where-column", opts.where_column)):
        if column is not None and column not in table.c:
            valid = ", ".join(c.name for c in table.c)
            raise UserError(f"{flag}: no column {column!r} in {opts.table}; columns are: {valid}")
    return table


def _statement(engine, opts: IngestOptions):
    """The SELECT to run: Core-built for --table (quoted identifiers, bound value) or --query."""
    from sqlalchemy import select, text

    if opts.query:
        check_query(opts.query)
        return text(opts.query.strip().rstrip(";"))
    table = _table(engine, opts)
    stmt = select(table.c[opts.column])
    if opts.where_column is not None:
        col = table.c[opts.where_column]
        value: object = opts.where_value
        try:  # bind with the column's own Python type (PostgreSQL will not compare int to text)
            value = col.type.python_type(opts.where_value)
        except (NotImplementedError, ValueError, TypeError):
            pass
        stmt = stmt.where(col == value)
    order = list(table.primary_key.columns) or [table.c[opts.column]]
    return stmt.order_by(*order)  # a stable order makes row numbers (and output) deterministic


def extract(url: str, opts: IngestOptions) -> Iterator[Document]:
    """Stream one document per row with non-empty text."""
    engine = _engine(url)
    where = "query" if opts.query else f"table={opts.table}"
    shown = redact(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":  # the server itself refuses writes
                conn = conn.execution_options(postgresql_readonly=True)
            stmt = _statement(engine, opts)
            result = conn.execution_options(stream_results=True, yield_per=BATCH_ROWS).execute(stmt)
            for n, row in enumerate(result, 1):
                value = row[0]
                if isinstance(value, bytes):
                    value = value.decode("utf-8", errors="replace")
                if value is None or not str(value).strip():
                    continue
                yield Document(text=str(value), type="database", source=f"{shown}#{where}&row={n}",
                               extractor="sqlalchemy")
            conn.rollback()
    finally:
        engine.dispose()
