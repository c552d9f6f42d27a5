"""Benchmark: the directory copy engine (services/dircopy.py) against ``rsync -a --delete --link-dest``.

One process, one generated tree, both tools on the same file system and the same warm page cache:

1. a first (full) copy of 20,000 files of mixed sizes (~1 GB);
2. an incremental copy after 1% of the files changed, linked against the first copy.

Run: ``.venv/bin/python bench/directory.py [--files 20000] [--total-mb 1024] [--rounds 2] [--repeats 3]``
(needs rsync: scripts/ensure-rsync.sh). The engine runs with ``sync=False`` because rsync does not flush
either; the default ``sync=True`` adds one syncfs() at the end of a copy.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.dircopy import WALKERS, copy_tree  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--total-mb", type=int, default=1024)
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of files changed before run 2")
    parser.add_argument("--rounds", type=int, default=2, help="repeat each measurement and take the median")
    parser.add_argument(
        "--repeats", type=int, default=3, help="incremental copies per round, tools alternating, each against the first"
    )
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        sys.exit("rsync is not installed: run scripts/ensure-rsync.sh")

    work = Path(tempfile.mkdtemp(prefix="bench-dircopy-", dir=args.dir)).resolve()
    try:
        source = work / "source"
        source.mkdir()
        t0 = time.perf_counter()
        paths = make_tree(source, args.files, args.total_mb << 20)
        size = sum(p.stat().st_size for p in paths)
        print(f"tree: {len(paths)} files, {size / 2**20:.0f} MiB, made in {time.perf_counter() - t0:.1f} s")
        rsync_version = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        print(f"rsync: {rsync_version}; engine threads: {args.threads}; cpus: {os.cpu_count()}")

        full = {"engine": [], "rsync": []}
        incr = {"engine": [], "rsync": []}
        base = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)
        changed = 0
        for rnd in range(args.rounds):
            ours = work / f"engine-{rnd}"
            theirs = work / f"rsync-{rnd}"
            ours.mkdir()
            theirs.mkdir()
            if rnd > 0:
                # Undo the previous round's change so every round starts from the same first state.
                shutil.rmtree(source)
                source.mkdir()
                paths = make_tree(source, args.files, args.total_mb << 20)
            # Alternate which tool goes first, so neither always pays for a cold start after the other's writes.
            engine_first = rnd % 2 == 1
            steps = [
                ("rsync", lambda t=theirs: run_rsync(source, t / "first", None)),
                ("engine", lambda o=ours: copy_tree(source, o, base, threads=args.threads, sync=False)),
            ]
            for tool, step in reversed(steps) if engine_first else steps:
                full[tool].append(timed(step))
            changed = change_files(paths, args.changed)
            # Several incremental copies per round, tools alternating, each linked against an identical tree
            # (rsync: the first copy; the engine: its newest copy). Nothing is deleted in between: on this ext4,
            # directories created within a minute of a delete cost ~20x more (recently freed inodes are skipped).
            for repeat in range(args.repeats):
                later = base + timedelta(hours=1 + repeat)
                steps = [
                    ("rsync", lambda t=theirs, n=repeat: run_rsync(source, t / f"second-{n}", t / "first")),
                    ("engine", lambda o=ours, w=later: copy_tree(source, o, w, threads=args.threads, sync=False)),
                ]
                for tool, step in reversed(steps) if (engine_first + repeat) % 2 else steps:
                    incr[tool].append(timed(step))
            shutil.rmtree(ours)
            shutil.rmtree(theirs)

        print(f"\n{'run':<30}{'engine s':>10}{'rsync s':>10}{'ratio':>8}{'target':>8}")
        for label, figures, target in (
            (f"first copy ({len(paths)} files)", full, 1.3),
            (f"incremental ({changed} changed)", incr, 1.0),
        ):
            ours_s = statistics.median(figures["engine"])
            theirs_s = statistics.median(figures["rsync"])
            ratio = ours_s / theirs_s
            verdict = "ok" if ratio <= target else "MISS"
            print(f"{label:<30}{ours_s:>10.2f}{theirs_s:>10.2f}{ratio:>8.2f}{'<=' + str(target):>8} {verdict}")
            per_round = [e / r for e, r in zip(figures["engine"], figures["rsync"], strict=True)]
            print(
                f"  per round: engine {[round(x, 2) for x in figures['engine']]}"
                f" rsync {[round(x, 2) for x in figures['rsync']]} ratios {[round(x, 2) for x in per_round]}"
            )
        print(
            f"(medians: first copy over {args.rounds} rounds, incremental over {args.rounds} x {args.repeats} copies;"
            f" engine with sync=False, {args.threads} copy threads, {WALKERS} walking threads)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
