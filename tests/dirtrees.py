"""Awkward source trees for the directory kind's tests, and a snapshot of a tree that does not use the engine.

The snapshot walks with directory descriptors and bytes names, so it sees names that are not UTF-8 and paths
longer than PATH_MAX exactly as the kernel does.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from pathlib import Path

# Every C0 control character but NUL and '/', DEL, and the characters Python's str.splitlines() breaks on.
CONTROL_NAMES = [bytes([c]) for c in range(1, 32)] + [b"\x7f"]
LINE_BREAKERS = ["form\x0cfeed", "vertical\x0btab", "fs\x1cgs\x1drs\x1e", "nel\u0085", "ls\u2028ps\u2029"]
NOT_UTF8 = [b"latin1-caf\xe9", b"\xff\xfe-raw", b"half-\xe2\x82"]


def fsname(raw: bytes | str) -> str:
    return os.fsdecode(raw) if isinstance(raw, bytes) else raw


def write_at(dir_fd: int, name: bytes, data: bytes, mtime: int = 1_700_000_000) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.utime(fd, ns=(mtime * 10**9, mtime * 10**9))
    finally:
        os.close(fd)


def make_deep(root: Path, levels: int, name_len: int, leaf: bytes = b"deep-file") -> bytes:
    """Directories ``levels`` deep with ``name_len``-byte names and a file at the bottom, made through
    descriptors. Returns the file's path relative to ``root`` (bytes)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    parts = []
    try:
        for level in range(levels):
            name = (b"%03d" % level + b"d" * name_len)[:name_len]
            os.mkdir(name, 0o755, dir_fd=fd)
            step = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = step
            parts.append(name)
        write_at(fd, leaf, b"at the bottom of a very long path\n")
    finally:
        os.close(fd)
    return b"/".join(parts + [leaf])


def make_socket(path: Path) -> None:
    """A Unix socket file, bound from its directory (the socket path limit is 108 bytes)."""
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(here)


def make_awkward_tree(root: Path, sparse_mb: int = 64) -> dict[str, object]:
    """Names with every control character and bytes that are not UTF-8, 255-byte names, a path over 4,096
    bytes, symlink loops, a FIFO, a socket, a sparse file. Returns facts the tests check."""
    root.mkdir(parents=True)
    broot = os.fsencode(root)
    names = root / "names"
    names.mkdir()
    fd = os.open(names, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for raw in CONTROL_NAMES:
            write_at(fd, b"ctl-" + raw + b"-end", b"control " + raw)
        for text in LINE_BREAKERS:
            write_at(fd, text.encode(), text.encode())
        for raw in NOT_UTF8:
            write_at(fd, raw, raw)
        write_at(fd, b"n" * 255, b"a 255-byte name")
        os.mkdir(b"d" * 255, 0o750, dir_fd=fd)
        os.symlink(b"t" * 255, b"l" * 255, dir_fd=fd)
        write_at(fd, b"-", b"a file called dash")
        write_at(fd, b"back\\slash\\x41\\u0085", b"backslashes that look like escapes")
        os.symlink(b"-", b"points-at-dash", dir_fd=fd)
        os.symlink(b"\xff\n\x01target", b"odd-target", dir_fd=fd)
    finally:
        os.close(fd)
    deep = make_deep(root, levels=18, name_len=250)  # 18 x 251 bytes: 4,527 bytes before the file name
    loops = root / "loops"
    loops.mkdir()
    os.symlink("b", loops / "a")
    os.symlink("a", loops / "b")
    os.symlink("self", loops / "self")
    os.symlink(".", loops / "dot")
    os.symlink("..", loops / "up")
    specials = root / "specials"
    specials.mkdir()
    os.mkfifo(specials / "fifo", 0o640)
    make_socket(specials / "sock")
    sparse = root / "sparse.img"
    with open(sparse, "wb") as fh:
        fh.truncate(sparse_mb << 20)
        fh.seek(1 << 20)
        fh.write(b"data in the middle of holes")
        fh.seek((sparse_mb << 20) - 5)
        fh.write(b"tail!")
    os.utime(sparse, (1_700_000_000, 1_700_000_000))
    (root / "plain.txt").write_bytes(b"plain\n")
    (root / "ro-dir").mkdir()
    (root / "ro-dir" / "inside.txt").write_bytes(b"in a read-only directory")
    (root / "ro-dir").chmod(0o555)
    os.chmod(root, 0o751)
    os.utime(root, (1_700_000_900, 1_700_000_900))
    return {"deep": deep, "sparse": "sparse.img", "root": broot}


def snapshot(root: Path, with_content: bool = True) -> dict[bytes, tuple]:
    """Every entry under ``root`` (bytes path -> kind, mode, mtime_ns, uid, gid, size, sha256 or link target),
    and the root itself under b"". Special files compare by type and mode only."""
    out: dict[bytes, tuple] = {}
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    st = os.fstat(top)
    out[b""] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_uid, st.st_gid, None, None)
    stack: list[tuple[int, bytes]] = [(top, b"")]
    while stack:
        fd, rel = stack.pop()
        try:
            for name in os.listdir(fd):
                bname = os.fsencode(name)
                path = rel + b"/" + bname if rel else bname
                est = os.stat(bname, dir_fd=fd, follow_symlinks=False)
                mode = est.st_mode
                common = (stat.S_IMODE(mode), est.st_mtime_ns, est.st_uid, est.st_gid)
                if stat.S_ISDIR(mode):
                    out[path] = ("d", *common, None, None)
                    stack.append((os.open(bname, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), path))
                elif stat.S_ISLNK(mode):
                    out[path] = (
                        "l",
                        None,
                        est.st_mtime_ns,
                        est.st_uid,
                        est.st_gid,
                        None,
                        os.readlink(bname, dir_fd=fd),
                    )
                elif stat.S_ISREG(mode):
                    digest = None
                    if with_content:
                        h = hashlib.sha256()
                        f = os.open(bname, os.O_RDONLY, dir_fd=fd)
                        try:
                            while chunk := os.read(f, 1 << 20):
                                h.update(chunk)
                        finally:
                            os.close(f)
                        digest = h.hexdigest()
                    out[path] = ("f", *common, est.st_size, digest)
                else:
                    kind = "p" if stat.S_ISFIFO(mode) else "s" if stat.S_ISSOCK(mode) else "other"
                    out[path] = (kind, stat.S_IMODE(mode), est.st_mtime_ns, est.st_uid, est.st_gid, None, None)
        finally:
            os.close(fd)
    return out


def read_at(root: Path, rel: bytes) -> bytes:
    """The content of a file under ``root`` reached through descriptors (its path may be over PATH_MAX)."""
    parts = rel.split(b"/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            step = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = step
        f = os.open(parts[-1], os.O_RDONLY, dir_fd=fd)
        try:
            return os.read(f, 1 << 20)
        finally:
            os.close(f)
    finally:
        os.close(fd)


def set_times(root: Path, seconds: int) -> None:
    """Give every entry under ``root`` (not following symlinks) and ``root`` itself the mtime ``seconds``."""
    stack = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    while stack:
        fd = stack.pop()
        try:
            for name in os.listdir(fd):
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    stack.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))
                os.utime(name, (seconds, seconds), dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)
    os.utime(root, (seconds, seconds))
