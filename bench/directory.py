"""Benchmark: directory copies against ``rsync -a --delete --link-dest``, both as whole processes.

One generated tree, both tools on the same file system and the same warm page cache, each run as a user runs it:

- ``./backup directory run --no-sync SOURCE DEST`` (the CLI: interpreter start-up, imports, copy, manifest);
- ``rsync -a --delete [--link-dest=PREVIOUS] SOURCE/ DEST/<n>/``;
- and, for reference, the engine called in-process (``copy_tree``), as earlier figures were taken, and the bare
  system calls of an incremental copy (``bare_link_copy``: per directory mkdir and a listing, per file the
  source's lstat, the previous copy's stat and a link; no manifest, no bookkeeping, one thread), the floor
  for anything written in Python that walks in one thread.

Each round makes a first (full) copy of 20,000 files of mixed sizes (~1 GB) with each tool, then ``--repeats``
incremental copies: before each, a fresh 1% of the files changes, and every tool links against its own newest
copy (the hourly situation). The tool that goes first alternates. ``--no-sync`` because rsync does not flush
either; the default adds one syncfs() at the end of a copy. The project's bytecode is compiled first (as pip
does when installing): this machine sets PYTHONDONTWRITEBYTECODE, which would make every CLI start compile it.

Run: ``flock "$BENCH_LOCK" .venv/bin/python bench/directory.py [--files 20000] [--total-mb 1024]
[--rounds 2] [--repeats 3]`` (needs rsync: scripts/ensure-rsync.sh).
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kinds.directory.copies import WALKERS, copy_tree  # noqa: E402


def file_sizes(count: int, total_bytes: int, rng: random.Random) -> list[int]:
    """Mixed sizes: mostly small files, a tail of large ones (log-normal), scaled to ``total_bytes``."""
    raw = [rng.lognormvariate(9.0, 2.0) for _ in range(count)]
    scale = total_bytes / sum(raw)
    return [max(0, int(r * scale)) for r in raw]


def make_tree(root: Path, count: int, total_bytes: int, seed: int = 7) -> list[Path]:
    rng = random.Random(seed)
    pool = rng.randbytes(16 << 20)
    paths = []
    per_dir = 40
    for i, size in enumerate(file_sizes(count, total_bytes, rng)):
        folder = root / f"d{i // (per_dir * 25):02d}" / f"s{(i // per_dir) % 25:02d}"
        if i % per_dir == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"f{i:05d}.dat"
        with open(path, "wb") as fh:
            fh.write(i.to_bytes(8, "little"))  # every file distinct
            left = size
            while left > 0:
                start = rng.randrange(0, len(pool) - min(left, 1 << 20))
                piece = pool[start : start + min(left, 1 << 20)]
                fh.write(piece)
                left -= len(piece)
        paths.append(path)
    for n, path in enumerate(paths[:200]):
        if n % 20 == 0:
            os.symlink(path.name, path.with_suffix(".link"))
    return paths


def change_files(paths: list[Path], fraction: float, seed: int = 11) -> int:
    rng = random.Random(seed)
    chosen = rng.sample(paths, max(1, int(len(paths) * fraction)))
    later = time.time() + 60
    for path in chosen:
        data = bytearray(path.read_bytes())
        if data:
            data[rng.randrange(len(data))] ^= 0xFF
        else:
            data = bytearray(b"changed")
        path.write_bytes(bytes(data))
        os.utime(path, (later, later))
    return len(chosen)


def settle() -> None:
    """Write back dirty pages between timed runs so one tool does not pay for the other's writes."""
    os.sync()
    time.sleep(0.5)


def timed(func) -> float:
    settle()
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


def run_rsync(source: Path, dest: Path, link_dest: Path | None) -> None:
    cmd = ["rsync", "-a", "--delete"]
    if link_dest is not None:
        cmd.append(f"--link-dest={link_dest}")
    cmd += [f"{source}/", f"{dest}/"]
    subprocess.run(cmd, check=True)


