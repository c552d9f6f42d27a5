"""Benchmark: our CouchDB backup/restore against IBM's couchbackup/couchrestore, in one run, on one local server.

    .venv/bin/python bench/couchdb.py              # 100,000 documents, plus 20,000 to show memory is flat
    .venv/bin/python bench/couchdb.py --docs 10000 --also 0
    .venv/bin/python bench/couchdb.py --link --docs 20000 --delay-ms 25 --rounds 3

``--link`` runs each pair of the tools directly and through a loopback TCP delay line (bench/delayline.py,
``--delay-ms`` each way, so a round trip costs twice that) in front of the server, ``--rounds`` times with the
order of the two tools alternating, and prints medians: ours against couchbackup on the same link, and each of
ours through the delay line against its own direct rate.

The database: ~1 KB documents, 5% with a 20 KB attachment, in a pouchdb-server started here (in memory,
127.0.0.1). Each tool runs as its own process; peak RSS is its kernel high-water mark (VmHWM). couchbackup runs
in shallow mode with its defaults (no attachments: they are "experimental" there); ours runs with attachments
on, in winning mode (the closest to shallow) and in full mode (every leaf revision with its history).
Restores of both tools go through tests/couch_proxy.py, which adds the ``doc_del_count: 0`` that couchrestore
insists on and pouchdb-server does not report.
Needs scripts/ensure-pouchdb.sh (pouchdb-server and @cloudant/couchbackup in .local/node_modules).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.delayline import DelayLine  # noqa: E402
from tests.couch_data import peak_rss_mb  # noqa: E402
from tests.couch_proxy import FaultProxy  # noqa: E402
from tests.fixtures.pouchdb import free_port  # noqa: E402

BIN = ROOT / ".local" / "node_modules" / ".bin"
TOOL_TIMEOUT_SECONDS = 600


def make_batch(start: int, count: int) -> list[dict]:
    docs = []
    for i in range(start, start + count):
        doc_id = f"doc-{i:07d}"
        rev = hashlib.md5(doc_id.encode()).hexdigest()
        text = (hashlib.sha256(doc_id.encode()).hexdigest() * 28)[:900]
        doc = {"_id": doc_id, "_rev": f"1-{rev}", "n": i, "kind": "bench", "text": text}
        if i % 20 == 0:
            blob = hashlib.sha512(doc_id.encode()).digest() * 320  # 20 KB
            doc["_attachments"] = {
                "a.bin": {"content_type": "application/octet-stream", "data": base64.b64encode(blob).decode()}
            }
        docs.append(doc)
    return docs


def seed(url: str, db: str, n: int) -> None:
    requests.put(f"{url}/{db}", timeout=30).raise_for_status()
    for start in range(0, n, 1000):
        body = {"docs": make_batch(start, min(1000, n - start)), "new_edits": False}
        requests.post(f"{url}/{db}/_bulk_docs", json=body, timeout=600).raise_for_status()


Row = tuple[str, str, float, float, str]  # tool, operation, seconds, peak RSS MB, failure ("" when it worked)


def server_floor(url: str, db: str) -> list[Row]:
    """How fast the server alone hands out every document once: one streamed request each for the two reads a
    backup can be built on, the body read and dropped (no parsing, no writing). No client can back up faster
    than the server serves, so these bound any tool's docs/s on this server."""
    rows: list[Row] = []
    for label, path in (
        ("server alone: _all_docs?include_docs", "_all_docs?include_docs=true"),
        ("server alone: _changes?include_docs", "_changes?include_docs=true"),
    ):
        started = time.monotonic()
        with requests.get(f"{url}/{db}/{path}", stream=True, timeout=600) as response:
            response.raise_for_status()
            for _ in response.iter_content(1 << 20):
                pass
        secs = time.monotonic() - started
        print(f"  {label:<40} read     {secs:7.1f} s", flush=True)
        rows.append((label, "read", secs, 0.0, ""))
    return rows


