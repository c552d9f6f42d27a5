"""Dump files made and loaded by the MariaDB client tools (``mariadb-dump``, ``mariadb``): the local profile's way of
moving a database, and the Cloud SQL fake's. A dump counts only once complete: it is written aside and renamed, and
a load first checks mariadb-dump's completion marker."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

from kinds.sqlsync.errors import DumpError, DumpMissing
from kinds.sqlsync.plan import DatabaseRef

DUMP_COMPLETE = b"-- Dump completed"
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def binary(name: str) -> str:
    path = shutil.which(name, path=SEARCH_PATH)
    if path is None:
        raise LookupError(f"{name} not found: install mariadb-client (scripts/ensure-mariadb.sh)")
    return path


def client_args(ref: DatabaseRef, option_file: Path) -> list[str]:
    """Connection options for the client tools; the password goes in an option file (0600, in a private temporary
    folder), never on the command line where ``ps`` shows it."""
    fd = os.open(option_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"[client]\nuser={ref.user}\npassword={ref.password}\n")
    args = [f"--defaults-extra-file={option_file}"]
    if ref.socket:
        args.append(f"--socket={ref.socket}")
    else:
        args += [f"--host={ref.host}", f"--port={ref.port}", "--protocol=TCP"]
    return args


def private_dir(path: Path) -> Path:
    """Make ``path`` (and missing parents) a folder only its owner can enter: dumps hold personal data."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def dump_database(
    ref: DatabaseRef, path: Path, ignore_tables: tuple[str, ...] = (), tables: tuple[str, ...] = ()
) -> int:
    """``mariadb-dump`` of one database (or of ``tables`` in it) to ``path`` (0600); written aside then renamed, so a
    half dump never counts."""
    private_dir(path.parent)
    partial = path.with_suffix(".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with (
        tempfile.TemporaryDirectory() as tmp,
        os.fdopen(fd, "wb") as out,
        open(Path(tmp) / "stderr", "w+b") as errors,
    ):
        dumper = subprocess.Popen(
            [
                binary("mariadb-dump"),
                *client_args(ref, Path(tmp) / "client.cnf"),
                "--single-transaction",
                "--quick",
                "--skip-lock-tables",
                "--hex-blob",
                "--no-tablespaces",
                "--default-character-set=utf8mb4",
                "--skip-dump-date",
                *[f"--ignore-table={ref.database}.{table}" for table in ignore_tables],
                ref.database,
                *tables,
            ],
            stdout=out,
            stderr=errors,
        )
        stalled = _watch(dumper, lambda: os.fstat(out.fileno()).st_size)
        errors.seek(0)
        stderr = errors.read()
    if stalled or dumper.returncode != 0:
        partial.unlink(missing_ok=True)
        message = f"stalled: no data for {STALL_SECONDS:.0f} s; stopped" if stalled else stderr.decode(errors="replace")
        raise DumpError(f"mariadb-dump of {ref.label()} failed", message)
    check_complete(partial)
    partial.replace(path)
    return path.stat().st_size


# mariadb-dump has no network timeouts of its own: a server that stops sending (a stalled connection) would hold it,
# and the worker, for ever. A dump whose output has not grown for this long is stopped.
STALL_SECONDS = 300.0


def _watch(process: subprocess.Popen[bytes], progress: Callable[[], int]) -> bool:
    """Wait for ``process``; stop it when ``progress()`` has not changed for STALL_SECONDS. True if it was stopped."""
    last, since = progress(), time.monotonic()
    while True:
        try:
            process.wait(timeout=min(1.0, STALL_SECONDS))
            return False
        except subprocess.TimeoutExpired:
            pass
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= STALL_SECONDS:
            process.kill()
            process.wait()
            return True


def check_complete(path: Path) -> None:
    """A dump that is not there is DumpMissing; one without mariadb-dump's completion marker is truncated."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DumpMissing(f"dump {path} does not exist (deleted, or never made by this run)") from None
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 200))
        if DUMP_COMPLETE not in fh.read():
            raise DumpMissing(f"dump {path} has no completion marker: it is truncated")


def load_dump(ref: DatabaseRef, path: Path, feed: Callable[[Callable[[bytes], object]], Any] | None = None) -> Any:
    """Feed a dump file to ``mariadb`` connected to ``ref``'s database. With ``feed``, the file is not read here:
    ``feed(write)`` writes the statements (masked ones, say) and its result is returned."""
    check_complete(path)
    with (
        tempfile.TemporaryDirectory() as tmp,
        open(Path(tmp) / "stderr", "w+b") as errors,
        open(path, "rb") if feed is None else nullcontext(subprocess.PIPE) as source,
    ):
        loader = subprocess.Popen(
            [
                binary("mariadb"),
                *client_args(ref, Path(tmp) / "client.cnf"),
                "--default-character-set=utf8mb4",
                "--batch",
                ref.database,
            ],
            stdin=source,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        result = None
        try:
            if feed is None:
                loader.wait()
            else:
                assert loader.stdin is not None
                try:
                    result = feed(loader.stdin.write)
                    loader.stdin.close()
                except BrokenPipeError:
                    pass  # the loader stopped: its exit status and message say why
                loader.wait()
        except BaseException:
            loader.kill()
            loader.wait()
            raise
        finally:
            if loader.stdin is not None and not loader.stdin.closed:
                with suppress(BrokenPipeError):  # the loader is gone; its pipe had unread data
                    loader.stdin.close()
        errors.seek(0)
        message = errors.read().decode(errors="replace")
    if loader.returncode != 0:
        raise DumpError(f"loading {path.name} into {ref.label()} failed", message)
    return result


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
