"""Tests for `scratchlm.ingest` (driver, text/code/web/structured/database/git, cleaning).

Every test builds its inputs on the fly in tmp_path: real files, real archives, real SQLite
databases and real git repositories; nothing of ours is mocked. PDF/image/office extraction is
tested in tests/test_ingest_pdf_ocr.py.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from scratchlm.errors import UserError
from scratchlm.ingest import IngestOptions, ingest
from scratchlm.ingest.clean import SECRET_PLACEHOLDER, quality_problem, scrub_secrets
from scratchlm.ingest.driver import process_item
from scratchlm.ingest.shards import open_shard_for_reading
from scratchlm.ingest.walk import Item

PROSE = (
    "The committee met on Tuesday to review the proposal for a new library in the north end of "
    "town. Several residents spoke in favour, pointing to the long bus ride to the current branch "
    "and the lack of quiet places for students to work after school. "
)


def run(sources, out, **kw) -> dict:
    kw.setdefault("progress", False)
    return ingest([str(s) for s in sources], out, IngestOptions(**kw))


def docs(out: Path) -> list[dict]:
    rows = []
    for shard in sorted(Path(out).glob("part-*.jsonl*")):
        with open_shard_for_reading(shard) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def manifest(out: Path) -> dict[str, dict]:
    with open(Path(out) / "manifest.jsonl", encoding="utf-8") as f:
        return {r["source"]: r for r in map(json.loads, f)}


def by_suffix(records: dict[str, dict], suffix: str) -> dict:
    (hit,) = [r for s, r in records.items() if s.endswith(suffix)]
    return hit


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main", *args],
                   cwd=cwd, check=True, capture_output=True)  # fmt: skip


# --- formats ---------------------------------------------------------------------------------
def test_formats_and_document_fields(tmp_path):
    src = tmp_path / "src"
    write(src / "notes.txt", "line one\r\nline two\r\n" + PROSE)
    write(src / "guide.md", "# Title\n\n" + PROSE)
    write(src / "index.rst", "Title\n=====\n\n" + PROSE)
    code = "import os\n\n\nclass A:\n    def f(self):\n\t\treturn {'a': [1, 2]}  \n"
    write(src / "pkg" / "mod.py", code)
    write(src / "bin" / "tool", "#!/usr/bin/env bash\nset -eu\necho hi\n")
    write(src / "page.html", "<html><head><title>Library</title><style>p{}</style><script>var x=1</script>"
          "</head><body><nav>Home | About</nav><main><h1>Library</h1><p>" + PROSE + "</p>"
          "<ul><li>first item</li><li>second item</li></ul><pre>x = 1\n    y = 2</pre></main></body></html>")
    write(src / "data.jsonl", json.dumps({"meta": {"body": PROSE + "A"}}) + "\n" + json.dumps({"meta": {}}) + "\n")
    write(src / "table.csv", 'id,body\n1,"' + PROSE + 'B"\n2,"' + PROSE + 'C"\n')
    out = tmp_path / "out"
    summary = run([src], out, text_field="meta.body", text_column="body")
    rows = {Path(d["source"].split("#")[0]).name + ("#" + d["source"].split("#")[1] if "#" in d["source"] else ""): d for d in docs(out)}
    assert rows["notes.txt"]["text"].startswith("line one\nline two\n")  # newlines normalised
    assert rows["guide.md"]["type"] == "markdown" and rows["index.rst"]["type"] == "rst"
    py = rows["mod.py"]
    assert py["text"] == code and py["type"] == "code" and py["language"] == "python"  # whitespace exact
    assert rows["tool"]["language"] == "shell"  # by shebang
    html = rows["page.html"]["text"]
    assert "Library" in html and "first item\nsecond item" in html and "x = 1\n    y = 2" in html
    assert "var x" not in html and "Home | About" not in html and "<p>" not in html
    assert rows["data.jsonl#line=1"]["text"].endswith("A") and rows["data.jsonl#line=1"]["type"] == "json"
    assert rows["table.csv#row=2"]["text"].endswith("C") and rows["table.csv#row=2"]["type"] == "csv"
    for d in rows.values():
        assert set(d) >= {"id", "text", "source", "type", "sha256", "extractor"}
    assert summary["documents"] == len(rows) == 9
    assert summary["types"]["code"] == 2 and summary["failed"] == 0


def test_json_default_text_field_and_string_leaves(tmp_path):
    write(tmp_path / "a.json", json.dumps([{"text": PROSE + "1", "x": "not this"}, {"title": "T", "body": PROSE + "2"}]))
    rows = docs(tmp_path / "out") if run([tmp_path / "a.json"], tmp_path / "out") else []
    assert [r["text"] for r in rows] == [PROSE + "1", "T\n" + PROSE + "2"]


# --- bad input -------------------------------------------------------------------------------
def test_bad_inputs_are_recorded_and_never_stop_the_run(tmp_path):
    src = tmp_path / "src"
    write(src / "good.txt", PROSE)
    write(src / "zero.txt", b"")
    write(src / "binary.txt", bytes(range(256)) * 10)
    write(src / "latin1.txt", (PROSE + "caf\xe9 ").encode("latin-1") * 3)  # 3 bad bytes in ~700: kept
    write(src / "garbage.md", bytes([0xC3, 0x28, 0xA0, 0xA1]) * 500)  # invalid UTF-8 throughout
    write(src / "huge.log", "x" * 5000)
    write(src / "bad.zip", b"PK\x03\x04 this is not really a zip")
    good_tgz = io.BytesIO()
    with tarfile.open(fileobj=good_tgz, mode="w:gz") as tf:
        data = (PROSE * 50).encode()
        info = tarfile.TarInfo("inner/doc.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    write(src / "truncated.tar.gz", good_tgz.getvalue()[: len(good_tgz.getvalue()) // 2])
    write(src / "broken.pdf", b"%PDF-1.4\nnot really a pdf")
    write(src / "notes.sqlite", b"SQLite format 3\x00" + bytes(100))
    os.symlink("self_loop", src / "self_loop")  # a symlink to itself
    os.symlink(".", src / "sub_loop")  # a directory link to an enclosing directory
    os.symlink("missing-target", src / "dangling.txt")
    with open(os.path.join(os.fsencode(src), b"latin1-name-\xe9.txt"), "w") as f:  # not a UTF-8 file name
        f.write(PROSE + " odd name")
    out = tmp_path / "out"
    summary = run([src], out, max_file_bytes=4000)
    m = manifest(out)
    assert by_suffix(m, "good.txt")["status"] == "ok"
    assert by_suffix(m, "zero.txt")["reason"] == "empty file"
    assert by_suffix(m, "binary.txt")["reason"] == "binary content"
    latin = [d for d in docs(out) if d["source"].endswith("latin1.txt")][0]
    assert "\ufffd" in latin["text"] and by_suffix(m, "latin1.txt")["status"] == "ok"
    assert by_suffix(m, "garbage.md")["reason"].startswith("not UTF-8")
    assert by_suffix(m, "huge.log")["reason"].startswith("larger than max_file_bytes")
    assert by_suffix(m, "bad.zip")["status"] == "failed" and "archive" in by_suffix(m, "bad.zip")["reason"]
    assert by_suffix(m, "truncated.tar.gz")["status"] == "failed"
    assert by_suffix(m, "broken.pdf")["status"] in ("failed", "skipped") and by_suffix(m, "broken.pdf")["reason"]
    assert by_suffix(m, "notes.sqlite")["reason"].endswith("ingest it as sqlite:///PATH with --table and --column")
    assert "symlink loop" in by_suffix(m, "self_loop")["reason"]
    assert "symlink into the same source" in by_suffix(m, "sub_loop")["reason"]
    assert by_suffix(m, "dangling.txt")["status"] == "skipped"
    assert by_suffix(m, "latin1-name-\ufffd.txt")["status"] == "ok"
    assert any(d["source"].endswith("latin1-name-\ufffd.txt") for d in docs(out))
    assert summary["documents"] == 3 and summary["failed"] >= 3
    assert all(r["reason"] for r in m.values() if r["status"] != "ok")


def test_symlink_to_an_enclosing_directory_outside_the_source(tmp_path):
    write(tmp_path / "outer" / "a.txt", PROSE)
    write(tmp_path / "outer" / "inner" / "b.txt", PROSE + "b")
    os.symlink("..", tmp_path / "outer" / "inner" / "up")  # inner/up/inner/up/... forever
    summary = run([tmp_path / "outer" / "inner"], tmp_path / "out")
    m = manifest(tmp_path / "out")
    assert "symlink loop" in by_suffix(m, "inner/up/inner")["reason"]
    assert summary["documents"] == 2  # b.txt, and a.txt through the link


def test_file_vanishing_between_walk_and_read_fails_that_input_only(tmp_path):
    path = write(tmp_path / "gone.txt", PROSE)
    st = path.stat()
    item = Item("file", str(path), str(path), st.st_size, st.st_mtime_ns)
    path.unlink()  # the walk saw it; by the time a worker opens it, it is gone
    (result,) = process_item(item, IngestOptions(), str(tmp_path / "spool"))
    assert result.record.status == "failed" and "vanished" in result.record.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod 000 files; permission denial cannot be staged")
def test_unreadable_file(tmp_path):
    write(tmp_path / "src" / "ok.txt", PROSE)
    locked = write(tmp_path / "src" / "locked.txt", PROSE + "x")
    locked.chmod(0)
    summary = run([tmp_path / "src"], tmp_path / "out")
    assert by_suffix(manifest(tmp_path / "out"), "locked.txt")["reason"] == "permission denied"
    assert summary["documents"] == 1


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        run([tmp_path / "nothing-here"], tmp_path / "out")
    with pytest.raises(UserError):
        run(["sqlite:///" + str(tmp_path / "missing.db")], tmp_path / "out", table="t", column="c")
    with pytest.raises(UserError, match="needs --table"):
        db = tmp_path / "x.db"
        sqlite3.connect(db).close()
        run([f"sqlite:///{db}"], tmp_path / "out")


# --- resume and determinism ------------------------------------------------------------------
def make_tree(root: Path, n: int = 150) -> None:
    for i in range(n):
        write(root / f"d{i % 7}" / f"f{i:03d}.md", f"# Note {i}\n\n{PROSE} Number {i} of {n}.\n")
        if i % 5 == 0:
            write(root / f"d{i % 7}" / f"m{i:03d}.py", f"def f{i}():\n    return {i}\n")
    write(root / "dup.md", f"# Note 0\n\n{PROSE} Number 0 of {n}.\n")  # exact duplicate of f000.md


def test_resume_redoes_nothing_and_picks_up_changes(tmp_path):
    make_tree(tmp_path / "src")
    out = tmp_path / "out"
    first = run([tmp_path / "src"], out, shard_bytes=20_000)
    shards = {p.name: p.read_bytes() for p in out.glob("part-*")}
    second = run([tmp_path / "src"], out, shard_bytes=20_000)
    assert second["documents_written"] == 0 and second["ok"] == 0 and second["failed"] == 0
    assert second["resumed"] == first["ok"] + first["skipped"]
    assert second["documents"] == first["documents"]
    assert {p.name: p.read_bytes() for p in out.glob("part-*")} == shards
    write(tmp_path / "src" / "new.md", "# New\n\n" + PROSE + " brand new")
    write(tmp_path / "src" / "dup2.md", f"# Note 1\n\n{PROSE} Number 1 of 150.\n")  # dup of a 1st-run doc
    third = run([tmp_path / "src"], out, shard_bytes=20_000)
    assert third["documents_written"] == 1 and third["duplicates_removed"] == 1
    assert len(docs(out)) == third["documents"] == first["documents"] + 1


def test_output_identical_for_any_worker_count(tmp_path):
    make_tree(tmp_path / "src")
    archive = tmp_path / "src" / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/readme.md", "# Bundle\n\n" + PROSE)
        zf.writestr("a/main.go", "package main\n\nfunc main() {}\n")
    a = run([tmp_path / "src"], tmp_path / "w1", workers=1, shard_bytes=10_000)
    b = run([tmp_path / "src"], tmp_path / "w2", workers=2, shard_bytes=10_000, compression="none")
    assert a["documents"] == b["documents"] > 150 and a["duplicates_removed"] == 1
    names = sorted(p.name for p in (tmp_path / "w1").glob("part-*"))
    assert len(names) > 1 and names == sorted(p.name for p in (tmp_path / "w2").glob("part-*"))
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert any(d["source"].endswith("bundle.zip!a/main.go") and d["language"] == "go" for d in docs(tmp_path / "w1"))


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_compressed_shards(tmp_path, compression):
    make_tree(tmp_path / "src", n=20)
    s = run([tmp_path / "src"], tmp_path / "out", compression=compression)
    (shard,) = (tmp_path / "out").glob("part-*")
    assert shard.name == f"part-00000.jsonl.{compression}" and len(docs(tmp_path / "out")) == s["documents"]


def test_gzip_single_file_and_tar_members(tmp_path):
    write(tmp_path / "log.txt.gz", gzip.compress((PROSE + " from gzip").encode()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, body in [("./pkg/a.rs", "fn main() {}\n"), ("node_modules/x/index.js", "x()\n"), ("Cargo.lock", "x"),
                           ("pkg/Makefile", "all:\n\tcc -o a a.c\n"), ("../../escape.txt", PROSE + " escape")]:
            data = body.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    write(tmp_path / "src.tar.xz", buf.getvalue())
    write(tmp_path / "rows.jsonl.gz", gzip.compress((json.dumps({"text": PROSE + " row"}) + "\n").encode()))
    out = tmp_path / "out"
    run([tmp_path / "log.txt.gz", tmp_path / "src.tar.xz", tmp_path / "rows.jsonl.gz"], out)
    sources = {d["source"].rsplit("/", 1)[-1]: d for d in docs(out)}
    sources.update({d["source"].rsplit("/", 2)[-2] + "/a.rs": d for d in docs(out) if d["source"].endswith("a.rs")})
    assert sources["log.txt.gz!log.txt"]["text"].endswith("from gzip")
    assert sources["src.tar.xz!pkg/a.rs"]["language"] == "rust"
    assert sources["Makefile"]["language"] == "makefile" and sources["Makefile"]["text"] == "all:\n\tcc -o a a.c\n"
    assert sources["rows.jsonl.gz!rows.jsonl#line=1"]["text"].endswith(" row")
    assert sources["escape.txt"]["source"].endswith("src.tar.xz!../../escape.txt")  # read, never extracted
    assert not (tmp_path.parent / "escape.txt").exists()
    m = manifest(out)
    assert by_suffix(m, "!node_modules/x/index.js")["status"] == "skipped"
    assert by_suffix(m, "!Cargo.lock")["reason"] == "lock file"


# --- cleaning --------------------------------------------------------------------------------
def test_exact_and_near_dedup(tmp_path):
    words = [f"{w}{i % 13}" for i, w in enumerate((PROSE * 4).split())]  # ~180 distinct shingles
    near = words.copy()
    near[40] = "Wednesday"  # Jaccard similarity of the shingle sets ~0.95
    write(tmp_path / "src" / "a.txt", " ".join(words))
    write(tmp_path / "src" / "b.txt", " ".join(words))  # exact copy
    write(tmp_path / "src" / "c.txt", " ".join(near))  # one word changed
    exact = run([tmp_path / "src"], tmp_path / "exact", dedup="exact")
    assert exact["documents"] == 2 and exact["duplicates_removed"] == 1
    near_run = run([tmp_path / "src"], tmp_path / "near", dedup="near")
    assert near_run["documents"] == 1 and near_run["duplicates_removed"] == 2
    assert "duplicate" in by_suffix(manifest(tmp_path / "near"), "c.txt")["reason"]
    assert run([tmp_path / "src"], tmp_path / "none", dedup="none")["documents"] == 3


def test_secrets_scrubbed_by_default(tmp_path):
    secrets = {
        "aws": "AKIAIOSFODNN7EXAMPLE",
        "aws_secret": 'aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"',
        "github": "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
        "slack": "xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc\n-----END RSA PRIVATE KEY-----",
        "url": "postgres://admin:hunter2secret@db.example.com/prod",
    }
    body = "config = {\n" + "\n".join(f"    {k!r}: {v!r}," for k, v in secrets.items()) + "\n}\n"
    write(tmp_path / "src" / "settings.py", body)
    summary = run([tmp_path / "src"], tmp_path / "out")
    (doc,) = docs(tmp_path / "out")
    for name, value in secrets.items():
        assert "EXAMPLEKEY" not in doc["text"] and "hunter2secret" not in doc["text"]
        assert "a1B2c3D4" not in doc["text"] and "MIIEow" not in doc["text"] and "AKIAIOSF" not in doc["text"]
    assert doc["text"].count(SECRET_PLACEHOLDER) == len(secrets) and summary["secrets_scrubbed"] == len(secrets)
    assert "postgres://admin:" + SECRET_PLACEHOLDER + "@db.example.com" in doc["text"]
    kept = run([tmp_path / "src"], tmp_path / "raw", scrub_secrets=False)
    assert kept["secrets_scrubbed"] == 0 and "AKIAIOSFODNN7EXAMPLE" in docs(tmp_path / "raw")[0]["text"]
    assert scrub_secrets("no secrets here, just sk-short and AKIA")[1] == 0
    docs_example = "fetch http://user:pass@host/repo or https://me:${DB_PASSWORD}@db/x or ftp://a:****@h"
    assert scrub_secrets(docs_example) == (docs_example, 0)  # documentation placeholders stay


def test_quality_heuristics_drop_junk_prose_but_never_code(tmp_path):
    assert quality_problem(PROSE) is None
    assert quality_problem("buy now\n" * 20).startswith("repetitive")
    assert quality_problem("".join(f"| {i} | {i * 7} | {i % 3} |\n" for i in range(40))).startswith("mostly symbols")
    symbolic_code = "x = [[1, 2], [3, 4]]\n" * 30 + "y = {k: v for k, v in x}  # {}[]()+-*/\n" * 30
    write(tmp_path / "src" / "matrix.py", symbolic_code)
    write(tmp_path / "src" / "spam.txt", "buy now\n" * 20)
    write(tmp_path / "src" / "short.txt", "hi")
    summary = run([tmp_path / "src"], tmp_path / "out", min_chars=10)
    assert [d["source"].rsplit("/", 1)[-1] for d in docs(tmp_path / "out")] == ["matrix.py"]
    m = manifest(tmp_path / "out")
    assert by_suffix(m, "spam.txt")["reason"].startswith("repetitive")
    assert "min_chars" in by_suffix(m, "short.txt")["reason"] and summary["documents"] == 1


def test_unicode_nfc_and_control_characters(tmp_path):
    write(tmp_path / "a.txt", "Cafe\u0301 au lait\x07 is " + PROSE)
    run([tmp_path / "a.txt"], tmp_path / "out")
    (doc,) = docs(tmp_path / "out")
    assert doc["text"].startswith("Caf\u00e9 au lait is")


# --- code repositories -----------------------------------------------------------------------
MIT = ("MIT License\n\nCopyright (c) 2024 Someone\n\nPermission is hereby granted, free of charge, to any person "
       "obtaining a copy\nof this software...\n")  # fmt: skip


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def make_repo(root: Path, remote: str | None = "https://github.com/example/Tool.git") -> Path:
    write(root / "LICENSE", MIT)
    write(root / ".gitignore", "*.log\nsecret_dir/\n!keep.log\n")
    write(root / "src" / "main.py", "def main():\n    print('hi')\n")
    write(root / "src" / "debug.log", "noise " * 50)
    write(root / "src" / "keep.log", PROSE)
    write(root / "secret_dir" / "x.py", "x = 1\n")
    write(root / "node_modules" / "lib" / "index.js", "module.exports = 1;\n")
    write(root / "a" / "b" / "build" / "gen.py", "y = 2\n")
    write(root / "web" / "app.min.js", "var a=1;" * 2000)
    write(root / "web" / "app.js", "// @generated by a tool\nvar a = 1;\n")
    write(root / "package-lock.json", "{}")
    git("init", "-q", cwd=root)
    if remote:
        git("remote", "add", "origin", remote, cwd=root)
    return root


@needs_git
def test_git_repository_license_gitignore_and_vendored(tmp_path):
    repo = make_repo(tmp_path / "repo")
    out = tmp_path / "out"
    run([repo], out)
    rows = {d["source"].split("repo/", 1)[1]: d for d in docs(out)}
    assert set(rows) == {"LICENSE", "src/main.py", "src/keep.log"}
    assert all(d["license"] == "mit" for d in rows.values())
    m = manifest(out)
    assert by_suffix(m, "src/debug.log")["reason"] == "ignored by .gitignore"
    assert by_suffix(m, "repo/secret_dir")["reason"] == "ignored by .gitignore"
    assert by_suffix(m, "repo/node_modules")["status"] == "skipped"
    assert by_suffix(m, "a/b/build")["status"] == "skipped"  # vendored at any depth
    assert "minified" in by_suffix(m, "app.min.js")["reason"]
    assert "generated" in by_suffix(m, "web/app.js")["reason"]
    assert by_suffix(m, "package-lock.json")["reason"] == "lock file"


@needs_git
def test_licenses_filter_and_duplicate_repositories(tmp_path):
    a = make_repo(tmp_path / "a")
    b = make_repo(tmp_path / "b", remote="git@github.com:example/tool")  # same remote, other spelling
    out = tmp_path / "out"
    summary = run([a, b], out)
    assert "duplicate repository" in manifest(out)[str(b)]["reason"]
    assert {d["source"].split("/")[-1] for d in docs(out)} == {"LICENSE", "main.py", "keep.log"}
    assert summary["documents"] == 3
    filtered = tmp_path / "filtered"
    run([a, tmp_path / "loose.txt" if write(tmp_path / "loose.txt", PROSE) else a], filtered, licenses=["apache-2.0"])
    assert "not in --licenses" in manifest(filtered)[str(a)]["reason"]
    assert [d["source"] for d in docs(filtered)] == [str(tmp_path / "loose.txt")]  # non-repo files kept


@needs_git
def test_clone_url_into_cache(tmp_path):
    upstream = make_repo(tmp_path / "upstream", remote=None)
    git("add", "-A", cwd=upstream)
    git("commit", "-q", "-m", "init", cwd=upstream)
    url = upstream.as_uri()  # file:// URL: a real clone, no network
    out = tmp_path / "out"
    run([url], out, git_cache=str(tmp_path / "cache"))
    rows = docs(out)
    assert {d["source"] for d in rows} == {f"{url}/LICENSE", f"{url}/src/main.py", f"{url}/src/keep.log"}
    assert all(d["license"] == "mit" for d in rows)
    assert len(list((tmp_path / "cache").iterdir())) == 1


@needs_git
def test_git_url_failure_is_recorded(tmp_path):
    write(tmp_path / "ok.txt", PROSE)
    out = tmp_path / "out"
    summary = run([tmp_path / "ok.txt", (tmp_path / "no-such-repo").as_uri()], out, git_cache=str(tmp_path / "cache"))
    assert summary["documents"] == 1 and summary["failed"] == 1


# --- databases -------------------------------------------------------------------------------
def make_db(path: Path) -> str:
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE tickets (id INTEGER PRIMARY KEY, status TEXT, body TEXT, "odd name" TEXT)')
    rows = [(i, "open" if i % 2 else "closed", f"Ticket {i}: {PROSE}", "x") for i in range(1, 2501)]
    conn.executemany("INSERT INTO tickets VALUES (?, ?, ?, ?)", rows)
    conn.execute("CREATE TABLE other (v TEXT)")
    conn.commit()
    conn.close()
    return f"sqlite:///{path}"


def test_database_table_column_and_where(tmp_path):
    url = make_db(tmp_path / "t.db")
    out = tmp_path / "out"
    summary = run([url], out, table="tickets", column="body", where_column="status", where_value="open")
    rows = docs(out)
    assert summary["documents"] == 1250 and rows[0]["type"] == "database"
    assert rows[0]["source"].endswith("#table=tickets&row=1") and rows[0]["text"].startswith("Ticket 1:")
    q = run([url], tmp_path / "q", query="SELECT body FROM tickets WHERE id <= 10;")
    assert q["documents"] == 10
    quoted = run([url], tmp_path / "quoted", table="tickets", column="odd name", dedup="none")
    assert quoted["documents"] == 2500  # an identifier with a space works: it is quoted, not formatted


def test_database_injection_attempts_are_rejected_or_bound(tmp_path):
    db = tmp_path / "t.db"
    url = make_db(db)
    with pytest.raises(UserError, match="tables are: other, tickets"):
        run([url], tmp_path / "o1", table="tickets; DROP TABLE other; --", column="body")
    with pytest.raises(UserError, match="columns are: id, status, body, odd name"):
        run([url], tmp_path / "o2", table="tickets", column="body FROM tickets; DROP TABLE other; --")
    with pytest.raises(UserError, match="--where-column"):
        run([url], tmp_path / "o3", table="tickets", column="body", where_column="1=1 OR status", where_value="x")
    for query in ["DELETE FROM tickets", "SELECT 1; DROP TABLE other", "UPDATE tickets SET body='x'"]:
        with pytest.raises(UserError, match="single SELECT"):
            run([url], tmp_path / "o4", query=query)
    bound = run([url], tmp_path / "o5", table="tickets", column="body", where_column="status",
                where_value="open' OR '1'='1")  # fmt: skip
    assert bound["documents"] == 0  # the value was compared literally, matching nothing
    write_cte = "WITH x AS (SELECT 1) INSERT INTO other VALUES ('pwned')"
    summary = run([url], tmp_path / "o6", query=write_cte)  # passes the SELECT check; the read-only connection refuses it
    assert summary["failed"] == 1 and summary["documents"] == 0
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM other").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM tickets").fetchone()[0] == 2500
    conn.close()


def test_include_exclude_globs(tmp_path):
    write(tmp_path / "src" / "docs" / "a.md", PROSE + "a")
    write(tmp_path / "src" / "docs" / "b.txt", PROSE + "b")
    write(tmp_path / "src" / "tests" / "c.md", PROSE + "c")
    with zipfile.ZipFile(tmp_path / "src" / "z.zip", "w") as zf:
        zf.writestr("d.md", PROSE + "d")
        zf.writestr("e.txt", PROSE + "e")
    run([tmp_path / "src"], tmp_path / "out", include=["*.md"], exclude=["tests"])
    assert [d["source"].rsplit("/", 1)[-1] for d in docs(tmp_path / "out")] == ["z.zip!d.md", "a.md"]


def test_output_directory_inside_a_source_is_never_read(tmp_path):
    make_tree(tmp_path / "src", n=5)
    first = run([tmp_path / "src"], tmp_path / "src" / "corpus")
    write(tmp_path / "src" / "later.md", PROSE + " later")
    second = run([tmp_path / "src"], tmp_path / "src" / "corpus")
    assert second["documents_written"] == 1 and second["documents"] == first["documents"] + 1
    assert "the output directory" in manifest(tmp_path / "src" / "corpus")[str(tmp_path / "src" / "corpus")]["reason"]
    with pytest.raises(UserError, match="is a file"):
        run([tmp_path / "src"], tmp_path / "src" / "later.md")


def test_demo_corpus_is_readable_with_prepare_glob(tmp_path):
    """`prepare` reads CORPUS_DIR/part-*.jsonl*; the manifest and state never match it."""
    make_tree(tmp_path / "src", n=5)
    out = tmp_path / "out"
    run([tmp_path / "src"], out)
    assert sorted(p.name for p in out.glob("part-*.jsonl*")) == ["part-00000.jsonl"]
    assert (out / "manifest.jsonl").exists() and not list(out.glob(".part-*"))
    shutil.rmtree(out)