def timed(
    tool: str,
    op: str,
    argv: list[str],
    env: dict[str, str],
    work: Path,
    stdin: Path | None = None,
    stdout: Path | None = None,
) -> Row:
    """One tool run: seconds and peak RSS; a failure is reported with the tool's last error line, not hidden."""
    start = time.monotonic()
    if stdin is not None or stdout is not None:
        # couchbackup writes to stdout and couchrestore reads stdin: a shell redirect that execs the tool.
        argv = [
            "/bin/sh",
            "-c",
            "exec " + " ".join(argv) + (f" < {stdin}" if stdin else "") + (f" > {stdout}" if stdout else ""),
        ]
    errors = work / "stderr.txt"
    # A tool that hangs (couchbackup's full mode, without the proxy's help, waits forever) fails its row.
    rss, status = peak_rss_mb(argv, env, str(ROOT), stderr_path=str(errors), timeout=TOOL_TIMEOUT_SECONDS)
    secs = time.monotonic() - start
    failure = ""
    if status != 0:
        lines = [line for line in errors.read_text(errors="replace").splitlines() if line.strip()]
        failure = f"exit {status}: {lines[-1][:150] if lines else ''}"
    print(f"  {tool:<40} {op:<8} {secs:7.1f} s {rss:7.1f} MB {failure}", flush=True)
    return tool, op, secs, rss, failure


def run_size(url: str, restore_url: str, n: int, work: Path) -> list[Row]:
    env = {**os.environ, "COUCHDB_URL": url, "COUCH_URL": url}
    # Both tools' restores go through the same compatibility proxy (see main()), so they pay the same hop.
    restore_env = {**os.environ, "COUCHDB_URL": restore_url, "COUCH_URL": restore_url}
    src = f"bench-{n}"
    t = time.monotonic()
    seed(url, src, n)
    print(f"  seeded {n} docs in {time.monotonic() - t:.1f} s", flush=True)
    ours = [sys.executable, "-m", "commands.couchdb"]
    rows: list[Row] = server_floor(url, src)
    created = [src]

    for mode in ("winning", "full"):
        tool = f"ours {mode} (attachments)"
        dest = work / f"ours-{mode}-{n}"
        rows.append(
            timed(tool, "backup", [*ours, "backup", src, "--to", str(dest), "--mode", mode, "--quiet"], env, work)
        )
        manifest = next(dest.rglob("*.manifest.json"))
        target = f"ours-{mode}-restored-{n}"
        created.append(target)
        restore = [*ours, "restore", str(manifest), "--db", target, "--quiet", "--no-verify"]
        rows.append(timed(tool, "restore", restore, restore_env, work))
        if mode == "full":
            rows.append(timed(tool, "verify", [*ours, "verify", str(manifest), "--db", target, "--quiet"], env, work))

    # Like for like with couchbackup's default shallow backup, which leaves attachment data out.
    dest = work / f"ours-stubs-{n}"
    stubs = [*ours, "backup", src, "--to", str(dest), "--mode", "winning", "--no-attachments", "--quiet"]
    rows.append(timed("ours winning --no-attachments", "backup", stubs, env, work))

    cb = [str(BIN / "couchbackup"), "--db", src, "--mode", "shallow", "--quiet"]
    cr = [str(BIN / "couchrestore"), "--quiet"]
    for label, extra in (
        ("couchbackup shallow (defaults)", []),
        ("couchbackup shallow --attachments", ["--attachments"]),
    ):
        out = work / f"couchbackup-{n}-{len(extra)}.txt"
        rows.append(timed(label, "backup", [*cb, *extra], env, work, stdout=out))
        target = f"cb-restored-{n}-{len(extra)}"
        created.append(target)
        requests.put(f"{url}/{target}", timeout=30).raise_for_status()  # couchrestore needs it to exist (#151)
        rows.append(timed(label, "restore", [*cr, "--db", target, *extra], restore_env, work, stdin=out))
    for db in created:
        requests.delete(f"{url}/{db}", timeout=300)  # give the in-memory server its memory back
    return rows


