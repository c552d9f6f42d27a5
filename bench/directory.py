"""Benchmark: directory copies against ``rsync -a --delete --link-dest``, both as whole processes.

One generated tree, both tools on the same file system and the same warm page cache, each run as a user runs it:

- ``./backup directory run --no-sync SOURCE DEST`` (the CLI: interpreter start-up, imports, copy, manifest);
- ``rsync -a --delete [--link-dest=PREVIOUS] SOURCE/ DEST/<n>/``;
- and, for reference, the engine called in-process (``copy_tree``), as earlier figures were taken, and the bare
  system calls of each copy (``bare_copy``), in one thread and split over two forked processes (this machine's
  two cores, as rsync's sender and receiver use them): per directory a mkdir and a listing; per file, for a first
  copy, the source's lstat, an open of each side and copy_file_range (the kernel copies the data; no checksum,
  no attributes); for an incremental copy, the source's lstat, the previous copy's stat and a link. No manifest,
  no bookkeeping and no interpreter start-up: the floor for any copy made by a Python process here.

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
import resource
import shutil
import stat
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

from kinds.directory.copies import CLI_PROCESSES, WALKERS, copy_tree  # noqa: E402


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


CPU: list[float] = []  # processor time (user + system, all processes) of each timed run, in order


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(func) -> float:
    """Wall time of ``func``; its processor time is appended to CPU."""
    settle()
    c0 = _cpu()
    t0 = time.perf_counter()
    func()
    wall = time.perf_counter() - t0
    CPU.append(_cpu() - c0)
    return wall


def run_rsync(source: Path, dest: Path, link_dest: Path | None) -> None:
    cmd = ["rsync", "-a", "--delete"]
    if link_dest is not None:
        cmd.append(f"--link-dest={link_dest}")
    cmd += [f"{source}/", f"{dest}/"]
    subprocess.run(cmd, check=True)


class Cli:
    """``./backup directory run`` as a process. Each copy is named after the second it starts in, so a run
    starts in a second of its own (waiting here, untimed) rather than wait inside the timed process."""

    def __init__(self, threads: int, processes: int):
        self.threads = threads
        self.processes = processes
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
                "--processes",
                str(self.processes),
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


def _bare_directory(source: str, previous: str | None, dest: str, rel: str) -> list[str]:
    """The bare system calls for one directory (see ``bare_copy``); returns its subdirectories."""
    here = f"{dest}/{rel}" if rel else dest
    if rel:
        os.mkdir(here)
    subdirs = []
    src_fd = os.open(f"{source}/{rel}", os.O_RDONLY | os.O_DIRECTORY)
    prev_fd = os.open(f"{previous}/{rel}", os.O_RDONLY | os.O_DIRECTORY) if previous else -1
    dst_fd = os.open(here, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(src_fd) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(f"{rel}/{entry.name}" if rel else entry.name)
                    continue
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if prev_fd < 0:
                    fd_in = os.open(entry.name, os.O_RDONLY, dir_fd=src_fd)
                    fd_out = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dst_fd)
                    while os.copy_file_range(fd_in, fd_out, 1 << 30):
                        pass
                    os.close(fd_out)
                    os.close(fd_in)
                    continue
                try:
                    os.stat(entry.name, dir_fd=prev_fd, follow_symlinks=False)
                    os.link(entry.name, entry.name, src_dir_fd=prev_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
                except OSError:
                    pass  # a file the previous copy lacks (1% here): left out
    finally:
        os.close(src_fd)
        os.close(dst_fd)
        if prev_fd >= 0:
            os.close(prev_fd)
    return subdirs


def bare_copy(source: Path, previous: Path | None, dest: Path, processes: int = 1) -> None:
    """The system calls a copy cannot avoid, without any bookkeeping: mkdir and list each directory; for a first
    copy (no previous) lstat each source file, open it and its copy and let the kernel copy the data
    (copy_file_range); for an incremental copy lstat each source file, stat its previous copy and link it
    (files the previous copy lacks are left out: they are 1% here). With ``processes`` 2, the top directory's
    subdirectories are dealt out to this process and one forked child, alternately."""
    src, prev, dst = str(source), str(previous) if previous else None, str(dest)
    tops = _bare_directory(src, prev, dst, "")
    children = []
    for n in range(1, processes):
        pid = os.fork()
        if pid == 0:
            try:
                _bare_walk(src, prev, dst, tops[n::processes])
            finally:
                os._exit(0)
        children.append(pid)
    _bare_walk(src, prev, dst, tops[0::processes])
    for pid in children:
        os.waitpid(pid, 0)


def _bare_walk(source: str, previous: str | None, dest: str, stack: list[str]) -> None:
    stack = list(stack)
    while stack:
        stack.extend(_bare_directory(source, previous, dest, stack.pop()))


class Round:
    """One round's three contestants, each copying into its own destination root."""

    def __init__(self, source: Path, dests: dict[str, Path], cli: Cli, threads: int, processes: int):
        self.source, self.dests, self.cli, self.threads, self.processes = source, dests, cli, threads, processes
        self.when = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)

    def in_process(self) -> None:
        self.when += timedelta(hours=1)
        copy_tree(
            self.source, self.dests["in-process"], self.when, threads=self.threads, processes=self.processes, sync=False
        )

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
            ("syscalls", lambda: timed(lambda: self.bare(n, "syscalls", 1))),
            ("syscalls-2", lambda: timed(lambda: self.bare(n, "syscalls-2", 2))),
        ]

    def bare(self, n: int, tool: str, processes: int) -> None:
        """The floor, linked against the in-process engine's newest copy before this step's change."""
        copies = sorted(p for p in self.dests["in-process"].iterdir() if not p.name.startswith("."))
        previous = copies[-1] if n > 0 and copies else None
        dest = self.dests[tool] / f"{n}"
        dest.mkdir()
        bare_copy(self.source, previous, dest, processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--total-mb", type=int, default=1024)
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of files changed before each increment")
    parser.add_argument("--rounds", type=int, default=2, help="repeat each measurement and take the median")
    parser.add_argument("--repeats", type=int, default=3, help="incremental copies per round, tools alternating")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--processes", type=int, default=CLI_PROCESSES, help="the CLI's and in-process engine's")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        sys.exit("rsync is not installed: run scripts/ensure-rsync.sh")
    for folder in ("services", "commands", "kinds"):
        compileall.compile_dir(ROOT / folder, quiet=1)
    compileall.compile_file(ROOT / "cli.py", quiet=1)

    start_load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="bench-dircopy-", dir=args.dir)).resolve()
    cli = Cli(args.threads, args.processes)
    tools = ("cli", "rsync", "in-process", "syscalls", "syscalls-2")
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
        full_cpu: dict[str, list[float]] = {t: [] for t in tools}
        incr_cpu: dict[str, list[float]] = {t: [] for t in tools}
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
            contest = Round(source, dests, cli, args.threads, args.processes)
            steps = contest.steps
            order = steps(0)
            for tool, step in order if rnd % 2 == 0 else reversed(order):
                full[tool].append(step())
                full_cpu[tool].append(CPU[-1])
            for repeat in range(1, args.repeats + 1):
                seed += 1
                changed = change_files(paths, args.changed, seed=seed)
                order = steps(repeat)
                for tool, step in order if (rnd + repeat) % 2 == 0 else reversed(order):
                    incr[tool].append(step())
                    incr_cpu[tool].append(CPU[-1])
            for folder in dests.values():
                shutil.rmtree(folder)

        print(
            f"\n{'run':<32}{'cli s':>7}{'rsync s':>8}{'ratio':>7}{'pairs':>7}{'in-proc s':>10}"
            f"{'floor 1':>8}{'floor 2':>8}{'cli/floor 2':>12}"
        )
        for label, figures, cpu in (
            (f"first copy ({len(paths)} files)", full, full_cpu),
            (f"incremental ({changed} changed)", incr, incr_cpu),
        ):
            med = {tool: statistics.median(values) for tool, values in figures.items()}
            per = [round(c / r, 2) for c, r in zip(figures["cli"], figures["rsync"], strict=True)]
            verdict = "ok" if med["cli"] / med["rsync"] <= 1.0 else "MISS"
            print(
                f"{label:<32}{med['cli']:>7.2f}{med['rsync']:>8.2f}{med['cli'] / med['rsync']:>7.2f}"
                f"{statistics.median(per):>7.2f}{med['in-process']:>10.2f}{med['syscalls']:>8.2f}"
                f"{med['syscalls-2']:>8.2f}{med['cli'] / med['syscalls-2']:>12.2f}  {verdict}"
            )
            for tool in tools:
                print(
                    f"  {tool:<11} s {[round(x, 2) for x in figures[tool]]}"
                    f"  cpu s median {statistics.median(cpu[tool]):.2f}"
                )
            print(f"  cli/rsync per pair {per}")
        print(
            f"(medians: first copy over {args.rounds} rounds, incremental over {args.rounds} x {args.repeats} copies;"
            f" pairs: median of the per-pair cli/rsync ratios; floor 1 and 2: the bare system calls in one and two"
            f" processes; --no-sync / sync=False, {args.threads} copy threads, {args.processes} processes,"
            f" {WALKERS} walking threads; load average before: {start_load})"
        )
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
