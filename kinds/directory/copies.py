"""The directory copy engine: timestamped, hard-linked snapshots of a directory tree (the ``rsync --link-dest`` idea).

Each run copies SOURCE into ``DEST/<UTC timestamp>/``. Files unchanged since the previous complete copy (same
size, mtime, mode and owner as recorded in that copy's manifest, and the previous copy's file still as its
manifest says) are hard-linked to it, so every folder is a complete tree while costing only the changes. Changed
and new files are copied and hashed in the same pass.

Layout of a destination root::

    DEST/.backup-lock               flock held for the whole run (copy + retention)
    DEST/.inprogress-<stamp>/       a copy being written; never looks complete
    DEST/.deleting-<stamp>/         a copy retention has started to delete; never looks complete
    DEST/.safety-copies/<stamp>/    copies of a restore target taken by ``restore --overwrite`` (0700 folder)
    DEST/<stamp>/                   a complete copy (renamed from .inprogress-<stamp> at the very end)
    DEST/<stamp>/.backup-manifest.tsv     a JSON header line, then one tab-separated line per entry
    DEST/<stamp>/.backup-log.txt          what the run did: counts, bytes, duration, errors

A folder is "ours" only if its name is a stamp and its manifest's header carries one of ``FORMATS``; retention
and "previous copy" lookups ignore everything else in DEST.

Names are whatever the file system holds (any byte but '/' and NUL, up to 255 bytes), and paths may be longer
than the kernel's PATH_MAX: every system call on a long path goes through a descriptor of a directory close to it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import marshal
import mmap
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

FORMAT = "backup-scheduler/dircopy/2"  # every control character and undecodable byte escaped; header "root"
FORMAT_V1 = "backup-scheduler/dircopy/1"  # only \\ \t \n \r escaped; still read (existing users' copies)
FORMATS = (FORMAT, FORMAT_V1)
MANIFEST_NAME = ".backup-manifest.tsv"
LOG_NAME = ".backup-log.txt"
LOCK_NAME = ".backup-lock"
INPROGRESS_PREFIX = ".inprogress-"
CHECKPOINT_PREFIX = ".checkpoint-"  # beside .inprogress-<stamp>: where a budgeted copy stopped, to resume from
LIVE_CHECKPOINT_SECONDS = 3 * 3600  # younger: its run is still going; older: left by a crash, removed
DELETING_PREFIX = ".deleting-"
SAFETY_DIR = ".safety-copies"
RESERVED_NAMES = (MANIFEST_NAME, LOG_NAME)
STAMP_PATTERN = re.compile(r"^\d{8}T\d{6}Z$")

# Files up to this size are read in one call; larger ones stream through a reusable buffer per thread.
SMALL_FILE = 1 << 20
CHUNK = 1 << 20
# Threads listing directories and linking unchanged files. One (the calling thread) is fastest on a local disk,
# where each system call takes microseconds and threads mostly trade the interpreter lock; more overlap the round
# trips of a network file system (NFS), where each lstat waits for the server.
WALKERS = 1
DEFAULT_THREADS = 4
# Processes sharing a copy's walk when the CLI runs it (copy_tree's ``processes``); the service's copies stay in
# one process, since forking a threaded server can leave a worker waiting on a lock held by another thread.
CLI_PROCESSES = min(2, os.cpu_count() or 1)
MAX_HEADER_ERRORS = 1000  # errors listed in a manifest's header (all of them are in the log)

# Whether copies can keep the source's owner: only root may chown to someone else.
_CAN_CHOWN = hasattr(os, "geteuid") and os.geteuid() == 0

# Paths at least this long (in bytes) are reached through directory descriptors: PATH_MAX is 4,096 with the NUL.
_LONG_PATH = 4000

# Errors that mean the destination cannot take any more of this copy: stop, and remove what was written.
_DESTINATION_FULL = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS))


class CopyError(Exception):
    """The copy cannot run at all (bad source or destination). The message says which path and why."""


class CopyBusy(CopyError):
    """Another copy into the same destination holds the lock; try again later."""


class ChangedType(OSError):
    """A source entry listed as a regular file is something else by the time it is opened."""


def stamp(when: datetime) -> str:
    """The folder name of a copy taken at ``when``: ISO 8601 basic format in UTC, sortable as text."""
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


# --- long paths ------------------------------------------------------------------------------------------------


def _is_long(path: str) -> bool:
    return len(path) * 4 >= _LONG_PATH and len(os.fsencode(path)) >= _LONG_PATH


def _open_dir(path: str, nofollow: bool = False) -> int:
    """A descriptor of the directory ``path``, however long the path is (opened in steps when it is long)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | (os.O_NOFOLLOW if nofollow else 0)
    if not _is_long(path):
        return os.open(path, flags)
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for part in path.split("/"):
        length = len(os.fsencode(part)) + 1
        if current and size + length >= _LONG_PATH:
            pieces.append("/".join(current))
            current, size = [], 0
        current.append(part)
        size += length
    pieces.append("/".join(current))
    fd = os.open(pieces[0] or "/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n, piece in enumerate(pieces[1:], start=2):
            last = n == len(pieces)
            step = os.open(piece, flags if last else os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _at(path: str) -> Iterator[tuple[int | None, str]]:
    """(dir_fd, name) to hand to an ``os`` call for ``path``: (None, path) for a normal path, else a descriptor of
    its parent directory (closed afterwards) and its last component."""
    if not _is_long(path):
        yield None, path
        return
    parent, name = path.rsplit("/", 1)
    fd = _open_dir(parent)
    try:
        yield fd, name
    finally:
        os.close(fd)


def _open(path: str, flags: int, mode: int = 0o777) -> int:
    with _at(path) as (dir_fd, name):
        return os.open(name, flags, mode, dir_fd=dir_fd)


def _lstat(path: str) -> os.stat_result:
    with _at(path) as (dir_fd, name):
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def _mkdir(path: str, mode: int = 0o700) -> None:
    with _at(path) as (dir_fd, name):
        os.mkdir(name, mode, dir_fd=dir_fd)


def _readlink(path: str) -> str:
    with _at(path) as (dir_fd, name):
        return os.readlink(name, dir_fd=dir_fd)


def _set_attributes(path: str, mode: int, mtime_ns: int, uid: int, gid: int) -> None:
    """Owner (as root), mode and mtime of the directory ``path``."""
    with _at(path) as (dir_fd, name):
        if _CAN_CHOWN:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        os.chmod(name, mode, dir_fd=dir_fd)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


# --- manifest lines ----------------------------------------------------------------------------------------------

# Escaped in names and link targets: backslash, every C0 and C1 control character, DEL, the Unicode line and
# paragraph separators, and bytes that are not UTF-8 (held as lone surrogates by Python's surrogateescape).
# So a manifest is valid UTF-8, and one line is one entry for any tool that splits lines, Python's splitlines too.
_ESCAPE_CHARS = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)", re.DOTALL)
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r", "-": "-"}


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    known = _ESCAPES.get(ch)
    if known is not None:
        return known
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # a byte that is not UTF-8
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _escape(text: str) -> str:
    if text == "-":
        return "\\-"  # a symlink pointing at a file called "-" must not read as "no target"
    if not _ESCAPE_CHARS.search(text):
        return text  # the common case, kept cheap: one regex scan
    return _ESCAPE_CHARS.sub(_escape_char, text)


def _unescape_one(match: re.Match[str]) -> str:
    code = match.group(1)
    if len(code) == 1:
        try:
            return _UNESCAPES[code]
        except KeyError:
            raise ValueError(f"unknown escape \\{code}") from None
    value = int(code[1:], 16)
    if code[0] == "x" and value >= 0x80:
        return chr(0xDC00 + value)
    return chr(value)


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return _UNESCAPE.sub(_unescape_one, text)


# Entry kinds: regular file, symlink, directory, FIFO, socket, character and block device.
KINDS = frozenset("fldpscb")
_KIND_NAMES = {"f": "file", "l": "symlink", "d": "directory", "p": "FIFO", "s": "socket", "c": "device", "b": "device"}


def kind_of(mode: int) -> str | None:
    """The manifest kind of an lstat mode, or None for a type we do not know."""
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISFIFO(mode):
        return "p"
    if stat.S_ISSOCK(mode):
        return "s"
    if stat.S_ISCHR(mode):
        return "c"
    if stat.S_ISBLK(mode):
        return "b"
    return None


@dataclass(slots=True)
class Entry:
    """One line of a manifest. ``path`` is relative to the copy root, '/'-separated. ``kind`` is one of ``KINDS``.
    ``sha256`` is set for files only; ``target`` holds a symlink's target, or a device's number (``st_rdev``)."""

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
        """One manifest line: tab-separated, path last; see ``_escape`` for what is escaped in names."""
        target = "-" if self.target is None else _escape(self.target)
        return (
            f"{self.kind}\t{self.size}\t{self.mtime_ns}\t{self.mode:o}\t{self.uid}\t{self.gid}\t"
            f"{self.sha256 or '-'}\t{target}\t{_escape(self.path)}"
        )

    @classmethod
    def from_line(cls, line: str) -> Entry:
        kind, size, mtime, mode, uid, gid, sha, target, path = line.rstrip("\n").split("\t", 8)
        if kind not in KINDS:
            raise ValueError(f"unknown entry kind {kind!r}")
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

    def root(self) -> Entry | None:
        """The copied directory itself (mode, mtime, owner), recorded in the header since format 2."""
        raw = self.header.get("root")
        if not isinstance(raw, dict):
            return None
        return Entry("", "d", 0, int(raw["mtime_ns"]), int(raw["mode"]), int(raw["uid"]), int(raw["gid"]))

    def recorded_errors(self) -> list[str]:
        """Errors of the run that made this copy (entries it could not copy), as far as the header keeps them."""
        listed = [str(e) for e in self.header.get("errors", [])]
        count = int(self.header.get("stats", {}).get("errors", 0) or 0)
        if count > len(listed):
            listed.append(f"{count - len(listed)} more errors when the copy was made (see {LOG_NAME})")
        return listed


def parse_manifest(data: bytes, where: str) -> Manifest:
    """A manifest from its bytes. Lines are split on LF only: names may hold any other character (format 1 wrote
    form feeds, NEL and the like as they are). ValueError naming ``where`` and the line if it is not ours."""
    text = data.decode("utf-8", "surrogateescape")
    first, _, rest = text.partition("\n")
    try:
        header = json.loads(first or "{}")
    except ValueError as exc:
        raise ValueError(f"{where}: not a backup-scheduler manifest ({exc})") from None
    if not isinstance(header, dict) or header.get("format") not in FORMATS:
        raise ValueError(f"{where}: not a backup-scheduler manifest")
    entries = {}
    for number, line in enumerate(rest.split("\n"), start=2):
        if not line:
            continue
        try:
            entry = Entry.from_line(line)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{where}: line {number}: {exc}") from None
        entries[entry.path] = entry
    return Manifest(header, entries)


@dataclass
class CopyStats:
    """What one run did, compared with the previous complete copy."""

    files_copied: int = 0
    files_linked: int = 0
    files_deleted: int = 0
    symlinks: int = 0
    directories: int = 0
    specials: int = 0  # FIFOs, sockets and devices, recreated
    skipped: int = 0  # entries not copied on purpose (devices when not root)
    vanished: int = 0  # listed, then gone (or changed type) before they could be copied: like rsync's "vanished"
    damaged_previous: int = 0  # unchanged files whose copy in the previous copy no longer matched: copied afresh
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

    @classmethod
    def from_summary(cls, raw: dict[str, Any]) -> CopyStats:
        known = {f for f in cls.__dataclass_fields__ if f not in ("errors", "notes")}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class CopyResult:
    path: Path
    stamp: str
    previous: Path | None
    stats: CopyStats
    already_done: bool = False
    partial: bool = False  # the time budget ran out: the copy is checkpointed, run copy_tree again to go on


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
    """The manifest of a copy. ValueError if it is not ours, OSError if it cannot be read."""
    path = Path(copy_dir) / MANIFEST_NAME
    return parse_manifest(path.read_bytes(), str(path))


def _file_signature(st: os.stat_result) -> str:
    """The start of a manifest line for a regular file with stat ``st`` (kind, size, mtime, mode, owner).
    A previous line starting with it describes an unchanged file: comparing text avoids parsing 20,000 lines."""
    return f"f\t{st.st_size}\t{st.st_mtime_ns}\t{stat.S_IMODE(st.st_mode):o}\t{st.st_uid}\t{st.st_gid}\t"


def read_manifest_lines(copy_dir: Path) -> dict[str, str]:
    """A copy's manifest as path -> line (in this format), for the copier's unchanged-file check.
    ValueError if the manifest is not ours."""
    path = Path(copy_dir) / MANIFEST_NAME
    data = path.read_bytes()
    first, _, rest = data.partition(b"\n")
    header = json.loads(first or b"{}")
    if not isinstance(header, dict) or header.get("format") not in FORMATS:
        raise ValueError(f"{path}: not a backup-scheduler manifest")
    if header["format"] != FORMAT:
        return {p: e.to_line() for p, e in parse_manifest(data, str(path)).entries.items()}
    # The path is what follows a line's last tab (tabs in names are escaped). Every line has 8 tabs: counted over
    # the whole text at once (a truncated or merged line changes the count); a line is reused only when it starts
    # as a file's line for the same stat does, and then with the same fields after the path's.
    text = rest.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if text.count("\t") != 8 * len(lines):
        raise ValueError(f"{path}: a line is not a manifest entry")
    names = [line.rpartition("\t")[2] for line in lines]
    if "\\" in text:
        names = [_unescape(name) for name in names]
    return dict(zip(names, lines, strict=True))


def _is_our_copy(path: Path) -> bool:
    if not STAMP_PATTERN.match(path.name) or not path.is_dir() or path.is_symlink():
        return False
    try:
        with open(path / MANIFEST_NAME, "rb") as fh:
            return json.loads(fh.readline() or b"{}").get("format") in FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def complete_copies(dest_root: Path) -> list[Path]:
    """Our complete copies in ``dest_root``, oldest first. Anything else in the folder is ignored."""
    if not dest_root.is_dir():
        return []
    return sorted((p for p in dest_root.iterdir() if _is_our_copy(p)), key=lambda p: p.name)


def remove_tree(path: Path | str) -> None:
    """Delete a tree of any depth and path length, including read-only directories inside it (a faithful copy
    keeps a 0555 directory 0555). A symlink is removed, never followed."""
    top = str(path)
    try:
        st = _lstat(top)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with _at(top) as (dir_fd, name):
            os.unlink(name, dir_fd=dir_fd)
        return
    stack: list[tuple[str, bool]] = [(top, False)]
    while stack:
        current, emptied = stack.pop()
        with _at(current) as (dir_fd, name):
            if emptied:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(name, dir_fd=dir_fd)
                continue
            with contextlib.suppress(FileNotFoundError):
                mode = stat.S_IMODE(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
                if mode & stat.S_IRWXU != stat.S_IRWXU:
                    os.chmod(name, mode | stat.S_IRWXU, dir_fd=dir_fd)
        stack.append((current, True))
        try:
            fd = _open_dir(current, nofollow=True)
        except FileNotFoundError:
            continue
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((f"{current}/{entry.name}", False))
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
        finally:
            os.close(fd)


def remove_stale_work(dest_root: Path, resuming: str | None = None) -> list[Path]:
    """Delete ``.inprogress-*`` and ``.deleting-*`` folders (and checkpoints) left by a crashed run or retention,
    except the checkpointed copy ``resuming`` (a stamp) that this run goes on with. Call only while holding the
    DestinationLock."""
    removed = []
    live = {resuming} if resuming else set()
    for path in dest_root.glob(f"{CHECKPOINT_PREFIX}*.json"):
        # A checkpoint written lately belongs to a run still going, one budgeted part after another.
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime < LIVE_CHECKPOINT_SECONDS:
                live.add(path.name[len(CHECKPOINT_PREFIX) : -len(".json")])
    keep = {f"{INPROGRESS_PREFIX}{s}" for s in live} | {f"{CHECKPOINT_PREFIX}{s}.json" for s in live}
    for path in dest_root.iterdir():
        if path.name in keep or path.is_symlink():
            continue
        if path.name.startswith((INPROGRESS_PREFIX, DELETING_PREFIX)) and path.is_dir():
            remove_tree(path)
            removed.append(path)
        elif path.name.startswith(CHECKPOINT_PREFIX) and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def delete_copy(path: Path) -> None:
    """Delete one complete copy so that it stops looking complete first: rename it out of the stamp names and drop
    its manifest, then delete the rest. A crash part way leaves a ``.deleting-`` folder the next run removes."""
    doomed = path.with_name(f"{DELETING_PREFIX}{path.name}")
    os.rename(path, doomed)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(doomed / MANIFEST_NAME)
    remove_tree(doomed)


def prune_copies(dest_root: Path, keep: int | None, min_keep: int) -> list[Path]:
    """Delete our oldest complete copies beyond ``keep`` (never fewer than ``min_keep``, never the newest).
    ``keep=None`` keeps everything. Call only while holding the DestinationLock."""
    if keep is None:
        return []
    copies = complete_copies(dest_root)
    allowed = max(keep, min_keep, 1)
    doomed = copies[: max(0, len(copies) - allowed)]
    for path in doomed:
        delete_copy(path)
    return doomed


# --- walking and copying -----------------------------------------------------------------------------------------


def _walk_directories(source: Path, stats: CopyStats) -> Iterator[tuple[_Item | None, list[_Item]]]:
    """Depth-first walk without following symlinks, one directory at a time: (the directory, or None for the
    source root; its other entries). Unreadable directories are noted in ``stats`` instead of stopping the run."""
    stack: list[_Item | None] = [None]  # None stands for the source root itself
    while stack:
        current = stack.pop()
        children, subdirs = _read_directory(str(source), current.rel if current else "", stats)
        yield current, children
        stack.extend(reversed(subdirs))


def _vanished(stats: CopyStats, rel: str, what: str = "vanished before it could be copied") -> None:
    stats.vanished += 1
    stats.notes.append(f"{rel}: {what}")


def _read_directory(source: str, rel_dir: str, stats: CopyStats) -> tuple[list[_Item], list[_Item]]:
    """The entries other than directories, and the subdirectories, of ``rel_dir`` under ``source``; nothing (and
    an error or a note in ``stats``) when it cannot be opened."""
    try:
        dir_fd = _open_dir(f"{source}/{rel_dir}" if rel_dir else source, nofollow=bool(rel_dir))
    except FileNotFoundError:
        _vanished(stats, rel_dir or ".")
        return [], []
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _vanished(stats, rel_dir, "changed from a directory into something else before it could be copied")
        else:
            stats.errors.append(f"cannot list {rel_dir or '.'}: {exc.strerror}")
        return [], []
    try:
        return _list_directory(dir_fd, rel_dir, stats)
    finally:
        os.close(dir_fd)


_S_IFMT, _S_IFREG, _S_IFDIR = stat.S_IFMT(0o177777), stat.S_IFREG, stat.S_IFDIR


def _list_directory(dir_fd: int, rel_dir: str, stats: CopyStats) -> tuple[list[_Item], list[_Item]]:
    """The entries other than directories, and the subdirectories, of the open directory ``dir_fd``."""
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
            _vanished(stats, rel)
            continue
        except OSError as exc:
            stats.errors.append(f"cannot stat {rel}: {exc.strerror}")
            continue
        file_type = st.st_mode & _S_IFMT  # compared inline: this loop runs once per entry of the tree
        if file_type == _S_IFREG:
            children.append(_Item(rel, "f", st))
        elif file_type == _S_IFDIR:
            subdirs.append(_Item(rel, "d", st))
        else:
            kind = kind_of(st.st_mode)
            if kind is None:
                stats.skipped += 1
                stats.notes.append(f"{rel}: a file type this engine does not know; not copied")
            else:
                children.append(_Item(rel, kind, st))
    return children, subdirs


def _walk(source: Path, stats: CopyStats) -> Iterator[_Item]:
    """Every entry under ``source`` (not the root itself), as ``_walk_directories`` finds them."""
    for directory, children in _walk_directories(source, stats):
        if directory is not None:
            yield directory
        yield from children


_buffers = threading.local()
_ZEROS = bytes(CHUNK)


def _chunk_buffer() -> bytearray:
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(CHUNK)
    return buf


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    """Everything from ``fd`` up to end of file."""
    parts = []
    while part := os.read(fd, 1 << 20):
        parts.append(part)
    return b"".join(parts)


def _hash_zeros(digest: Any, count: int) -> None:
    zeros = memoryview(_ZEROS)
    while count > 0:
        step = min(count, CHUNK)
        digest.update(zeros[:step])
        count -= step


def _copy_sparse(fd_in: int, fd_out: int, digest: Any) -> int:
    """Copy a file that has holes, keeping them: only its data segments are read and written (holes are hashed
    as the zeros they read as). Returns the file's size."""
    end = os.fstat(fd_in).st_size
    buf = _chunk_buffer()
    whole = memoryview(buf)
    pos = 0
    while pos < end:
        try:
            data_at = os.lseek(fd_in, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data_at = end  # only a hole is left
        data_at = min(data_at, end)
        _hash_zeros(digest, data_at - pos)
        if data_at >= end:
            pos = end
            break
        hole_at = min(os.lseek(fd_in, data_at, os.SEEK_HOLE), end)
        os.lseek(fd_in, data_at, os.SEEK_SET)
        os.lseek(fd_out, data_at, os.SEEK_SET)
        pos = data_at
        while pos < hole_at:
            n = os.readv(fd_in, [whole[: min(CHUNK, hole_at - pos)]])
            if n == 0:
                end = pos  # the file shrank while we read it
                break
            digest.update(whole[:n])
            _write_all(fd_out, whole[:n])
            pos += n
    os.ftruncate(fd_out, pos)
    return pos


def copy_data(fd_in: int, fd_out: int, size_hint: int, sparse: bool = False) -> tuple[str, int]:
    """Copy everything from ``fd_in`` to ``fd_out``, hashing as it passes. Returns (sha256 hex, bytes)."""
    digest = hashlib.sha256()
    if sparse:
        size = _copy_sparse(fd_in, fd_out, digest)
        return digest.hexdigest(), size
    copied = 0
    if size_hint < SMALL_FILE:
        # Small files: one read of the whole file, then one more to see end of file (it may have grown).
        want = size_hint + 1
        while data := os.read(fd_in, want):
            digest.update(data)
            _write_all(fd_out, data)
            copied += len(data)
            want = CHUNK
    else:
        buf = _chunk_buffer()
        whole = memoryview(buf)
        while n := os.readv(fd_in, [buf]):
            chunk = whole[:n]
            digest.update(chunk)
            _write_all(fd_out, chunk)
            copied += n
    return digest.hexdigest(), copied


def _has_holes(st: os.stat_result) -> bool:
    return st.st_size > SMALL_FILE and st.st_blocks * 512 < st.st_size


def open_source_file(path: str) -> tuple[int, os.stat_result]:
    """Open a file listed as regular for reading, without blocking or following a symlink: a FIFO or device that
    took its place raises ChangedType instead of waiting forever for a writer."""
    fd = _open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ChangedType(errno.EINVAL, f"now a {_KIND_NAMES.get(kind_of(st.st_mode) or '', 'special file')}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def copy_file(src: str, dst: str, st: os.stat_result) -> tuple[str, int]:
    """Copy one regular file, hashing the bytes as they pass; set mode, owner (as root) and times from ``st``
    (the walk's stat). Holes in sparse files stay holes. Returns (sha256 hex, bytes copied). ``dst`` must not
    exist. ChangedType if ``src`` is no longer a regular file."""
    try:
        fd_in, now = open_source_file(src)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ChangedType(errno.ELOOP, "now a symlink") from None
        raise
    try:
        fd_out = _open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            result = copy_data(fd_in, fd_out, st.st_size, sparse=_has_holes(now))
            if _CAN_CHOWN:
                os.fchown(fd_out, st.st_uid, st.st_gid)
            os.fchmod(fd_out, stat.S_IMODE(st.st_mode))
            os.utime(fd_out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return result


def _set_dir_attributes(path: str, st: os.stat_result) -> None:
    with _at(path) as (dir_fd, name):
        if _CAN_CHOWN:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd)
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd)


def _make_special(name: str, dir_fd: int | None, kind: str, mode: int, rdev: int) -> None:
    """Create a FIFO, socket or device node ``name`` (private until its attributes are set)."""
    if kind == "p":
        os.mkfifo(name, 0o600, dir_fd=dir_fd)
    elif kind == "s":
        os.mknod(name, stat.S_IFSOCK | 0o600, dir_fd=dir_fd)
    else:
        os.mknod(name, (stat.S_IFCHR if kind == "c" else stat.S_IFBLK) | 0o600, rdev, dir_fd=dir_fd)


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
        syncfs = _find_syncfs()
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


_syncfs_function: list[Callable[[int], int] | None] = []


def _find_syncfs() -> Callable[[int], int] | None:
    if not _syncfs_function:  # looked up on first use: a copy with sync off never pays for it (nor imports ctypes)
        import ctypes

        try:
            _syncfs_function.append(ctypes.CDLL(None, use_errno=True).syncfs)
        except (OSError, AttributeError):
            _syncfs_function.append(None)
    return _syncfs_function[0]


@dataclass
class _Result:
    """What happened to one file copied in the pool: copied (``entry`` set), vanished, or failed."""

    item: _Item
    entry: Entry | None = None
    error: str | None = None
    vanished: str | None = None


# A hard link to the previous copy failed for one of these reasons: that copy is damaged, the file system's
# link limit is reached, or it cannot link at all. A fresh copy of the file is the safe answer.
_COPY_INSTEAD_OF_LINK = frozenset((errno.ENOENT, errno.EMLINK, errno.EXDEV, errno.EPERM))


class DestinationFull(OSError):
    """The destination cannot take more (no space, quota, read-only): the copy stops."""


@dataclass(slots=True)
class _Unit:
    """A share of the work of a copy made by several processes: a subtree not listed yet (``tree``), or a slice
    of the entries (``files``) of the listed directory ``rel_dir``."""

    tree: _Item | None = None
    rel_dir: str = ""
    files: list[_Item] | None = None
    weight: int = 0  # entries, as far as known


# A copy in several processes: the first lists the top of the tree until this many subtrees per process wait
# (or it listed _EXPAND_LIMIT directories); files listed by then are shared in slices of _SLICE or more, at most
# _MAX_SLICES slices. A tree found to be smaller than _MIN_SHARED_ENTRIES is copied by the first process alone.
_TREES_PER_PROCESS = 8
_EXPAND_LIMIT = 64
_SLICE = 256
_MAX_SLICES = 2048
_TREE_WEIGHT = 1000  # a subtree not listed yet counts as this many entries
_MIN_SHARED_ENTRIES = 2000
_COUNTS = (
    "files_copied",
    "files_linked",
    "symlinks",
    "specials",
    "skipped",
    "vanished",
    "damaged_previous",
    "bytes_copied",
    "bytes_linked",
)


class _Copier:
    """One run: walk SOURCE, link or copy each entry into the in-progress folder, collect manifest lines.

    Each directory is one task: create it, list it, hard-link its unchanged files, hand its changed and new files
    to the copy pool, and return its subdirectories as new tasks. A directory is filled right after it is
    created. With one walker the calling thread does the tasks itself; with more, walking threads share them
    (their system calls overlap, which pays when each one waits on a network file system).
    """

    def __init__(
        self,
        source: Path,
        work: Path,
        previous: Path | None,
        threads: int,
        on_progress: ProgressCallback | None,
        progress_every: float,
        walkers: int = WALKERS,
        deadline: float | None = None,
        processes: int = 1,
    ):
        self.source = str(source)
        self.processes = max(1, processes)
        self.deadline = deadline  # time.monotonic(): no new directory is started after it
        self.postponed: list[_Item | None] = []  # directories not visited when the deadline came
        self.walkers = max(1, walkers)
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
        self._signature_tails: dict[tuple[int, int, int], str] = {}
        self.full: OSError | None = None  # set when the destination cannot take more; everything then stops
        # Several processes (see _run_in_processes): each worker publishes its counters in a shared slot.
        self._slots: mmap.mmap | None = None
        self._slot: int | None = None  # this process's slot, in a worker process
        self._live_slots: list[int] = []  # in the first process: the slots of workers still running
        self._worker_directories = 0  # directories the worker processes created

    def run(self, allow_empty: bool) -> None:
        if self.processes > 1 and self.deadline is None and self.walkers == 1:
            self._run_in_processes(allow_empty)
        else:
            self._run_here(allow_empty)
        if self.postponed:
            return  # a checkpoint, not the end: directories keep their private modes until the last part
        for item in reversed(self._directories):  # children before parents, so a directory's time sticks
            self._guard(item.rel, _set_dir_attributes, f"{self.work}/{item.rel}", item.st)
        self.stats.directories = len(self._directories) + self._worker_directories
        gone = self.previous_lines.keys() - self.lines.keys()
        self.stats.files_deleted = sum(1 for path in gone if self.previous_lines[path][0] != "d")
        self._report(force=True)

    def _check_not_empty(self, allow_empty: bool) -> None:
        if (
            not self.postponed
            and not self._seen_any
            and not allow_empty
            and any(line[0] != "d" for line in self.previous_lines.values())
        ):
            raise CopyError(
                f"{self.source} is empty but the previous copy {self.previous} has files; is the share mounted?"
                " (set options.allow_empty to copy an empty source)"
            )

    def _raise_if_full(self) -> None:
        if self.full is not None:
            self._stop_copies()
            raise DestinationFull(self.full.errno, self.full.strerror, self.full.filename)

    def _run_here(self, allow_empty: bool) -> None:
        """The whole walk in this process: one walker (this thread) or walking threads, and the copy pool."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="dircopy") as pool:
            self._copy_pool = pool
            try:
                if self.walkers == 1:
                    stack = self._start_stack()
                    visited = 0
                    while stack:
                        if visited and self._out_of_time():  # at least one directory per part: it always moves on
                            self.postponed = stack
                            break
                        stack.extend(self._visit(stack.pop()))
                        visited += 1
                else:
                    self._walk_in_threads()
            except BaseException:
                self._stop_copies()
                raise
            self._raise_if_full()
            self._check_not_empty(allow_empty)
            self._report(force=True)  # the walk is over: totals are known from here on
            try:
                for future in self._copies:
                    self._collect(future.result())
                    self._raise_if_full()
            except BaseException:
                self._stop_copies()
                raise

    # --- several processes ---------------------------------------------------------------------------------------

    def _run_in_processes(self, allow_empty: bool) -> None:
        """The walk shared by ``processes`` processes (this one and forked workers), as rsync's sender and
        receiver share theirs: a local copy is bound by system calls, one thread of Python makes them one at a
        time, and the interpreter lock keeps threads from overlapping them.

        This process first creates and lists the top of the tree breadth-first, until there are enough subtrees
        to share out; the subtrees and slices of the files found so far become units of work. Each process takes
        the next unit from a pipe holding all their numbers (a 4-byte read is atomic), walks it with its own copy
        pool, sets the attributes of the directories it created, and sends its manifest lines and counts back
        through a pipe of its own; this process merges them and finishes the directories of the top."""
        units = self._expand()
        self._raise_if_full()
        self._check_not_empty(allow_empty)
        workers = min(self.processes, len(units))
        if workers < 2 or sum(unit.weight for unit in units) < _MIN_SHARED_ENTRIES:
            self._work_on(units, iter(range(len(units))).__next__)
            return
        order_r, order_w = os.pipe()
        try:
            os.write(order_w, struct.pack(f"{len(units)}I", *range(len(units))))
        finally:
            os.close(order_w)

        def take() -> int:
            data = os.read(order_r, 4)
            if not data:
                raise StopIteration
            number: int = struct.unpack("I", data)[0]
            return number

        self._slots = mmap.mmap(-1, 32 * workers)
        children: list[tuple[int, int, int]] = []  # (pid, result pipe, slot)
        try:
            for slot in range(1, workers):
                result_r, result_w = os.pipe()
                pid = os.fork()
                if pid == 0:  # the worker: never returns
                    os.close(result_r)
                    self._worker(slot, units, take, result_w)
                os.close(result_w)
                children.append((pid, result_r, slot))
                self._live_slots.append(slot)
            self._work_on(units, take)
            while children:
                pid, result_r, slot = children[0]
                data = _read_all(result_r)
                os.close(result_r)
                _, status = os.waitpid(pid, 0)
                children.pop(0)
                self._live_slots.remove(slot)
                self._merge(data, status)
        finally:
            os.close(order_r)
            for pid, result_r, _slot in children:  # only after an error here: stop the others
                import signal

                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.waitpid(pid, 0)
                os.close(result_r)
        self._raise_if_full()
        self._report(force=True)

    def _expand(self) -> list[_Unit]:
        """Create and list directories breadth-first from the top until enough subtrees wait to be walked
        (or ``_EXPAND_LIMIT`` directories were listed, or the tree is done); the units of work left: each subtree
        not listed yet, and the files (and other non-directories) listed so far in slices."""
        frontier: collections.deque[_Item | None] = collections.deque(self._start_stack())
        listed: list[tuple[str, list[_Item]]] = []
        while frontier and len(frontier) < _TREES_PER_PROCESS * self.processes and len(listed) < _EXPAND_LIMIT:
            opened = self._open_directory(frontier.popleft())
            if opened is not None:
                rel_dir, children, subdirs = opened
                listed.append((rel_dir, children))
                frontier.extend(subdirs)
        units = [_Unit(tree=directory, weight=_TREE_WEIGHT) for directory in frontier if directory is not None]
        entries = sum(len(children) for _, children in listed)
        size = max(_SLICE, -(-entries // _MAX_SLICES))
        for rel_dir, children in listed:
            for start in range(0, len(children), size):
                part = children[start : start + size]
                units.append(_Unit(rel_dir=rel_dir, files=part, weight=len(part)))
        return units

    def _work_on(self, units: list[_Unit], take: Callable[[], int]) -> None:
        """Take units until none is left (``take`` raises StopIteration). Files are copied by a pool of this
        process's share of ``threads``, or by this thread itself when that share is one."""
        self._copies = []
        if self._threads_each() == 1:
            self._copy_pool = None
            self._take_units(units, take)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self._threads_each(), thread_name_prefix="dircopy") as pool:
            self._copy_pool = pool
            try:
                self._take_units(units, take)
                for future in self._copies:
                    if self.full is not None:
                        break
                    self._collect(future.result())
            except BaseException:
                self._stop_copies()
                raise
            if self.full is not None:
                self._stop_copies()

    def _take_units(self, units: list[_Unit], take: Callable[[], int]) -> None:
        while self.full is None:
            try:
                unit = units[take()]
            except StopIteration:
                break
            if unit.files is not None:
                self._place(unit.rel_dir, unit.files)
            else:
                stack = [unit.tree]
                while stack:
                    stack.extend(self._visit(stack.pop()))
            self._report()

    def _threads_each(self) -> int:
        return max(1, -(-self.threads // self.processes))

    def _worker(self, slot: int, units: list[_Unit], take: Callable[[], int], result_w: int) -> NoReturn:
        """A forked worker process: its share of the units, then its results on ``result_w``; never returns."""
        code = 1
        try:
            self._slot = slot
            self.on_progress = None
            self.lines = {}
            self.stats = CopyStats()
            self._files_done = self._files_total = self._bytes_done = self._bytes_total = 0
            top = len(self._directories)  # the top of the tree: the first process finishes those
            self._work_on(units, take)
            mine = self._directories[top:]
            if self.full is None:
                for item in reversed(mine):  # each subtree is this process's alone: its directories are done
                    self._guard(item.rel, _set_dir_attributes, f"{self.work}/{item.rel}", item.st)
            stats = self.stats
            previous = self.previous_lines
            # A linked file's line is the previous copy's, which the first process holds too: send its path only.
            reused = [path for path, line in self.lines.items() if previous.get(path) is line]
            result = {
                "reused": reused,
                "lines": {path: line for path, line in self.lines.items() if previous.get(path) is not line},
                "counts": {name: getattr(stats, name) for name in _COUNTS},
                "errors": stats.errors,
                "notes": stats.notes,
                "directories": len(mine),
                "seen": self._seen_any,
                "progress": (self._files_done, self._files_total, self._bytes_done, self._bytes_total),
                "full": None if self.full is None else (self.full.errno, self.full.strerror, self.full.filename),
            }
            _write_all(result_w, marshal.dumps(result))
            code = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                import traceback

                _write_all(result_w, marshal.dumps({"failed": traceback.format_exc()}))
        finally:
            os._exit(code)

    def _merge(self, data: bytes, status: int) -> None:
        """Add a worker's results (``data``, all it wrote; ``status`` from waitpid) to this process's."""
        try:
            result = marshal.loads(data)
        except (EOFError, ValueError, TypeError):
            result = {"failed": f"it ended without its results (wait status {status})"}
        if "failed" in result:
            last = str(result["failed"]).strip().splitlines()[-1:]
            raise CopyError(f"copy of {self.source}: a copying process failed: {' '.join(last)}")
        self.lines.update(result["lines"])
        previous, lines = self.previous_lines, self.lines
        for path in result["reused"]:
            lines[path] = previous[path]
        stats = self.stats
        for name, value in result["counts"].items():
            setattr(stats, name, getattr(stats, name) + value)
        stats.errors.extend(result["errors"])
        stats.notes.extend(result["notes"])
        self._worker_directories += result["directories"]
        self._seen_any = self._seen_any or result["seen"]
        files_done, files_total, bytes_done, bytes_total = result["progress"]
        self._files_done += files_done
        self._files_total += files_total
        self._bytes_done += bytes_done
        self._bytes_total += bytes_total
        if result["full"] is not None and self.full is None:
            self.full = OSError(*result["full"])

    def _walk_in_threads(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.walkers, thread_name_prefix="dircopy-walk") as walkers:
            # Finished walking tasks come back through a queue (one get each; waiting on the set of pending
            # futures would re-register on all of them every time, which costs more than the walk itself).
            import queue

            finished: queue.SimpleQueue[Future[list[_Item]]] = queue.SimpleQueue()

            def walk(directory: _Item | None) -> None:
                walkers.submit(self._visit, directory).add_done_callback(finished.put)

            outstanding = 0
            for directory in self._start_stack():
                walk(directory)
                outstanding += 1
            while outstanding:
                subdirs = finished.get().result()
                outstanding -= 1
                for sub in subdirs:
                    if self._out_of_time():
                        self.postponed.append(sub)
                        continue
                    walk(sub)
                    outstanding += 1

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _start_stack(self) -> list[_Item | None]:
        """Where the walk begins: the source root, or the directories a checkpoint left to do."""
        stack, self.postponed = (self.postponed or [None]), []
        return stack

    def resume(self, checkpoint: dict[str, Any]) -> None:
        """Carry on from ``checkpoint`` (written by ``checkpoint()`` after an earlier budget ran out): what was done
        stays done, the postponed directories are walked now. A postponed directory gone from the source since is
        simply not there any more."""
        self.lines = dict(checkpoint["lines"])
        self.stats = CopyStats.from_summary(checkpoint["stats"])
        self.stats.errors = list(checkpoint["errors"])
        self.stats.notes = list(checkpoint["notes"])
        self._seen_any = bool(self.lines)
        for rel in checkpoint["done_dirs"]:
            with contextlib.suppress(OSError):
                self._directories.append(_Item(rel, "d", _lstat(f"{self.source}/{rel}")))
        self.postponed = []
        for rel in checkpoint["postponed"]:
            if rel is None:
                self.postponed.append(None)
                continue
            try:
                self.postponed.append(_Item(rel, "d", _lstat(f"{self.source}/{rel}")))
            except OSError:
                _vanished(self.stats, rel, "vanished before this part of the copy could start")

    def checkpoint(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "stats": self.stats.summary(),
            "errors": self.stats.errors,
            "notes": self.stats.notes,
            "done_dirs": [item.rel for item in self._directories],
            "postponed": [item.rel if item is not None else None for item in self.postponed],
        }

    def _stop_copies(self) -> None:
        for future in self._copies:
            future.cancel()

    def _failed(self, rel: str, exc: OSError, what: str = "") -> None:
        """A per-entry error, unless the destination is full: then the whole copy stops."""
        if exc.errno in _DESTINATION_FULL:
            if self.full is None:
                self.full = exc
            return
        with self._lock:
            self.stats.errors.append(f"{rel}: {exc.strerror or exc}{what}")

    def _visit(self, directory: _Item | None) -> list[_Item]:
        """One walking task: the directory (None: the source root) created, listed, its unchanged files linked and
        the others sent to the copy pool or created here. Returns its subdirectories. An unreadable directory is
        noted in the stats and left empty; one that cannot be created is left out with its contents."""
        opened = self._open_directory(directory)
        if opened is None:
            return []
        rel_dir, children, subdirs = opened
        self._place(rel_dir, children)
        return subdirs

    def _open_directory(self, directory: _Item | None) -> tuple[str, list[_Item], list[_Item]] | None:
        """Create the directory (None: the source root, already there) and list its source: (its path, its
        entries other than directories, its subdirectories); None if it cannot be created or the copy stops."""
        if self.full is not None:
            return None
        rel_dir = directory.rel if directory else ""
        if directory is not None:
            try:
                _mkdir(f"{self.work}/{rel_dir}")  # opened up to the source's mode once filled
            except OSError as exc:
                self._failed(rel_dir, exc, " (cannot create the directory: it and its contents are not in this copy)")
                return None
            self._directories.append(directory)
            self.lines[rel_dir] = _entry(directory).to_line()
            self._seen_any = True
        found = CopyStats()  # this thread's own, merged under the lock
        children, subdirs = _read_directory(self.source, rel_dir, found)
        if found.errors or found.skipped or found.vanished or found.notes:
            with self._lock:
                self.stats.errors.extend(found.errors)
                self.stats.skipped += found.skipped
                self.stats.vanished += found.vanished
                self.stats.notes.extend(found.notes)
        if children or subdirs:
            self._seen_any = True
        return rel_dir, children, subdirs

    def _place(self, rel_dir: str, children: list[_Item]) -> None:
        """Link the unchanged files among ``children`` (entries of ``rel_dir``, which exists in the copy), send
        the other files to the copy pool (or copy them here, without one) and create the symlinks and special
        files."""
        pool = self._copy_pool
        others = []
        for item in self._link_unchanged(rel_dir, children):
            if item.kind == "f":
                if pool is None:
                    self._collect(self._copy_one(item))
                else:
                    self._copies.append(pool.submit(self._copy_one, item))
            else:
                others.append(item)
        if others:
            self._make_others(rel_dir, others)

    def _make_others(self, rel_dir: str, items: list[_Item]) -> None:
        """Symlinks, FIFOs, sockets and devices of one directory, made through descriptors of both sides."""
        sub = f"/{rel_dir}" if rel_dir else ""
        try:
            src_fd = _open_dir(f"{self.source}{sub}")
        except OSError as exc:
            for item in items:
                self._failed(item.rel, exc)
            return
        try:
            dst_fd = _open_dir(f"{self.work}{sub}")
        except OSError as exc:
            os.close(src_fd)
            for item in items:
                self._failed(item.rel, exc)
            return
        name_at = len(rel_dir) + 1 if rel_dir else 0
        try:
            for item in items:
                name = item.rel[name_at:]
                st = item.st
                try:
                    target = None
                    if item.kind == "l":
                        target = os.readlink(name, dir_fd=src_fd)
                        os.symlink(target, name, dir_fd=dst_fd)
                    elif item.kind in "cb" and not _CAN_CHOWN:
                        with self._lock:
                            self.stats.skipped += 1
                            self.stats.notes.append(f"{item.rel}: a device; only root can copy devices")
                        continue
                    else:
                        _make_special(name, dst_fd, item.kind, st.st_mode, st.st_rdev)
                        if item.kind in "cb":
                            target = str(st.st_rdev)
                    if _CAN_CHOWN:
                        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
                    if item.kind != "l":
                        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst_fd)
                    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)
                except FileNotFoundError:
                    with self._lock:
                        _vanished(self.stats, item.rel)
                    continue
                except OSError as exc:
                    self._failed(item.rel, exc)
                    continue
                self.lines[item.rel] = _entry(item, target=target).to_line()
                with self._lock:
                    if item.kind == "l":
                        self.stats.symlinks += 1
                    else:
                        self.stats.specials += 1
        finally:
            os.close(dst_fd)
            os.close(src_fd)

    def _link_unchanged(self, rel_dir: str, children: list[_Item]) -> list[_Item]:
        """Hard-link the files of one directory that are unchanged since the previous copy: same size, mtime,
        mode and owner as its manifest says, and the previous copy's file still as its manifest says (size,
        mtime, mode, owner): a file appended to or chmod'ed inside that copy is copied afresh instead of
        spreading into this one. Their previous manifest lines, checksum included, hold for the new copy as they
        are. Links are made between two directory descriptors, so each call resolves a name rather than a whole
        path. Returns what is left to copy or create."""
        previous = self.previous_lines
        left: list[_Item] = []
        files = size = 0
        linked = linked_bytes = 0
        damaged: list[str] = []
        tails = self._signature_tails
        lines = self.lines
        from_fd = to_fd = -1  # opened at the first unchanged file; -2: the previous copy lacks the directory
        name_at = len(rel_dir) + 1 if rel_dir else 0
        lstat, link = os.lstat, os.link
        try:
            for item in children:
                if item.kind != "f":
                    left.append(item)
                    continue
                st = item.st
                files += 1
                size += st.st_size
                rel = item.rel
                before = previous.get(rel)
                if before is None:
                    left.append(item)
                    continue
                # _file_signature(st), with the mode and owner part formatted once per (mode, owner)
                key = (st.st_mode, st.st_uid, st.st_gid)
                tail = tails.get(key)
                if tail is None:
                    tail = tails[key] = _file_signature(st).split("\t", 3)[3]
                if not before.startswith(f"f\t{st.st_size}\t{st.st_mtime_ns}\t{tail}") or from_fd == -2:
                    left.append(item)
                    continue
                if from_fd == -1:
                    sub = f"/{rel_dir}" if rel_dir else ""
                    try:
                        from_fd = _open_dir(f"{self.previous}{sub}")
                    except OSError:
                        from_fd = -2  # the previous copy is damaged: copy them afresh
                        left.append(item)
                        continue
                    to_fd = _open_dir(f"{self.work}{sub}")
                name = rel[name_at:]
                try:
                    held = lstat(name, dir_fd=from_fd)
                except OSError:
                    left.append(item)
                    continue
                if (
                    held.st_size != st.st_size
                    or held.st_mtime_ns != st.st_mtime_ns
                    or held.st_mode != st.st_mode
                    or (_CAN_CHOWN and (held.st_uid != st.st_uid or held.st_gid != st.st_gid))
                ):
                    damaged.append(rel)
                    left.append(item)
                    continue
                try:
                    link(name, name, src_dir_fd=from_fd, dst_dir_fd=to_fd, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno in _COPY_INSTEAD_OF_LINK:
                        left.append(item)
                    else:
                        self._failed(rel, exc)
                        with self._lock:
                            self._files_done += 1
                            self._bytes_done += st.st_size
                    continue
                lines[rel] = before
                linked += 1
                linked_bytes += st.st_size
        finally:
            if to_fd >= 0:
                os.close(to_fd)
            if from_fd >= 0:
                os.close(from_fd)
        with self._lock:
            self._files_total += files
            self._bytes_total += size
            self.stats.files_linked += linked
            self.stats.bytes_linked += linked_bytes
            self._files_done += linked
            self._bytes_done += linked_bytes
            if damaged:
                self.stats.damaged_previous += len(damaged)
                self.stats.notes.extend(
                    f"{rel}: changed inside the previous copy since it was made; copied afresh" for rel in damaged
                )
        return left

    def _guard(self, rel: str, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return func(*args)
        except OSError as exc:
            self._failed(rel, exc)
            return None

    def _copy_one(self, item: _Item) -> _Result:
        """Copy and hash one file (runs in the pool)."""
        if self.full is not None:
            return _Result(item)
        try:
            sha256, size = copy_file(f"{self.source}/{item.rel}", f"{self.work}/{item.rel}", item.st)
            return _Result(item, entry=_entry(item, sha256=sha256, size=size))
        except FileNotFoundError:
            return _Result(item, vanished="vanished before it could be copied")
        except ChangedType as exc:
            return _Result(item, vanished=f"was a file when listed, {exc.strerror} when copied; not in this copy")
        except OSError as exc:
            if exc.errno in _DESTINATION_FULL:
                self._failed(item.rel, exc)
                return _Result(item)
            return _Result(item, error=f"{item.rel}: {exc.strerror or exc}")

    def _collect(self, result: _Result) -> None:
        if result.error is not None:
            self.stats.errors.append(result.error)
        if result.vanished is not None:
            _vanished(self.stats, result.item.rel, result.vanished)
        if result.entry is not None:
            self.lines[result.item.rel] = result.entry.to_line()
            self.stats.files_copied += 1
            self.stats.bytes_copied += result.entry.size
        self._files_done += 1
        self._bytes_done += result.item.st.st_size
        if self.on_progress is not None:
            self._report()

    def _report(self, force: bool = False) -> None:
        if self._slot is not None:  # a worker process: the first one reports, with these counters added
            assert self._slots is not None
            counters = (self._files_done, self._files_total, self._bytes_done, self._bytes_total)
            struct.pack_into("4q", self._slots, 32 * self._slot, *counters)
            return
        if self.on_progress is None:
            return
        now = time.monotonic()
        if force or now - self._last_report >= self.progress_every:
            self._last_report = now
            files_done, files_total = self._files_done, self._files_total
            bytes_done, bytes_total = self._bytes_done, self._bytes_total
            for slot in self._live_slots:
                assert self._slots is not None
                more = struct.unpack_from("4q", self._slots, 32 * slot)
                files_done += more[0]
                files_total += more[1]
                bytes_done += more[2]
                bytes_total += more[3]
            self.on_progress(Progress(files_done, files_total, bytes_done, bytes_total))


def _write_manifest(path: Path, header: dict[str, Any], lines: dict[str, str]) -> None:
    """Header, then one line per entry sorted by path (so two manifests can be compared with diff)."""
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
        fh.write(json.dumps(header, sort_keys=True) + "\n")
        ordered = sorted(lines)
        for start in range(0, len(ordered), _MANIFEST_PIECE):  # in pieces: the same memory serves each one
            fh.write("\n".join([lines[path] for path in ordered[start : start + _MANIFEST_PIECE]]) + "\n")


_MANIFEST_PIECE = 4096


def log_lines(stats: CopyStats) -> list[str]:
    """The body of a copy's log: what the run did, every error and every note."""
    return [
        f"copied:    {stats.files_copied} files, {stats.bytes_copied} bytes",
        f"linked:    {stats.files_linked} files, {stats.bytes_linked} bytes (unchanged, reused from the previous copy)",
        f"deleted:   {stats.files_deleted} files (in the previous copy, gone from the source)",
        f"symlinks:  {stats.symlinks}",
        f"specials:  {stats.specials} FIFOs, sockets and devices",
        f"dirs:      {stats.directories}",
        f"skipped:   {stats.skipped} entries not copied on purpose",
        f"vanished:  {stats.vanished} entries gone or changed type before they could be copied",
        f"errors:    {len(stats.errors)}",
        *[f"  error: {_escape(e)}" for e in stats.errors],
        *[f"note:      {_escape(n)}" for n in stats.notes],
    ]


def _write_log(path: Path, header: dict[str, Any], stats: CopyStats) -> None:
    lines = [
        f"backup-scheduler directory copy {header['stamp']}",
        f"source:    {_escape(header['source'])}",
        f"previous:  {header['previous'] or '(none: full copy)'}",
        f"started:   {header['started']}",
        f"finished:  {header['finished']}",
        f"duration:  {stats.duration_seconds:.2f} s",
        *log_lines(stats),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def root_attributes(st: os.stat_result) -> dict[str, int]:
    return {"mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns, "uid": st.st_uid, "gid": st.st_gid}


def _free_stamp(dest_root: Path, when: datetime, clock: Callable[[], datetime]) -> datetime:
    """The time of an ad-hoc copy: ``when``, or the next second whose name is free in ``dest_root`` (waiting for
    it, so a name never lies ahead of the clock). Two ad-hoc runs in one second then make two copies."""
    while any(
        os.path.lexists(dest_root / f"{prefix}{stamp(when)}") for prefix in ("", INPROGRESS_PREFIX, DELETING_PREFIX)
    ):
        when = when.replace(microsecond=0) + timedelta(seconds=1)
        wait = (when - clock()).total_seconds()
        if wait > 0:
            time.sleep(min(wait, 1.0))
    return when


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
    ad_hoc: bool = False,
    link_dest: Path | None = None,
    walkers: int = WALKERS,
    deadline: float | None = None,
    processes: int = 1,
) -> CopyResult:
    """Copy ``source`` into ``dest_root/<stamp(when)>``, linking unchanged files to the newest complete copy
    (or to ``link_dest``).

    Idempotent for the same ``when``: if that copy is already complete it is returned untouched
    (``already_done``). With ``ad_hoc`` (a copy asked for by hand) a taken name is never reused: the copy is
    named after the next free second instead. Raises CopyError for a bad source/destination, or when the
    destination fills up (the unfinished copy is removed), CopyBusy when another run holds the lock.
    Per-file problems do not stop the copy: they are listed in ``stats.errors`` and in the log.

    With a ``deadline`` (time.monotonic()), no new directory is started after it: the copy so far is kept in
    ``.inprogress-<stamp>`` with a checkpoint beside it, and ``partial`` is returned; calling again with the same
    ``when`` goes on from there (a task budget below a request deadline, then a follow-up task).

    With ``processes`` above 1 (and no deadline), the walk is shared by that many processes: this one and
    workers forked from it (see ``_Copier._run_in_processes``). Fork only from a process whose other threads
    hold no locks the workers need: the CLI, not a threaded server.
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
    clock = clock or (lambda: datetime.now(UTC))
    with DestinationLock(dest_root):
        checkpoint_path = dest_root / f"{CHECKPOINT_PREFIX}{stamp(when)}.json"
        checkpoint = _read_checkpoint(checkpoint_path) if not ad_hoc else None
        if checkpoint is not None and not (dest_root / f"{INPROGRESS_PREFIX}{stamp(when)}").is_dir():
            checkpoint = None  # its copy is gone: start afresh
        remove_stale_work(dest_root, resuming=stamp(when) if checkpoint else None)
        if ad_hoc:
            when = _free_stamp(dest_root, when, clock)
        name = stamp(when)
        final = dest_root / name
        if _is_our_copy(final):
            header = read_manifest(final).header
            stats = CopyStats.from_summary(header.get("stats", {}))
            return CopyResult(final, name, None, stats, already_done=True)
        if os.path.lexists(final):
            raise CopyError(f"{final} exists but is not a complete copy made by this service; move it away")
        if link_dest is not None:
            previous: Path | None = Path(link_dest)
        elif checkpoint is not None and checkpoint["previous"] is not None:
            previous = dest_root / checkpoint["previous"]  # the copy the first part linked against
        else:
            copies = complete_copies(dest_root)
            previous = copies[-1] if copies else None
        work = dest_root / f"{INPROGRESS_PREFIX}{name}"
        if checkpoint is None:
            try:
                os.mkdir(work, 0o700)
            except OSError as exc:
                raise CopyError(f"cannot write into {dest_root}: {exc.strerror}") from exc
        try:
            started = datetime.fromisoformat(checkpoint["started"]) if checkpoint else clock()
            t0 = time.monotonic() - (checkpoint["seconds"] if checkpoint else 0.0)
            root_st = source.stat()
            copier = _Copier(source, work, previous, threads, on_progress, progress_every, walkers, deadline, processes)
            if checkpoint is not None:
                copier.resume(checkpoint)
            copier.run(allow_empty)
            stats = copier.stats
            stats.duration_seconds = round(time.monotonic() - t0, 3)
            if copier.postponed:
                saved = {
                    **copier.checkpoint(),
                    "previous": previous.name if previous else None,
                    "started": started.isoformat(),
                    "seconds": stats.duration_seconds,
                }
                _write_private_json(checkpoint_path, saved)
                return CopyResult(work, name, previous, stats, partial=True)
            header = {
                "format": FORMAT,
                "stamp": name,
                "source": str(source),
                "previous": previous.name if previous else None,
                "started": started.isoformat(),
                "finished": clock().isoformat(),
                "stats": stats.summary(),
                "root": root_attributes(root_st),
                "errors": stats.errors[:MAX_HEADER_ERRORS],
            }
            _write_manifest(work / MANIFEST_NAME, header, copier.lines)
            _write_log(work / LOG_NAME, header, stats)
            _set_dir_attributes(str(work), root_st)
            if sync:
                _syncfs(work)
            os.rename(work, final)
            with contextlib.suppress(FileNotFoundError):
                checkpoint_path.unlink()
        except CopyError:
            _discard(work, checkpoint_path)  # refused before anything worth keeping was written
            raise
        except OSError as exc:
            _discard(work, checkpoint_path)
            where = f" ({exc.filename})" if exc.filename else ""
            raise CopyError(
                f"copy of {source} into {dest_root} stopped: {exc.strerror or exc}{where};"
                " the unfinished copy was removed"
            ) from exc
        except BaseException:
            _discard(work, checkpoint_path)  # interrupted (Ctrl-C): do not keep the space until the next run
            raise
        return CopyResult(final, name, previous, stats)


def _discard(work: Path, checkpoint: Path) -> None:
    with contextlib.suppress(OSError):
        remove_tree(work)
    with contextlib.suppress(OSError):
        checkpoint.unlink()


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint a budgeted part of this copy left, or None (none, or unreadable: then start afresh)."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    needed = ("lines", "stats", "errors", "notes", "done_dirs", "postponed", "previous", "started", "seconds")
    return data if all(key in data for key in needed) else None


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` (0600) through a temporary name, so a crash never leaves half a checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    os.replace(temporary, path)


def prune(dest_root: Path, keep: int | None, min_keep: int) -> list[Path]:
    """Retention for a destination root, under its lock (CopyBusy if a copy is running there)."""
    with DestinationLock(Path(dest_root)):
        remove_stale_work(Path(dest_root))
        return prune_copies(Path(dest_root), keep, min_keep)


# --- verify ------------------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """The result of re-reading a copy against its manifest. ``problems`` lists damage found now;
    ``recorded_errors`` what the run that made the copy could not copy. The copy is good only without both."""

    copy: Path
    files_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    recorded_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.recorded_errors


def _hash_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    buf = _chunk_buffer()
    view = memoryview(buf)
    fd = _open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
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
    shown = _escape(entry.path)
    try:
        st = _lstat(path)
    except FileNotFoundError:
        return f"{shown}: missing"
    except OSError as exc:
        return f"{shown}: cannot stat ({exc.strerror})"
    found = kind_of(st.st_mode)
    if found != entry.kind and not (entry.kind in "cb" and found in ("c", "b")):
        return f"{shown}: expected a {_KIND_NAMES[entry.kind]}, found a {_KIND_NAMES.get(found or '', 'special file')}"
    if entry.kind == "l":
        try:
            target = _readlink(path)
        except OSError as exc:
            return f"{shown}: cannot read the symlink ({exc.strerror})"
        if target != entry.target:
            return f"{shown}: symlink points to {_escape(target)!r}, not {_escape(entry.target or '')!r}"
        return None
    if stat.S_IMODE(st.st_mode) != entry.mode:
        return f"{shown}: mode {stat.S_IMODE(st.st_mode):o}, manifest says {entry.mode:o}"
    if entry.kind != "f":
        return None
    try:
        sha256, size = _hash_file(path)
    except OSError as exc:
        return f"{shown}: cannot read ({exc.strerror})"
    if size != entry.size:
        return f"{shown}: {size} bytes, manifest says {entry.size}"
    if sha256 != entry.sha256:
        return f"{shown}: content differs from the manifest (sha256 {sha256}, expected {entry.sha256})"
    if st.st_mtime_ns != entry.mtime_ns:
        return f"{shown}: mtime {st.st_mtime_ns}, manifest says {entry.mtime_ns}"
    return None


def verify_copy(
    copy_dir: Path, *, threads: int = DEFAULT_THREADS, on_progress: ProgressCallback | None = None
) -> VerifyReport:
    """Re-read every file of a copy and compare it with the manifest (checksum, size, mode, mtime, symlink
    targets, types), list anything in the folder that the manifest does not know, and report the errors the run
    that made the copy recorded (entries it left out)."""
    copy_dir = Path(copy_dir)
    try:
        manifest = read_manifest(copy_dir)
    except (OSError, ValueError) as exc:
        raise CopyError(f"{copy_dir}: no readable manifest ({exc})") from exc
    report = VerifyReport(copy_dir, recorded_errors=manifest.recorded_errors())
    entries = list(manifest.entries.values())
    files = [e for e in entries if e.kind == "f"]
    total_bytes = sum(e.size for e in files)
    root = str(copy_dir)
    from concurrent.futures import ThreadPoolExecutor

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
            report.problems.append(f"{_escape(item.rel)}: in the copy but not in its manifest")
    report.problems.extend(e for e in walk_stats.errors if "reserved" not in e)
    if on_progress is not None:
        on_progress(Progress(report.files_checked, len(files), report.bytes_checked, total_bytes))
    return report


# --- restore -----------------------------------------------------------------------------------------------------


@dataclass
class RestoreResult:
    target: Path
    files: int = 0
    bytes: int = 0
    symlinks: int = 0
    directories: int = 0
    specials: int = 0
    safety_copy: Path | None = None
    replaced: list[str] = field(default_factory=list)  # entries of another type in the target, replaced
    errors: list[str] = field(default_factory=list)


# Writes the content of a manifest file entry into an open descriptor; returns (sha256 hex, bytes written).
FetchFile = Callable[[Entry, int], tuple[str, int]]

_temp_names = itertools.count()


def _temp_name() -> str:
    """A short name for a file being restored (a 255-byte name leaves no room for a longer one)."""
    return f".rst{os.getpid():x}-{next(_temp_names):x}"


def _describe(st: os.stat_result) -> str:
    return _KIND_NAMES.get(kind_of(st.st_mode) or "", "special file")


def _clear(dir_fd: int, name: str) -> str:
    """Remove whatever is at ``name`` in ``dir_fd`` (a whole directory tree too); what it was, for the report."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        remove_tree(f"/proc/self/fd/{dir_fd}/{name}")
    else:
        os.unlink(name, dir_fd=dir_fd)
    return _describe(st)


def restore_entries(
    manifest: Manifest,
    target: Path,
    fetch: FetchFile,
    *,
    subpath: str = "",
    threads: int = DEFAULT_THREADS,
    on_progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Write the entries of ``manifest`` (or of its directory ``subpath``) into the directory ``target``.

    Nothing in the target is ever followed: a symlink, file or special file where the backup has a directory is
    replaced by the directory, and a directory where the backup has something else is replaced by it (callers
    take a safety copy of a target that is not empty first). Each file is written under a short temporary name,
    checked against the manifest's sha256, given the manifest's mode, owner (as root) and mtime, and only then
    renamed into place. Errors are listed per entry; the rest goes on, and directories, symlinks and the root's
    attributes are still applied.
    """
    result = RestoreResult(Path(target))
    dest = str(target)
    prefix = subpath.strip("/")

    def relative(path: str) -> str | None:
        if not prefix:
            return path
        if path.startswith(prefix + "/"):
            return path[len(prefix) + 1 :]
        return None

    chosen = sorted((rel, e) for e in manifest.entries.values() if (rel := relative(e.path)) is not None)
    failed: set[str] = set()  # directories that could not be made: their contents are skipped

    def blocked(rel: str) -> bool:
        if not failed:
            return False
        cut = rel.rfind("/")
        while cut > 0:
            if rel[:cut] in failed:
                return True
            cut = rel.rfind("/", 0, cut)
        return False

    def note_error(rel: str, exc: BaseException) -> None:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        result.errors.append(f"{_escape(rel)}: {message}")

    def parent_of(rel: str) -> tuple[int, str]:
        """A descriptor of the directory that holds ``rel`` (checked to be a real directory) and its name."""
        if "/" in rel:
            head, name = rel.rsplit("/", 1)
            return _open_dir(f"{dest}/{head}", nofollow=True), name
        return _open_dir(dest, nofollow=False), rel

    directories: list[tuple[str, Entry]] = []
    files: list[tuple[str, Entry]] = []
    others: list[tuple[str, Entry]] = []
    for rel, entry in chosen:
        if blocked(rel):
            result.errors.append(f"{_escape(rel)}: not restored (its directory could not be made)")
            continue
        if entry.kind != "d":
            (files if entry.kind == "f" else others).append((rel, entry))
            continue
        try:
            fd, name = parent_of(rel)
            try:
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    os.mkdir(name, 0o700, dir_fd=fd)
                else:
                    if not stat.S_ISDIR(st.st_mode):
                        was = _clear(fd, name)
                        os.mkdir(name, 0o700, dir_fd=fd)
                        result.replaced.append(f"{_escape(rel)}: a {was} in the target, now the backup's directory")
            finally:
                os.close(fd)
            directories.append((rel, entry))
        except OSError as exc:
            failed.add(rel)
            note_error(rel, exc)

    total = sum(e.size for _, e in files)

    def restore_one(pair: tuple[str, Entry]) -> tuple[str, int | None, str | None]:
        rel, entry = pair
        try:
            return rel, _restore_file(parent_of(rel), entry, fetch, result), None
        except (OSError, ValueError) as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return rel, None, f"{_escape(rel)}: {message}"

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="restore") as pool:
        for done, (_rel, size, error) in enumerate(pool.map(restore_one, files), start=1):
            if error:
                result.errors.append(error)
            else:
                result.files += 1
                result.bytes += size or 0
            if on_progress is not None and (done % 200 == 0 or done == len(files)):
                on_progress(Progress(done, len(files), result.bytes, total))

    for rel, entry in others:
        try:
            fd, name = parent_of(rel)
            try:
                _restore_other(fd, name, rel, entry, result)
            finally:
                os.close(fd)
        except OSError as exc:
            note_error(rel, exc)

    for rel, entry in reversed(directories):  # children before parents, so a directory's mtime sticks
        try:
            _set_attributes(f"{dest}/{rel}", entry.mode, entry.mtime_ns, entry.uid, entry.gid)
        except OSError as exc:
            note_error(rel, exc)
    result.directories = len(directories)
    root = manifest.entries.get(prefix) if prefix else manifest.root()
    if root is not None:
        try:
            _set_attributes(dest, root.mode, root.mtime_ns, root.uid, root.gid)
        except OSError as exc:
            note_error(".", exc)
    return result


def _restore_file(where: tuple[int, str], entry: Entry, fetch: FetchFile, result: RestoreResult) -> int:
    dir_fd, name = where
    try:
        tmp = _temp_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            try:
                sha256, size = fetch(entry, fd)
                if sha256 != entry.sha256:
                    raise ValueError(
                        f"checksum mismatch in the backup (sha256 {sha256}, manifest {entry.sha256}); not restored"
                    )
                if _CAN_CHOWN:
                    os.fchown(fd, entry.uid, entry.gid)
                os.fchmod(fd, entry.mode)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
            try:
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
                was = _clear(dir_fd, name)  # a directory where the backup has a file
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                result.replaced.append(f"{_escape(entry.path)}: a {was} in the target, now the backup's file")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        return size
    finally:
        os.close(dir_fd)


def _restore_other(dir_fd: int, name: str, rel: str, entry: Entry, result: RestoreResult) -> None:
    """A symlink, FIFO, socket or device, replacing whatever the target has at that name."""

    def make() -> None:
        if entry.kind == "l":
            os.symlink(entry.target or "", name, dir_fd=dir_fd)
        else:
            _make_special(name, dir_fd, entry.kind, entry.mode, int(entry.target or 0))

    try:
        make()
    except FileExistsError:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        was = _clear(dir_fd, name)
        if stat.S_ISDIR(st.st_mode):
            result.replaced.append(f"{_escape(rel)}: a {was} in the target, now the backup's {_KIND_NAMES[entry.kind]}")
        make()
    if _CAN_CHOWN:
        os.chown(name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
    if entry.kind != "l":
        os.chmod(name, entry.mode, dir_fd=dir_fd)
    os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
    if entry.kind == "l":
        result.symlinks += 1
    else:
        result.specials += 1


def _fetch_from_copy(copy_dir: Path) -> FetchFile:
    root = str(copy_dir)

    def fetch(entry: Entry, fd_out: int) -> tuple[str, int]:
        fd_in, st = open_source_file(f"{root}/{entry.path}")
        try:
            return copy_data(fd_in, fd_out, st.st_size, sparse=_has_holes(st))
        finally:
            os.close(fd_in)

    return fetch


def safety_root(copy_dir: Path) -> Path:
    """Where ``restore --overwrite`` puts its safety copies by default: DEST/.safety-copies, beside the copies but
    never one of them (no stamp name), so no run links against it and retention never counts or deletes it."""
    return Path(copy_dir).parent / SAFETY_DIR


def prepare_safety_root(path: Path) -> Path:
    """Create (or tighten) a safety-copy folder: 0700, since it holds a copy of live data."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)
    return path


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
    into ``safety_dest`` (by default ``DEST/.safety-copies``, a 0700 folder apart from the plan's copies, where
    it is hard-linked against the copy being restored and so costs only the differences), and only entries
    present in the backup are replaced. Each restored file is checked against the manifest's checksum before it
    replaces anything; modes, owners and times come from the manifest, never from the files in the copy.
    """
    copy_dir, target = Path(copy_dir), Path(target)
    try:
        manifest = read_manifest(copy_dir)
    except (OSError, ValueError) as exc:
        raise CopyError(f"{copy_dir}: not a complete copy made by this service ({exc})") from exc
    prefix = (subpath or "").strip("/")
    check_subpath(manifest, prefix, str(copy_dir))
    if manifest.root() is None and not prefix:
        # Format 1 kept the root's attributes on the copy folder itself only.
        st = copy_dir.stat()
        manifest.header["root"] = root_attributes(st)
    safety = take_safety_copy(target, overwrite, safety_dest or safety_root(copy_dir), when, threads, copy_dir)
    target.mkdir(parents=True, exist_ok=True)
    result = restore_entries(
        manifest, target, _fetch_from_copy(copy_dir), subpath=prefix, threads=threads, on_progress=on_progress
    )
    result.safety_copy = safety
    return result


def check_subpath(manifest: Manifest, prefix: str, where: str) -> None:
    if prefix and prefix not in manifest.entries:
        raise CopyError(f"{prefix!r} is not in the copy {where}")
    if prefix and manifest.entries[prefix].kind != "d":
        raise CopyError(f"{prefix!r} in {where} is not a directory; restore its parent directory instead")


def take_safety_copy(
    target: Path,
    overwrite: bool,
    safety_dest: Path,
    when: datetime | None,
    threads: int,
    link_dest: Path | None = None,
) -> Path | None:
    """Refuse a non-empty ``target`` unless ``overwrite``; then copy it into ``safety_dest`` first (a 0700
    folder). Returns the safety copy, or None when the target is missing or empty."""
    if os.path.lexists(target) and not target.is_dir():
        raise CopyError(f"restore target {target} exists and is not a directory")
    if not target.is_dir() or not any(target.iterdir()):
        return None
    if not overwrite:
        raise CopyError(
            f"restore target {target} is not empty; restore into an empty directory, or pass --overwrite"
            " (a safety copy of the target is taken first)"
        )
    root = prepare_safety_root(safety_dest)
    safety = copy_tree(
        target,
        root,
        when or datetime.now(UTC),
        threads=threads,
        allow_empty=True,
        ad_hoc=True,
        link_dest=link_dest,
    )
    if safety.stats.errors:
        raise CopyError(f"safety copy {safety.path} of {target} had errors; not overwriting anything")
    return safety.path