LinkRow = tuple[str, str, str, float, float, str]  # link, tool, op, seconds, peak RSS MB, failure


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def link_round(
    link: str, url: str, restore_url: str, src: str, n: int, work: Path, ours_first: bool, admin: str
) -> list[LinkRow]:
    """One round of the pairs on one link: (ours, couchbackup) for a full backup, a winning/shallow backup, and a
    restore (ours with its verify; couchrestore of couchbackup's backup with attachments), in the order asked."""
    env = {**os.environ, "COUCHDB_URL": url, "COUCH_URL": url}
    restore_env = {**os.environ, "COUCHDB_URL": restore_url, "COUCH_URL": restore_url}
    ours = [sys.executable, "-m", "commands.couchdb"]
    cb = [str(BIN / "couchbackup"), "--db", src, "--quiet"]
    rows: list[LinkRow] = []
    folder = work / f"{link.split()[0]}-{len(os.listdir(work))}"
    folder.mkdir()

    def run(tool: str, op: str, argv: list[str], run_env: dict[str, str], **io: Path) -> None:
        _tool, _op, secs, rss, failure = timed(f"{link}: {tool}", op, argv, run_env, folder, **io)
        rows.append((link, tool, op, secs, rss, failure))

    def ours_full() -> None:
        run("ours full", "backup", [*ours, "backup", src, "--to", str(folder / "full"), "--quiet"], env)

    def theirs_full() -> None:
        run("couchbackup (default: full)", "backup", cb, env, stdout=folder / "cb-full.txt")

    def ours_winning() -> None:
        argv = [*ours, "backup", src, "--to", str(folder / "winning"), "--mode", "winning", "--quiet"]
        run("ours winning", "backup", argv, env)

    def theirs_shallow() -> None:
        argv = [*cb, "--mode", "shallow", "--attachments"]
        run("couchbackup --mode shallow --attachments", "backup", argv, env, stdout=folder / "cb-shallow.txt")

    def ours_restore() -> None:
        manifest = next((folder / "full").rglob("*.manifest.json"))
        target = f"ours-restored-{folder.name}"
        run(
            "ours restore (with verify)",
            "restore",
            [*ours, "restore", str(manifest), "--db", target, "--quiet"],
            restore_env,
        )
        requests.delete(f"{admin}/{target}", timeout=300)

    def theirs_restore() -> None:
        target = f"cb-restored-{folder.name}"
        requests.put(f"{admin}/{target}", timeout=30).raise_for_status()  # couchrestore needs it to exist (#151)
        argv = [str(BIN / "couchrestore"), "--quiet", "--db", target, "--attachments"]
        run("couchrestore --attachments", "restore", argv, restore_env, stdin=folder / "cb-shallow.txt")
        requests.delete(f"{admin}/{target}", timeout=300)

    for pair in ((ours_full, theirs_full), (ours_winning, theirs_shallow), (ours_restore, theirs_restore)):
        for step in pair if ours_first else reversed(pair):
            step()
    return rows