class Cli:
    """``./backup directory run`` as a process. Each copy is named after the second it starts in, so a run
    starts in a second of its own (waiting here, untimed) rather than wait inside the timed process."""

    def __init__(self, threads: int):
        self.threads = threads
        self.last_second = 0

    def run(self, source: Path, dest: Path) -> None:
        subprocess.run(
            [
                str(ROOT / "backup"),
                "directory",
                "run",
                "--no-sync",
                "--threads",
                str(self.threads),
                str(source),
                str(dest),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.last_second = int(time.time())

    def wait_for_a_new_second(self) -> None:
        while int(time.time()) <= self.last_second:
            time.sleep(0.05)


def bare_link_copy(source: Path, previous: Path | None, dest: Path) -> None:
    """The system calls an incremental copy cannot avoid, in one thread without any bookkeeping: mkdir and list
    each directory, lstat each source file, stat its previous copy and link it (files the previous copy lacks
    are left out: they are 1% here). A first copy (no previous) only makes the directories."""
    stack = [""]
    while stack:
        rel = stack.pop()
        here = f"{dest}/{rel}" if rel else str(dest)
        os.mkdir(here)
        src_fd = os.open(f"{source}/{rel}", os.O_RDONLY | os.O_DIRECTORY)
        prev_fd = os.open(f"{previous}/{rel}", os.O_RDONLY | os.O_DIRECTORY) if previous else -1
        dst_fd = os.open(here, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(src_fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(f"{rel}/{entry.name}" if rel else entry.name)
                        continue
                    entry.stat(follow_symlinks=False)
                    if prev_fd < 0:
                        continue
                    try:
                        os.stat(entry.name, dir_fd=prev_fd, follow_symlinks=False)
                        os.link(entry.name, entry.name, src_dir_fd=prev_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
                    except OSError:
                        pass
        finally:
            os.close(src_fd)
            os.close(dst_fd)
            if prev_fd >= 0:
                os.close(prev_fd)


class Round:
    """One round's three contestants, each copying into its own destination root."""

    def __init__(self, source: Path, dests: dict[str, Path], cli: Cli, threads: int):
        self.source, self.dests, self.cli, self.threads = source, dests, cli, threads
        self.when = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)

    def in_process(self) -> None:
        self.when += timedelta(hours=1)
        copy_tree(self.source, self.dests["in-process"], self.when, threads=self.threads, sync=False)

    def cli_step(self) -> float:
        self.cli.wait_for_a_new_second()
        return timed(lambda: self.cli.run(self.source, self.dests["cli"]))

    def steps(self, n: int) -> list[tuple[str, Callable[[], float]]]:
        """Copy number ``n`` (0: the first) for each tool; rsync links against its copy ``n - 1``."""
        previous = self.dests["rsync"] / f"{n - 1}" if n > 0 else None
        return [
            ("cli", self.cli_step),
            ("rsync", lambda: timed(lambda: run_rsync(self.source, self.dests["rsync"] / f"{n}", previous))),
            ("in-process", lambda: timed(self.in_process)),
            ("syscalls", lambda: timed(lambda: self.bare(n))),
        ]

    def bare(self, n: int) -> None:
        """The floor, linked against the in-process engine's newest copy before this step's change."""
        copies = sorted(p for p in self.dests["in-process"].iterdir() if not p.name.startswith("."))
        bare_link_copy(self.source, copies[-1] if n > 0 and copies else None, self.dests["syscalls"] / f"{n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--total-mb", type=int, default=1024)
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of files changed before each increment")
    parser.add_argument("--rounds", type=int, default=2, help="repeat each measurement and take the median")
    parser.add_argument("--repeats", type=int, default=3, help="incremental copies per round, tools alternating")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        sys.exit("rsync is not installed: run scripts/ensure-rsync.sh")
    for folder in ("services", "commands"):
        compileall.compile_dir(ROOT / folder, quiet=1)
    compileall.compile_file(ROOT / "cli.py", quiet=1)

    work = Path(tempfile.mkdtemp(prefix="bench-dircopy-", dir=args.dir)).resolve()
    cli = Cli(args.threads)
    tools = ("cli", "rsync", "in-process", "syscalls")
    try:
        source = work / "source"
        source.mkdir()
        t0 = time.perf_counter()
        paths = make_tree(source, args.files, args.total_mb << 20)
        size = sum(p.stat().st_size for p in paths)
        print(f"tree: {len(paths)} files, {size / 2**20:.0f} MiB, made in {time.perf_counter() - t0:.1f} s")
        rsync_version = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        print(f"rsync: {rsync_version}; engine threads: {args.threads}; cpus: {os.cpu_count()}")
        help_times = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run([str(ROOT / "backup"), "--help"], check=True, stdout=subprocess.DEVNULL)
            help_times.append(time.perf_counter() - t0)
        print(f"./backup --help: median {statistics.median(help_times) * 1000:.0f} ms over 5 runs")

        full: dict[str, list[float]] = {t: [] for t in tools}
        incr: dict[str, list[float]] = {t: [] for t in tools}
        changed = 0
        seed = 11
        for rnd in range(args.rounds):
            dests = {t: work / f"{t}-{rnd}" for t in tools}
            for folder in dests.values():
                folder.mkdir()
            if rnd > 0:
                shutil.rmtree(source)  # every round starts from the same first state
                source.mkdir()
                paths = make_tree(source, args.files, args.total_mb << 20)
            contest = Round(source, dests, cli, args.threads)
            steps = contest.steps
            order = steps(0)
            for tool, step in order if rnd % 2 == 0 else reversed(order):
                full[tool].append(step())
            for repeat in range(1, args.repeats + 1):
                seed += 1
                changed = change_files(paths, args.changed, seed=seed)
                order = steps(repeat)
                for tool, step in order if (rnd + repeat) % 2 == 0 else reversed(order):
                    incr[tool].append(step())
            for folder in dests.values():
                shutil.rmtree(folder)

        print(
            f"\n{'run':<34}{'cli s':>8}{'rsync s':>9}{'ratio':>7}{'target':>8}{'in-proc s':>11}{'ratio':>7}"
            f"{'syscalls s':>12}"
        )
        for label, figures in (
            (f"first copy ({len(paths)} files)", full),
            (f"incremental ({changed} changed)", incr),
        ):
            ours = statistics.median(figures["cli"])
            theirs = statistics.median(figures["rsync"])
            inproc = statistics.median(figures["in-process"])
            floor = statistics.median(figures["syscalls"])
            verdict = "ok" if ours / theirs <= 1.0 else "MISS"
            print(
                f"{label:<34}{ours:>8.2f}{theirs:>9.2f}{ours / theirs:>7.2f}{'<=1.0':>8}{inproc:>11.2f}"
                f"{inproc / theirs:>7.2f}{floor:>12.2f}  {verdict}"
            )
            per = [round(c / r, 2) for c, r in zip(figures["cli"], figures["rsync"], strict=True)]
            print(
                f"  cli {[round(x, 2) for x in figures['cli']]}\n  rsync {[round(x, 2) for x in figures['rsync']]}"
                f"\n  in-process {[round(x, 2) for x in figures['in-process']]}"
                f"\n  syscalls only {[round(x, 2) for x in figures['syscalls']]}\n  cli/rsync per pair {per}"
            )
        print(
            f"(medians: first copy over {args.rounds} rounds, incremental over {args.rounds} x {args.repeats} copies;"
            f" --no-sync / sync=False, {args.threads} copy threads, {WALKERS} walking threads)"
        )
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
