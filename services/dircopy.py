"""The directory copy engine: timestamped, hard-linked snapshots of a directory tree (the ``rsync --link-dest`` idea).

Each run copies SOURCE into ``DEST/<UTC timestamp>/``. Files unchanged since the previous complete copy (same
size, mtime, mode and owner as recorded in that copy's manifest) are hard-linked to it, so every folder is a
complete tree while costing only the changes. Changed and new files are copied and hashed in the same pass.

Layout of a destination root::

    DEST/.backup-lock               flock held for the whole run (copy + retention)
    DEST/.inprogress-<stamp>/       a copy being written; never looks complete
    DEST/<stamp>/                   a complete copy (renamed from .inprogress-<stamp> at the very end)
    DEST/<stamp>/.backup-manifest.tsv     a JSON header line, then one tab-separated line per entry
    DEST/<stamp>/.backup-log.txt          what the run did: counts, bytes, duration, errors

A folder is "ours" only if its name is a stamp and its manifest's header carries ``FORMAT``; retention and
"previous copy" lookups ignore everything else in DEST.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import queue
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FORMAT = "backup-scheduler/dircopy/1"
MANIFEST_NAME = ".backup-manifest.tsv"
LOG_NAME = ".backup-log.txt"
LOCK_NAME = ".backup-lock"
INPROGRESS_PREFIX = ".inprogress-"
RESERVED_NAMES = (MANIFEST_NAME, LOG_NAME)
STAMP_PATTERN = re.compile(r"^\d{8}T\d{6}Z$")

# Files up to this size are read in one call; larger ones stream through a reusable buffer per thread.
SMALL_FILE = 1 << 20
CHUNK = 1 << 20
WALKERS = 2  # threads listing directories and linking unchanged files (their system calls overlap)
DEFAULT_THREADS = 4

# Whether copies can keep the source's owner: only root may chown to someone else.
_CAN_CHOWN = hasattr(os, "geteuid") and os.geteuid() == 0


class CopyError(Exception):
    """The copy cannot run at all (bad source or destination). The message says which path and why."""


class CopyBusy(CopyError):
    """Another copy into the same destination holds the lock; try again later."""


def stamp(when: datetime) -> str:
    """The folder name of a copy taken at ``when``: ISO 8601 basic format in UTC, sortable as text."""
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]|^-$")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPE = re.compile(r"\\(.)")
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r", "-": "-"}


def _escape(text: str) -> str:
    if not _NEEDS_ESCAPE.search(text):
        return text  # the common case, kept cheap: one regex scan
    if text == "-":
        return "\\-"  # a symlink pointing at a file called "-" must not read as "no target"
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return _UNESCAPE.sub(lambda m: _UNESCAPES[m.group(1)], text)


@dataclass(slots=True)
class Entry:
    """One line of a manifest. ``path`` is relative to the copy root, '/'-separated. ``kind`` is 'f' (regular
    file), 'l' (symlink, ``target`` set) or 'd' (directory). ``sha256`` is set for files only."""

    path: str
    kind: str
    size: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    sha256: str | None = None
    target: str | None = None

    def to_line(self) -> str:
        """One manifest line: tab-separated, path last. Tabs, newlines and backslashes in names are escaped."""
        target = "-" if self.target is None else _escape(self.target)
        return (
            f"{self.kind}\t{self.size}\t{self.mtime_ns}\t{self.mode:o}\t{self.uid}\t{self.gid}\t"
            f"{self.sha256 or '-'}\t{target}\t{_escape(self.path)}"
        )

    @classmethod
    def from_line(cls, line: str) -> Entry:
        kind, size, mtime, mode, uid, gid, sha, target, path = line.rstrip("\n").split("\t", 8)
        return cls(
            path=_unescape(path),
            kind=kind,
            size=int(size),
            mtime_ns=int(mtime),
            mode=int(mode, 8),
            uid=int(uid),
            gid=int(gid),
            sha256=None if sha == "-" else sha,
            target=None if target == "-" else _unescape(target),
        )

    def same_file_as(self, st: os.stat_result) -> bool:
        """True when a source file with stat ``st`` can be linked to the copy this entry describes."""
        return (
            self.kind == "f"
            and self.sha256 is not None
            and self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.mode == stat.S_IMODE(st.st_mode)
            and self.uid == st.st_uid
            and self.gid == st.st_gid
        )


@dataclass
class Manifest:
    header: dict[str, Any]
    entries: dict[str, Entry]


@dataclass
class CopyStats:
    """What one run did, compared with the previous complete copy."""

    files_copied: int = 0
    files_linked: int = 0
    files_deleted: int = 0
    symlinks: int = 0
    directories: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    bytes_linked: int = 0
    duration_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a failure of this copy

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["errors"] = len(self.errors)
        out.pop("notes")
        return out


@dataclass
class CopyResult:
    path: Path
    stamp: str
    previous: Path | None
    stats: CopyStats
    already_done: bool = False


@dataclass
class Progress:
    """Handed to a progress callback: counts so far against the totals found by the walk."""

    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int


ProgressCallback = Callable[[Progress], None]


@dataclass(slots=True)
class _Item:
    """One source entry found by the walk."""

    rel: str
    kind: str
    st: os.stat_result


# --- destination root --------------------------------------------------------------------------------------------


class DestinationLock:
    """An exclusive flock on DEST/.backup-lock for a whole run, so two copies (or a copy and retention) never
    touch the same destination at once, and every ``.inprogress-*`` folder seen while holding it is stale."""

    def __init__(self, dest_root: Path):
        self.path = dest_root / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> DestinationLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CopyBusy(f"{self.path.parent}: another copy into this destination is running") from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def read_manifest(copy_dir: Path) -> Manifest:
    """The manifest of a copy. ValueError if it is missing or is not ours."""
    path = copy_dir / MANIFEST_NAME
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
        header = json.loads(fh.readline() or "{}")
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a backup-scheduler manifest")
        entries = {}
        for line in fh:
            entry = Entry.from_line(line)
            entries[entry.path] = entry
    return Manifest(header, entries)


def _file_signature(st: os.stat_result) -> str:
    """The start of a manifest line for a regular file with stat ``st`` (kind, size, mtime, mode, owner).
    A previous line starting with it describes an unchanged file: comparing text avoids parsing 20,000 lines."""
    return f"f\t{st.st_size}\t{st.st_mtime_ns}\t{stat.S_IMODE(st.st_mode):o}\t{st.st_uid}\t{st.st_gid}\t"


def read_manifest_lines(copy_dir: Path) -> dict[str, str]:
    """A copy's manifest as path -> raw line, for the copier's unchanged-file check. ValueError if not ours."""
    path = copy_dir / MANIFEST_NAME
    lines: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
        if json.loads(fh.readline() or "{}").get("format") != FORMAT:
            raise ValueError(f"{path}: not a backup-scheduler manifest")
        for line in fh:
            line = line.rstrip("\n")
            lines[_unescape(line.rsplit("\t", 1)[1])] = line
    return lines


def _is_our_copy(path: Path) -> bool:
    if not STAMP_PATTERN.match(path.name) or not path.is_dir() or path.is_symlink():
        return False
    try:
        with open(path / MANIFEST_NAME, encoding="utf-8") as fh:
            return json.loads(fh.readline() or "{}").get("format") == FORMAT
    except (OSError, ValueError):
        return False


def complete_copies(dest_root: Path) -> list[Path]:
    """Our complete copies in ``dest_root``, oldest first. Anything else in the folder is ignored."""
    if not dest_root.is_dir():
        return []
    return sorted((p for p in dest_root.iterdir() if _is_our_copy(p)), key=lambda p: p.name)


def remove_tree(path: Path) -> None:
    """Delete a copy, including read-only directories inside it (a faithful copy keeps a 0555 directory 0555)."""

    def make_writable_and_retry(func: Callable[..., Any], failed: str, exc_info: Any) -> None:
        parent = os.path.dirname(failed)
        os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)
        if os.path.isdir(failed) and not os.path.islink(failed):
            os.chmod(failed, stat.S_IRWXU)
        func(failed)

    os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IRWXU)
    shutil.rmtree(path, onerror=make_writable_and_retry)  # onexc only exists from Python 3.12


def remove_stale_inprogress(dest_root: Path) -> list[Path]:
    """Delete ``.inprogress-*`` folders left by a crashed run. Call only while holding the DestinationLock."""
    removed = []
    for path in dest_root.iterdir():
        if path.name.startswith(INPROGRESS_PREFIX) and path.is_dir() and not path.is_symlink():
            remove_tree(path)
            removed.append(path)
    return removed


def prune_copies(dest_root: Path, keep: int | None, min_keep: int) -> list[Path]:
    """Delete our oldest complete copies beyond ``keep`` (never fewer than ``min_keep``, never the newest).
    ``keep=None`` keeps everything. Call only while holding the DestinationLock."""
    if keep is None:
        return []
    copies = complete_copies(dest_root)
    allowed = max(keep, min_keep, 1)
    doomed = copies[: max(0, len(copies) - allowed)]
    for path in doomed:
        remove_tree(path)
    return doomed


# --- walking and copying -----------------------------------------------------------------------------------------


def _walk_directories(source: Path, stats: CopyStats) -> Iterator[tuple[_Item | None, list[_Item]]]:
    """Depth-first walk without following symlinks, one directory at a time: (the directory, or None for the
    source root; its files and symlinks). Unreadable directories and special files are noted in ``stats``
    instead of stopping the run."""
    stack: list[_Item | None] = [None]  # None stands for the source root itself
    while stack:
        current = stack.pop()
        children, subdirs = _read_directory(str(source), current.rel if current else "", stats)
        yield current, children
        stack.extend(reversed(subdirs))


def _read_directory(source: str, rel_dir: str, stats: CopyStats) -> tuple[list[_Item], list[_Item]]:
    """The files and symlinks, and the subdirectories, of ``rel_dir`` under ``source``; nothing (and an error in
    ``stats``) when it cannot be opened. Listed through a descriptor, so each lstat resolves one name instead of
    the whole path."""
    try:
        dir_fd = os.open(f"{source}/{rel_dir}" if rel_dir else source, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        stats.errors.append(f"cannot list {rel_dir or '.'}: {exc.strerror}")
        return [], []
    try:
        return _list_directory(dir_fd, rel_dir, stats)
    finally:
        os.close(dir_fd)


def _list_directory(dir_fd: int, rel_dir: str, stats: CopyStats) -> tuple[list[_Item], list[_Item]]:
    """The files and symlinks, and the subdirectories, of the open directory ``dir_fd`` (``rel_dir`` in the walk)."""
    try:
        with os.scandir(dir_fd) as it:
            entries = list(it)  # directory order: the manifest is sorted when written, nothing else cares
    except OSError as exc:
        stats.errors.append(f"cannot list {rel_dir or '.'}: {exc.strerror}")
        return [], []
    prefix = f"{rel_dir}/" if rel_dir else ""
    children = []
    subdirs = []
    for entry in entries:
        rel = prefix + entry.name
        if not rel_dir and entry.name in RESERVED_NAMES:
            stats.errors.append(f"{rel}: name is reserved for the backup's own manifest or log; not copied")
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # vanished between listing and stat: it is simply not in this copy
        except OSError as exc:
            stats.errors.append(f"cannot stat {rel}: {exc.strerror}")
            continue
        mode = st.st_mode
        if stat.S_ISREG(mode):
            children.append(_Item(rel, "f", st))
        elif stat.S_ISLNK(mode):
            children.append(_Item(rel, "l", st))
        elif stat.S_ISDIR(mode):
            subdirs.append(_Item(rel, "d", st))
        else:
            stats.skipped += 1  # sockets, FIFOs, devices: like rsync -a without -D
    return children, subdirs


def _walk(source: Path, stats: CopyStats) -> Iterator[_Item]:
    """Every directory, file and symlink under ``source`` (not the root itself), as ``_walk_directories`` finds them."""
    for directory, children in _walk_directories(source, stats):
        if directory is not None:
            yield directory
        yield from children


_buffers = threading.local()


def _chunk_buffer() -> bytearray:
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(CHUNK)
    return buf


def copy_file(src: str, dst: str, st: os.stat_result) -> tuple[str, int]:
    """Copy one regular file, hashing the bytes as they pass; set mode, owner (as root) and times from ``st``.
    Returns (sha256 hex, bytes copied). ``dst`` must not exist."""
    digest = hashlib.sha256()
    copied = 0
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if st.st_size < SMALL_FILE:
                # Small files: one read of the whole file, then one more to see end of file (it may have grown).
                want = st.st_size + 1
                while data := os.read(fd_in, want):
                    digest.update(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd_out, view) :]
                    copied += len(data)
                    want = CHUNK
            else:
                buf = _chunk_buffer()
                whole = memoryview(buf)
                while n := os.readv(fd_in, [buf]):
                    chunk = whole[:n]
                    digest.update(chunk)
                    while chunk:
                        chunk = chunk[os.write(fd_out, chunk) :]
                    copied += n
            if _CAN_CHOWN:
                os.fchown(fd_out, st.st_uid, st.st_gid)
            os.fchmod(fd_out, stat.S_IMODE(st.st_mode))
            os.utime(fd_out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return digest.hexdigest(), copied


def _set_dir_attributes(path: str, st: os.stat_result) -> None:
    if _CAN_CHOWN:
        os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _make_symlink(src: str, dst: str, st: os.stat_result) -> str:
    target = os.readlink(src)
    os.symlink(target, dst)
    if _CAN_CHOWN:
        os.lchown(dst, st.st_uid, st.st_gid)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return target


def _entry(item: _Item, sha256: str | None = None, target: str | None = None, size: int | None = None) -> Entry:
    st = item.st
    return Entry(
        path=item.rel,
        kind=item.kind,
        size=st.st_size if size is None else size,
        mtime_ns=st.st_mtime_ns,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        sha256=sha256,
        target=target,
    )


def _syncfs(path: Path) -> None:
    """Flush the destination file system once, so a copy renamed to look complete survives a power cut.
    syncfs(2) flushes only that file system; Python has no wrapper for it, so call libc, falling back to sync()."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc_syncfs is None or _libc_syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _find_syncfs() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_libc_syncfs = _find_syncfs()