def link_benchmark(url: str, proxy_url: str, n: int, delay_ms: float, rounds: int, work: Path) -> None:
    src = f"bench-link-{n}"
    seed(url, src, n)
    rows: list[LinkRow] = []
    delay_label = f"{delay_ms:g} ms each way"
    # Every tool, ours included, reads and writes through the same compatibility proxy (the one couchrestore needs
    # for doc_del_count, which also lets couchbackup's full mode run against pouchdb-server), so all pay its hop.
    with DelayLine(_port(proxy_url), delay_ms / 1000) as delayed:
        links = {"direct": (proxy_url, proxy_url), delay_label: (f"http://127.0.0.1:{delayed.port}",) * 2}
        for number in range(rounds):
            for link, (backup_url, restore_url) in links.items():
                print(f"round {number + 1}, {link}:", flush=True)
                rows += link_round(link, backup_url, restore_url, src, n, work, number % 2 == 0, url)
    requests.delete(f"{url}/{src}", timeout=300)
    print(
        f"\nCouchDB over a link, {time.strftime('%Y-%m-%d')}: {n} docs, pouchdb-server 4.2.0 in memory,"
        f" medians of {rounds} rounds, {os.cpu_count()} cores"
    )
    medians: dict[tuple[str, str, str], float] = {}
    print(f"{'link':<18} {'tool':<42} {'op':<8} {'median s':>9} {'docs/s':>9} {'peak RSS MB':>12}")
    for key in dict.fromkeys((link, tool, op) for link, tool, op, *_ in rows):
        runs = [r for r in rows if r[:3] == key]
        failures = [r[5] for r in runs if r[5]]
        if failures:
            print(f"{key[0]:<18} {key[1]:<42} {key[2]:<8} {'fails':>9} {'-':>9} {'-':>12}  {failures[0]}")
            continue
        medians[key] = statistics.median(r[3] for r in runs)
        rss = max(r[4] for r in runs)
        print(f"{key[0]:<18} {key[1]:<42} {key[2]:<8} {medians[key]:>9.2f} {n / medians[key]:>9.0f} {rss:>12.1f}")
    pairs = (
        ("ours full", "couchbackup (default: full)", "backup"),
        ("ours winning", "couchbackup --mode shallow --attachments", "backup"),
        ("ours restore (with verify)", "couchrestore --attachments", "restore"),
    )
    for link in links:
        for ours_tool, theirs_tool, op in pairs:
            a, b = medians.get((link, ours_tool, op)), medians.get((link, theirs_tool, op))
            if a and b:
                print(f"{link}: {ours_tool} vs {theirs_tool}: {b / a:.2f}x docs/s")
    for ours_tool, _theirs, op in pairs:
        a, b = medians.get((delay_label, ours_tool, op)), medians.get(("direct", ours_tool, op))
        if a and b:
            print(f"{ours_tool} through the delay line vs direct: {b / a:.2f}x of its direct docs/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--also", type=int, default=20_000, help="a smaller size too, to show memory is flat (0: none)")
    parser.add_argument("--link", action="store_true", help="direct and through a delay line, in rounds (see above)")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="with --link: delay each way")
    parser.add_argument("--rounds", type=int, default=3, help="with --link: rounds, medians reported")
    args = parser.parse_args()
    for tool in ("pouchdb-server", "couchbackup", "couchrestore"):
        if not (BIN / tool).exists():
            raise SystemExit(f"{BIN / tool} is missing: run scripts/ensure-pouchdb.sh")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="couch-bench-") as tmp:
        work = Path(tmp)
        server = subprocess.Popen(
            [str(BIN / "pouchdb-server"), "--in-memory", "--port", str(port), "--host", "127.0.0.1", "-n"],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):
                try:
                    requests.get(url, timeout=1)
                    break
                except requests.ConnectionError:
                    time.sleep(0.1)
            sizes = [s for s in (args.also, args.docs) if s]
            table = {}
            # couchrestore refuses targets whose info lacks doc_del_count == 0, which pouchdb-server never sends;
            # the proxy adds it. Restores of both tools go through it.
            with FaultProxy(url) as proxy:
                proxy.state.add_doc_del_count = True
                if args.link:
                    proxy.state.couchbackup_compat = True
                    link_benchmark(url, proxy.url, args.docs, args.delay_ms, args.rounds, work)
                    return
                for n in sizes:
                    print(f"size {n}:", flush=True)
                    table[n] = run_size(url, proxy.url, n, work)
        finally:
            server.terminate()
            server.wait()
    print(
        f"\nCouchDB backup benchmark, {time.strftime('%Y-%m-%d')},"
        f" pouchdb-server 4.2.0 in memory, {os.cpu_count()} cores"
    )
    print(f"{'docs':>8}  {'tool':<36} {'op':<8} {'seconds':>8} {'docs/s':>9} {'peak RSS MB':>12}")
    for n, rows in table.items():
        for tool, op, secs, rss, failure in rows:
            rate = "-" if failure else f"{n / secs:.0f}"
            memory = f"{rss:.1f}" if rss else "-"  # the server-alone reads run in this process: not measured
            print(f"{n:>8}  {tool:<36} {op:<8} {secs:>8.1f} {rate:>9} {memory:>12}  {failure}")
        fastest_read = min(secs for tool, op, secs, _, _ in rows if op == "read")
        shallow = [
            secs for tool, op, secs, _, failure in rows if tool == "couchbackup shallow (defaults)" and op == "backup"
        ]
        if shallow:
            print(
                f"{n:>8}  3x couchbackup's backup rate needs {n / (shallow[0] / 3):.0f} docs/s;"
                f" the server alone serves at most {n / fastest_read:.0f} docs/s"
            )
        for base_tool in ("couchbackup shallow (defaults)", "couchbackup shallow --attachments"):
            base = {op: secs for tool, op, secs, _, failure in rows if tool == base_tool and not failure}
            for tool, op, secs, _, failure in rows:
                if tool.startswith("ours") and op in base and not failure:
                    print(f"{n:>8}  {tool} vs {base_tool}, {op}: {base[op] / secs:.2f}x docs/s")


if __name__ == "__main__":
    main()
