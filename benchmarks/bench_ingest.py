"""Ingest throughput and memory: a synthetic text/code corpus through `scratchlm.ingest.ingest`.

Run:
    python benchmarks/bench_ingest.py --mb 200 --workers 2            # the 20 MB/s target
    python benchmarks/bench_ingest.py --mb 2048 --workers 2           # the < 1 GiB memory target
    python benchmarks/bench_ingest.py --source /usr/share/doc --workers 2   # a real folder

It writes a corpus of unique .py/.md/.txt files (mixed sizes, 1-64 KiB; a few exact duplicates
so dedup has work) into a temp dir, ingests it, and prints one JSON line: MB/s of input, files/s,
and the peak resident memory of the whole process tree (the main process plus every worker),
sampled every 50 ms from /proc. Numbers and commands are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from scratchlm.ingest import IngestOptions, ingest

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no what can out "
    "model data train token layer corpus learning network value function return system memory file "
    "process result number people time year way day thing man world life hand part child eye woman "
    "place work week case point government company group problem fact river mountain city history"
).split()


def _prose(rng: random.Random, n_words: int) -> str:
    lines, words = [], rng.choices(WORDS, k=n_words)
    for i in range(0, n_words, 14):
        lines.append(" ".join(words[i:i + 14]).capitalize() + ".")
    paras = ["\n".join(lines[i:i + 6]) for i in range(0, len(lines), 6)]
    return "\n\n".join(paras) + "\n"


def _code(rng: random.Random, n_funcs: int) -> str:
    out = ["import os\nimport sys\n\n"]
    for _ in range(n_funcs):
        name = "_".join(rng.choices(WORDS, k=3))
        a, b = rng.choices(WORDS, k=2)
        out.append(
            f"def {name}({a}, {b}=None):\n"
            f'    """Compute the {a} of {b} ({rng.randint(0, 10**9)})."""\n'
            f"    if {b} is None:\n        {b} = {rng.randint(0, 999)}\n"
            f"    for i in range(len({a})):\n        {a}[i] = {a}[i] * {b} + {rng.random():.6f}\n"
            f"    return {a}\n\n\n"
        )
    return "".join(out)


def make_corpus(root: Path, total_mb: float, seed: int = 0) -> tuple[int, int]:
    """Write ~total_mb of unique files under root (100 files per directory); (files, bytes)."""
    rng = random.Random(seed)
    written = files = 0
    target = int(total_mb * 1024 * 1024)
    while written < target:
        kind = rng.choice(["py", "md", "txt"])
        size_words = int(rng.lognormvariate(7.5, 0.8))  # median ~1,800 words ~ 11 KiB
        text = _code(rng, max(1, size_words // 40)) if kind == "py" else _prose(rng, max(20, size_words))
        if kind == "md":
            text = f"# Section {files}\n\n" + text
        d = root / f"d{files // 100:05d}"
        d.mkdir(parents=True, exist_ok=True)
        data = text.encode()
        (d / f"f{files:07d}.{kind}").write_bytes(data)
        if files % 200 == 7:  # an exact duplicate now and then
            (d / f"dup{files:07d}.{kind}").write_bytes(data)
            written += len(data)
        written += len(data)
        files += 1
    return files, written


class TreeMemory:
    """Peak summed RSS and total CPU time of this process and its descendants, from /proc.

    CPU time matters on a shared machine: wall-clock MB/s there reflects other people's load,
    MB per CPU-second does not.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.cpu: dict[int, float] = {}  # pid -> latest utime + stime, seconds
        self._cpu0 = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self) -> int:
        parents: dict[int, int] = {}
        rss: dict[int, int] = {}
        cpu: dict[int, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
                rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
                cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                continue
        tree, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            p = frontier.pop()
            kids = [c for c, pp in parents.items() if pp == p and c not in tree]
            tree.update(kids)
            frontier += kids
        for p in tree:
            if p in cpu:
                self.cpu[p] = cpu[p]
        return sum(rss.get(p, 0) for p in tree)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            time.sleep(self.interval)

    def cpu_seconds(self) -> float:
        """CPU time used by the tree since __enter__ (workers' last sample before they exit)."""
        return sum(self.cpu.values()) - self._cpu0

    def __enter__(self) -> TreeMemory:
        self._tree_rss()
        self._cpu0 = sum(self.cpu.values())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=200, help="synthetic corpus size in MiB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--source", help="ingest this folder instead of a synthetic corpus")
    ap.add_argument("--dedup", default="exact", choices=["exact", "near", "none"])
    ap.add_argument("--tmp", default=None, help="where to put the corpus and output (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpus and output")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.tmp))
    try:
        if args.source:
            sources = [args.source]
            gen = {}
        else:
            t = time.perf_counter()
            files, nbytes = make_corpus(work / "corpus", args.mb)
            gen = {"generated_files": files, "generated_mb": round(nbytes / 2**20, 1),
                   "generate_seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
            sources = [str(work / "corpus")]
        opts = IngestOptions(workers=args.workers, dedup=args.dedup, progress=False)
        with TreeMemory() as mem:
            t = time.perf_counter()
            summary = ingest(sources, work / "out", opts, json_summary=True)
            seconds = time.perf_counter() - t
        inputs = summary["ok"] + summary["skipped"] + summary["failed"]
        result = {
            **gen, "workers": args.workers, "dedup": args.dedup, "seconds": round(seconds, 2),
            "mb_in": round(summary["bytes_in"] / 2**20, 1),
            "mb_per_s": round(summary["bytes_in"] / 2**20 / seconds, 1),
            "files_per_s": round(inputs / seconds, 1), "documents": summary["documents"],
            "types": summary["types"], "ok": summary["ok"], "skipped": summary["skipped"],
            "failed": summary["failed"], "duplicates_removed": summary["duplicates_removed"],
            "reasons": summary["reasons"], "peak_tree_rss_mib": round(mem.peak / 2**20, 1),
            "cpu_seconds": round(mem.cpu_seconds(), 1),
            "mb_per_cpu_second": round(summary["bytes_in"] / 2**20 / max(mem.cpu_seconds(), 1e-9), 1),
            "load_average_1m": os.getloadavg()[0],
        }  # fmt: skip
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