@dataclass
class _Result:
    """What happened to one file copied in the pool: copied (``entry`` set), vanished (nothing), or failed."""

    item: _Item
    entry: Entry | None = None
    error: str | None = None


# A hard link to the previous copy failed for one of these reasons: that copy is damaged, the file system's
# link limit is reached, or it cannot link at all. A fresh copy of the file is the safe answer.
_COPY_INSTEAD_OF_LINK = frozenset((errno.ENOENT, errno.EMLINK, errno.EXDEV, errno.EPERM))


class _Copier:
    """One run: walk SOURCE, link or copy each entry into the in-progress folder, collect manifest lines.

    Each directory is one task for ``WALKERS`` walking threads: create it, list it, hard-link its unchanged files,
    hand its changed and new files to the copy pool, and return its subdirectories as new tasks. A directory is
    filled right after it is created. An incremental run is mostly ``lstat`` and ``link`` calls, which release
    the interpreter lock: two walkers on different directories overlap them in the kernel (handing one
    directory's files from a walker to a linking thread does not, the threads mostly wait for each other).
    """

    def __init__(
        self,
        source: Path,
        work: Path,
        previous: Path | None,
        threads: int,
        on_progress: ProgressCallback | None,
        progress_every: float,
    ):
        self.source = str(source)
        self.work = str(work)
        self.previous = str(previous) if previous else None
        self.stats = CopyStats()
        self.previous_lines: dict[str, str] = {}
        if previous is not None:
            try:
                self.previous_lines = read_manifest_lines(previous)
            except (OSError, ValueError, IndexError) as exc:
                # A damaged manifest must not stop backups: copy everything, and say why in the log.
                self.stats.notes.append(f"previous copy {previous.name} has an unreadable manifest ({exc}); full copy")
        self.threads = max(1, threads)
        self.on_progress = on_progress
        self.progress_every = progress_every
        self.lines: dict[str, str] = {}  # path -> manifest line, for everything in the new copy
        self._files_done = 0
        self._files_total = 0
        self._bytes_done = 0
        self._bytes_total = 0
        self._last_report = 0.0
        self._lock = threading.Lock()  # counters and stats updated by the walking threads
        self._directories: list[_Item] = []  # in creation order: a parent always before its children
        self._copies: list[Future[_Result]] = []
        self._copy_pool: ThreadPoolExecutor | None = None
        self._seen_any = False

    def run(self, allow_empty: bool) -> None:
        with (
            ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="dircopy") as pool,
            ThreadPoolExecutor(max_workers=WALKERS, thread_name_prefix="dircopy-walk") as walkers,
        ):
            self._copy_pool = pool
            # Finished walking tasks come back through a queue (one get each; waiting on the set of pending
            # futures would re-register on all of them every time, which costs more than the walk itself).
            finished: queue.SimpleQueue[Future[list[_Item]]] = queue.SimpleQueue()

            def walk(directory: _Item | None) -> None:
                walkers.submit(self._visit, directory).add_done_callback(finished.put)

            walk(None)
            outstanding = 1
            while outstanding:
                subdirs = finished.get().result()
                outstanding += len(subdirs) - 1
                for sub in subdirs:
                    walk(sub)
            directories, pending = self._directories, self._copies
            if not self._seen_any and not allow_empty and any(line[0] != "d" for line in self.previous_lines.values()):
                raise CopyError(
                    f"{self.source} is empty but the previous copy {self.previous} has files; is the share mounted?"
                    " (set options.allow_empty to copy an empty source)"
                )
            self._report(force=True)  # the walk is over: totals are known from here on
            for future in pending:
                self._collect(future.result())

        for item in reversed(directories):  # children before parents, so a directory's time sticks
            self._guard(item.rel, _set_dir_attributes, f"{self.work}/{item.rel}", item.st)
        self.stats.directories = len(directories)
        self.stats.files_deleted = sum(
            1 for path, line in self.previous_lines.items() if line[0] != "d" and path not in self.lines
        )
        self._report(force=True)

    def _visit(self, directory: _Item | None) -> list[_Item]:
        """One walking task: the directory (None: the source root) created, listed, its unchanged files linked and
        the others sent to the copy pool. Returns its subdirectories. An unreadable directory is noted in the
        stats and left empty."""
        rel_dir = directory.rel if directory else ""
        if directory is not None:
            os.mkdir(f"{self.work}/{rel_dir}", 0o700)  # opened up to the source's mode once filled
            self._directories.append(directory)
            self.lines[rel_dir] = _entry(directory).to_line()
            self._seen_any = True
        found = CopyStats()  # this thread's own, merged under the lock
        children, subdirs = _read_directory(self.source, rel_dir, found)
        if found.errors or found.skipped:
            with self._lock:
                self.stats.errors.extend(found.errors)
                self.stats.skipped += found.skipped
        if children:
            self._seen_any = True
        assert self._copy_pool is not None
        for item in self._link_unchanged(rel_dir, children):
            if item.kind == "f":
                self._copies.append(self._copy_pool.submit(self._copy_one, item))
            else:
                self._symlink(item)
        return subdirs

    def _link_unchanged(self, rel_dir: str, children: list[_Item]) -> list[_Item]:
        """Hard-link the files of one directory that are unchanged since the previous copy: same size, mtime,
        mode and owner as its manifest says (the previous copy itself is not looked at). Their previous manifest
        lines, checksum included, hold for the new copy as they are. Returns what is left to copy or create."""
        previous = self.previous_lines
        left: list[_Item] = []
        unchanged: list[tuple[_Item, str]] = []
        files = size = 0
        for item in children:
            if item.kind == "f":
                st = item.st
                files += 1
                size += st.st_size
                before = previous.get(item.rel)
                if before is not None and before.startswith(_file_signature(st)):
                    unchanged.append((item, before))
                    continue
            left.append(item)
        with self._lock:
            self._files_total += files
            self._bytes_total += size
        if unchanged:
            left += self._link(rel_dir, unchanged)
        return left

    def _link(self, rel_dir: str, unchanged: list[tuple[_Item, str]]) -> list[_Item]:
        """Link files of the directory ``rel_dir`` to the previous copy. Links are made between two directory
        descriptors, so each resolves two names rather than two whole paths. Returns the files to copy instead."""
        sub = f"/{rel_dir}" if rel_dir else ""
        try:
            from_fd = os.open(f"{self.previous}{sub}", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return [item for item, _ in unchanged]  # the previous copy is damaged: copy them afresh
        to_copy = []
        linked = linked_bytes = 0
        name_at = len(rel_dir) + 1 if rel_dir else 0
        try:
            to_fd = os.open(f"{self.work}{sub}", os.O_RDONLY | os.O_DIRECTORY)
            try:
                for item, before in unchanged:
                    name = item.rel[name_at:]
                    try:
                        os.link(name, name, src_dir_fd=from_fd, dst_dir_fd=to_fd, follow_symlinks=False)
                    except OSError as exc:
                        if exc.errno in _COPY_INSTEAD_OF_LINK:
                            to_copy.append(item)
                        else:
                            self.stats.errors.append(f"{item.rel}: {exc.strerror or exc}")
                            with self._lock:
                                self._files_done += 1
                                self._bytes_done += item.st.st_size
                        continue
                    self.lines[item.rel] = before
                    linked += 1
                    linked_bytes += item.st.st_size
            finally:
                os.close(to_fd)
        finally:
            os.close(from_fd)
        with self._lock:
            self.stats.files_linked += linked
            self.stats.bytes_linked += linked_bytes
            self._files_done += linked
            self._bytes_done += linked_bytes
        return to_copy

    def _guard(self, rel: str, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return func(*args)
        except OSError as exc:
            self.stats.errors.append(f"{rel}: {exc.strerror or exc}")
            return None

    def _symlink(self, item: _Item) -> None:
        target = self._guard(item.rel, _make_symlink, f"{self.source}/{item.rel}", f"{self.work}/{item.rel}", item.st)
        if target is not None:
            self.lines[item.rel] = _entry(item, target=target).to_line()
            with self._lock:
                self.stats.symlinks += 1

    def _copy_one(self, item: _Item) -> _Result:
        """Copy and hash one file (runs in the pool)."""
        try:
            sha256, size = copy_file(f"{self.source}/{item.rel}", f"{self.work}/{item.rel}", item.st)
            return _Result(item, entry=_entry(item, sha256=sha256, size=size))
        except FileNotFoundError:
            return _Result(item)  # deleted while we were copying: not part of this copy
        except OSError as exc:
            return _Result(item, error=f"{item.rel}: {exc.strerror or exc}")

    def _collect(self, result: _Result) -> None:
        if result.error is not None:
            self.stats.errors.append(result.error)
        if result.entry is not None:
            self.lines[result.item.rel] = result.entry.to_line()
            self.stats.files_copied += 1
            self.stats.bytes_copied += result.entry.size
        self._files_done += 1
        self._bytes_done += result.item.st.st_size
        if self.on_progress is not None:
            self._report()

    def _report(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if force or now - self._last_report >= self.progress_every:
            self._last_report = now
            self.on_progress(Progress(self._files_done, self._files_total, self._bytes_done, self._bytes_total))


def _write_manifest(path: Path, header: dict[str, Any], lines: dict[str, str]) -> None:
    """Header, then one line per entry sorted by path (so two manifests can be compared with diff)."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
        fh.write(json.dumps(header, sort_keys=True) + "\n")
        if lines:
            fh.write("\n".join([lines[path] for path in sorted(lines)]) + "\n")


def _write_log(path: Path, header: dict[str, Any], stats: CopyStats) -> None:
    lines = [
        f"backup-scheduler directory copy {header['stamp']}",
        f"source:    {header['source']}",
        f"previous:  {header['previous'] or '(none: full copy)'}",
        f"started:   {header['started']}",
        f"finished:  {header['finished']}",
        f"duration:  {stats.duration_seconds:.2f} s",
        f"copied:    {stats.files_copied} files, {stats.bytes_copied} bytes",
        f"linked:    {stats.files_linked} files, {stats.bytes_linked} bytes (unchanged, hard links to previous)",
        f"deleted:   {stats.files_deleted} files (in the previous copy, gone from the source)",
        f"symlinks:  {stats.symlinks}",
        f"dirs:      {stats.directories}",
        f"skipped:   {stats.skipped} special files (sockets, FIFOs, devices)",
        f"errors:    {len(stats.errors)}",
    ]
    lines += [f"  error: {e}" for e in stats.errors]
    lines += [f"note:      {n}" for n in stats.notes]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def copy_tree(
    source: Path,
    dest_root: Path,
    when: datetime,
    *,
    threads: int = DEFAULT_THREADS,
    sync: bool = True,
    allow_empty: bool = False,
    on_progress: ProgressCallback | None = None,
    progress_every: float = 5.0,
    clock: Callable[[], datetime] | None = None,
) -> CopyResult:
    """Copy ``source`` into ``dest_root/<stamp(when)>``, linking unchanged files to the newest complete copy.

    Idempotent for the same ``when``: if that copy is already complete it is returned untouched
    (``already_done``). Raises CopyError for a bad source/destination, CopyBusy when another run holds the lock.
    Per-file problems do not stop the copy: they are listed in ``stats.errors`` and in the log.
    """
    source = Path(source)
    dest_root = Path(dest_root)
    if not source.is_dir():
        raise CopyError(f"source {source} is not a directory (is the share mounted on this machine?)")
    if not dest_root.is_dir():
        raise CopyError(f"destination {dest_root} is not a directory (create it first)")
    source_real, dest_real = source.resolve(), dest_root.resolve()
    if dest_real == source_real or source_real in dest_real.parents:
        raise CopyError(f"destination {dest_root} is inside the source {source}; it would copy itself")
    name = stamp(when)
    final = dest_root / name
    clock = clock or (lambda: datetime.now(UTC))
    with DestinationLock(dest_root):
        remove_stale_inprogress(dest_root)
        if _is_our_copy(final):
            header = read_manifest(final).header
            stats = CopyStats(**{k: v for k, v in header.get("stats", {}).items() if k != "errors"})
            return CopyResult(final, name, None, stats, already_done=True)
        if final.exists():
            raise CopyError(f"{final} exists but is not a complete copy made by this service; move it away")
        copies = complete_copies(dest_root)
        previous = copies[-1] if copies else None
        work = dest_root / f"{INPROGRESS_PREFIX}{name}"
        os.mkdir(work, 0o700)
        started = clock()
        t0 = time.monotonic()
        copier = _Copier(source, work, previous, threads, on_progress, progress_every)
        try:
            copier.run(allow_empty)
        except CopyError:
            remove_tree(work)  # refused before anything worth keeping was written
            raise
        stats = copier.stats
        stats.duration_seconds = round(time.monotonic() - t0, 3)
        header = {
            "format": FORMAT,
            "stamp": name,
            "source": str(source),
            "previous": previous.name if previous else None,
            "started": started.isoformat(),
            "finished": clock().isoformat(),
            "stats": stats.summary(),
        }
        _write_manifest(work / MANIFEST_NAME, header, copier.lines)
        _write_log(work / LOG_NAME, header, stats)
        _set_dir_attributes(str(work), source.stat())
        if sync:
            _syncfs(work)
        os.rename(work, final)
        return CopyResult(final, name, previous, stats)


def prune(dest_root: Path, keep: int | None, min_keep: int) -> list[Path]:
    """Retention for a destination root, under its lock (CopyBusy if a copy is running there)."""
    with DestinationLock(Path(dest_root)):
        return prune_copies(Path(dest_root), keep, min_keep)


# --- verify and restore ------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """The result of re-reading a copy against its manifest. ``problems`` is empty when the copy is intact."""

    copy: Path
    files_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _hash_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    buf = _chunk_buffer()
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while n := os.readv(fd, [buf]):
            digest.update(view[:n])
            size += n
    finally:
        os.close(fd)
    return digest.hexdigest(), size


def _check_entry(root: str, entry: Entry) -> str | None:
    """One problem with ``entry`` in the copy at ``root``, or None when it matches the manifest."""
    path = f"{root}/{entry.path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{entry.path}: missing"
    except OSError as exc:
        return f"{entry.path}: cannot stat ({exc.strerror})"
    if entry.kind == "d":
        return None if stat.S_ISDIR(st.st_mode) else f"{entry.path}: expected a directory"
    if entry.kind == "l":
        if not stat.S_ISLNK(st.st_mode):
            return f"{entry.path}: expected a symlink"
        target = os.readlink(path)
        return None if target == entry.target else f"{entry.path}: symlink points to {target!r}, not {entry.target!r}"
    if not stat.S_ISREG(st.st_mode):
        return f"{entry.path}: expected a regular file"
    if stat.S_IMODE(st.st_mode) != entry.mode:
        return f"{entry.path}: mode {stat.S_IMODE(st.st_mode):o}, manifest says {entry.mode:o}"
    try:
        sha256, size = _hash_file(path)
    except OSError as exc:
        return f"{entry.path}: cannot read ({exc.strerror})"
    if size != entry.size:
        return f"{entry.path}: {size} bytes, manifest says {entry.size}"
    if sha256 != entry.sha256:
        return f"{entry.path}: content differs from the manifest (sha256 {sha256}, expected {entry.sha256})"
    return None


def verify_copy(
    copy_dir: Path, *, threads: int = DEFAULT_THREADS, on_progress: ProgressCallback | None = None
) -> VerifyReport:
    """Re-read every file of a copy and compare it with the manifest (checksum, size, mode, symlink targets),
    and list anything in the folder that the manifest does not know."""
    copy_dir = Path(copy_dir)
    try:
        manifest = read_manifest(copy_dir)
    except (OSError, ValueError) as exc:
        raise CopyError(f"{copy_dir}: no readable manifest ({exc})") from exc
    report = VerifyReport(copy_dir)
    entries = list(manifest.entries.values())
    files = [e for e in entries if e.kind == "f"]
    total_bytes = sum(e.size for e in files)
    root = str(copy_dir)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="verify") as pool:
        for entry, problem in zip(entries, pool.map(lambda e: _check_entry(root, e), entries), strict=True):
            if problem:
                report.problems.append(problem)
            if entry.kind == "f":
                report.files_checked += 1
                report.bytes_checked += entry.size
                if on_progress is not None and report.files_checked % 200 == 0:
                    on_progress(Progress(report.files_checked, len(files), report.bytes_checked, total_bytes))
    walk_stats = CopyStats()
    for item in _walk(copy_dir, walk_stats):
        if item.rel not in manifest.entries and item.rel not in RESERVED_NAMES:
            report.problems.append(f"{item.rel}: in the copy but not in its manifest")
    report.problems.extend(e for e in walk_stats.errors if "reserved" not in e)
    if on_progress is not None:
        on_progress(Progress(report.files_checked, len(files), report.bytes_checked, total_bytes))
    return report


@dataclass
class RestoreResult:
    target: Path
    files: int = 0
    bytes: int = 0
    symlinks: int = 0
    directories: int = 0
    safety_copy: Path | None = None
    errors: list[str] = field(default_factory=list)


def _restore_file(src: str, dst: str, expected: Entry) -> int:
    """Copy one file out of a backup to a temporary name beside ``dst``, check its checksum against the
    manifest, then rename it into place (so a half-restored file never replaces a good one)."""
    st = os.lstat(src)
    tmp = f"{os.path.dirname(dst) or '.'}/.restore-{os.getpid()}-{threading.get_ident()}-{os.path.basename(dst)}"
    try:
        sha256, size = copy_file(src, tmp, st)
        if sha256 != expected.sha256:
            raise OSError(errno.EIO, f"checksum mismatch in the backup (sha256 {sha256}, manifest {expected.sha256})")
        os.rename(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return size


def restore_copy(
    copy_dir: Path,
    target: Path,
    *,
    subpath: str | None = None,
    overwrite: bool = False,
    safety_dest: Path | None = None,
    when: datetime | None = None,
    threads: int = DEFAULT_THREADS,
    on_progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Restore a copy (or the subtree ``subpath`` of it) into ``target``.

    ``target`` must be missing or empty, unless ``overwrite``: then a safety copy of ``target`` is first taken
    into ``safety_dest`` (by default the copy's own destination root, where it is hard-linked against the
    newest copy and so costs only the differences), and only files present in the backup are replaced.
    Each restored file is checked against the manifest's checksum before it replaces anything.
    """
    copy_dir, target = Path(copy_dir), Path(target)
    try:
        manifest = read_manifest(copy_dir)
    except (OSError, ValueError) as exc:
        raise CopyError(f"{copy_dir}: not a complete copy made by this service ({exc})") from exc
    prefix = (subpath or "").strip("/")
    if prefix and prefix not in manifest.entries:
        raise CopyError(f"{prefix!r} is not in the copy {copy_dir}")
    if prefix and manifest.entries[prefix].kind != "d":
        raise CopyError(f"{prefix!r} in {copy_dir} is not a directory; restore its parent directory instead")
    result = RestoreResult(target)
    if target.exists() and not target.is_dir():
        raise CopyError(f"restore target {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise CopyError(
                f"restore target {target} is not empty; restore into an empty directory, or pass --overwrite"
                " (a safety copy of the target is taken first)"
            )
        dest_root = Path(safety_dest) if safety_dest else copy_dir.parent
        safety = copy_tree(target, dest_root, when or datetime.now(UTC), threads=threads, allow_empty=True)
        if safety.stats.errors:
            raise CopyError(f"safety copy {safety.path} of {target} had errors; not overwriting anything")
        result.safety_copy = safety.path
    target.mkdir(parents=True, exist_ok=True)

    def relative(path: str) -> str | None:
        if not prefix:
            return path
        if path.startswith(prefix + "/"):
            return path[len(prefix) + 1 :]
        return None

    chosen = [(rel, e) for e in manifest.entries.values() if (rel := relative(e.path)) is not None]
    chosen.sort(key=lambda pair: pair[0])
    root, dest = str(copy_dir), str(target)
    directories = []
    files = []
    for rel, entry in chosen:
        dst = f"{dest}/{rel}"
        if entry.kind == "d":
            os.makedirs(dst, mode=0o700, exist_ok=True)
            directories.append((rel, entry))
        elif entry.kind == "l":
            try:
                if os.path.lexists(dst):
                    os.unlink(dst)
                os.symlink(entry.target or "", dst)
                os.utime(dst, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
                result.symlinks += 1
            except OSError as exc:
                result.errors.append(f"{rel}: {exc.strerror or exc}")
        else:
            files.append((rel, entry))
    total = sum(e.size for _, e in files)

    def restore_one(pair: tuple[str, Entry]) -> tuple[str, int | None, str | None]:
        rel, entry = pair
        try:
            return rel, _restore_file(f"{root}/{entry.path}", f"{dest}/{rel}", entry), None
        except OSError as exc:
            return rel, None, f"{rel}: {exc.strerror or exc}"

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="restore") as pool:
        for done, (_rel, size, error) in enumerate(pool.map(restore_one, files), start=1):
            if error:
                result.errors.append(error)
            else:
                result.files += 1
                result.bytes += size or 0
            if on_progress is not None and (done % 200 == 0 or done == len(files)):
                on_progress(Progress(done, len(files), result.bytes, total))
    for rel, entry in reversed(directories):
        try:
            if _CAN_CHOWN:
                os.chown(f"{dest}/{rel}", entry.uid, entry.gid)
            os.chmod(f"{dest}/{rel}", entry.mode)
            os.utime(f"{dest}/{rel}", ns=(entry.mtime_ns, entry.mtime_ns))
        except OSError as exc:
            result.errors.append(f"{rel}: {exc.strerror or exc}")
    result.directories = len(directories)
    return result
