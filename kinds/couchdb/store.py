"""Where CouchDB backups live: a local directory or a Cloud Storage prefix, behind one small interface, and the
backups found there (manifests, the chain of an increment, a data file read back).

Files are streamed in both directions (``open_write`` / ``open_read``), so a backup never has to fit in memory.
A local file is written under a ``.partial`` name and renamed when complete; a Cloud Storage object only becomes
visible when its upload is finalised. A backup made in several tasks writes one part per task and ``compose``
joins them (gzip members back to back are one gzip stream). Either way the manifest is written last: a data file
without a manifest is not a backup, and nothing reads or prunes it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kinds.couchdb.format import DATA_SUFFIX, MANIFEST_SUFFIX, Manifest, decode_line, iter_lines
from services.errors import ConfigError, PermanentError, TargetGone

GCS_COMPOSE_LIMIT = 32  # source objects one Cloud Storage compose request may join


class Store:
    """A place for backup files. Names are '/'-separated and relative to the store's root."""

    def url(self, name: str) -> str:
        raise NotImplementedError

    def name_of(self, url: str) -> str:
        """The name whose ``url`` this is; PermanentError for a URL outside this store."""
        raise NotImplementedError

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[IO[bytes]]:
        raise NotImplementedError
        yield  # pragma: no cover

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        raise NotImplementedError
        yield  # pragma: no cover

    def list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        with self.open_read(name) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_write(name) as f:
            f.write(data)

    def compose(self, parts: Sequence[str], name: str) -> None:
        """Join ``parts`` (in order) into ``name`` and delete them."""
        raise NotImplementedError

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist yet (atomically); False when it already did."""
        raise NotImplementedError


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = root

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents:
            raise ConfigError(f"backup name {name!r} escapes the destination {self.root}")
        return path

    def url(self, name: str) -> str:
        return str(self._path(name))

    def name_of(self, url: str) -> str:
        path = Path(url.removeprefix("file://")).resolve()
        if self.root.resolve() not in path.parents:
            raise PermanentError(f"{url} is not in the destination {self.root}")
        return path.relative_to(self.root.resolve()).as_posix()

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[IO[bytes]]:
        path = self._path(name)
        self._folder_for(path)
        partial = path.with_name(path.name + ".partial")
        try:
            with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            if partial.exists():
                partial.unlink()

    def _folder_for(self, path: Path) -> None:
        """The folders down to ``path``, made 0700: backups hold a database's data."""
        missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
        for folder in reversed(missing):
            folder.mkdir(mode=0o700, exist_ok=True)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        self._folder_for(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        path = self._path(name)
        if not path.is_file():
            raise TargetGone(f"backup file {path} does not exist")
        with open(path, "rb") as f:
            yield f

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def compose(self, parts: Sequence[str], name: str) -> None:
        if len(parts) == 1:
            os.replace(self._path(parts[0]), self._path(name))
            return
        with self.open_write(name) as out:
            for part in parts:
                with open(self._path(part), "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        for part in parts:
            self.delete(part)


class GcsStore(Store):
    def __init__(self, client: Any, bucket: str, prefix: str):
        self.client = client
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.bucket = client.bucket(bucket)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str) -> str:
        return f"gs://{self.bucket_name}/{self._key(name)}"

    def name_of(self, url: str) -> str:
        head = self.url("")
        if not url.startswith(head) or len(url) == len(head):
            raise PermanentError(f"{url} is not in the destination {head}")
        return url[len(head) :]

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[IO[bytes]]:
        blob = self.bucket.blob(self._key(name))
        # A resumable upload in 8 MiB chunks: memory stays at one chunk whatever the backup's size.
        with blob.open("wb", chunk_size=8 * 1024 * 1024, ignore_flush=True) as f:
            yield f

    @contextlib.contextmanager
    def open_read(self, name: str) -> Iterator[IO[bytes]]:
        from google.api_core.exceptions import NotFound

        blob = self.bucket.blob(self._key(name))
        try:
            f = blob.open("rb", chunk_size=8 * 1024 * 1024)
        except NotFound:
            raise TargetGone(f"backup object {self.url(name)} does not exist") from None
        with f:
            yield f

    def list(self, prefix: str) -> list[str]:
        start = len(self.prefix) + 1 if self.prefix else 0
        return sorted(b.name[start:] for b in self.client.list_blobs(self.bucket_name, prefix=self._key(prefix)))

    def exists(self, name: str) -> bool:
        return self.bucket.blob(self._key(name)).exists()

    def delete(self, name: str) -> None:
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            self.bucket.blob(self._key(name)).delete()

    def create_exclusive(self, name: str, data: bytes) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.bucket.blob(self._key(name)).upload_from_string(data, if_generation_match=0)
        except PreconditionFailed:
            return False
        return True

    def compose(self, parts: Sequence[str], name: str) -> None:
        # Server side, at most GCS_COMPOSE_LIMIT sources a request: the result so far is the first source of the next.
        # A fresh destination object each time, so no checksum of an earlier round is sent along as the new one's.
        key = self._key(name)
        sources = [self.bucket.blob(self._key(p)) for p in parts]
        self.bucket.blob(key).compose(sources[:GCS_COMPOSE_LIMIT])
        for start in range(GCS_COMPOSE_LIMIT, len(sources), GCS_COMPOSE_LIMIT - 1):
            self.bucket.blob(key).compose([self.bucket.blob(key), *sources[start : start + GCS_COMPOSE_LIMIT - 1]])
        for part in parts:
            self.delete(part)


def open_store(url: str, storage_client: Any = None) -> Store:
    """A Store for ``gs://bucket/prefix`` or a local directory (``/path`` or ``file:///path``)."""
    if url.startswith("gs://"):
        bucket, _, prefix = url[len("gs://") :].partition("/")
        if not bucket:
            raise ConfigError(f"destination {url!r}: expected gs://BUCKET/PREFIX")
        if storage_client is None:
            raise ConfigError(f"destination {url!r}: no Cloud Storage client available")
        return GcsStore(storage_client, bucket, prefix)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if not url.startswith("/"):
        raise ConfigError(f"destination {url!r}: expected gs://BUCKET/PREFIX or an absolute local path")
    return LocalStore(Path(url))


# ------------------------------------------------------------------------------------------ backups in a store


def read_manifest(store: Store, name: str) -> Manifest:
    """The manifest called ``name`` (with or without the ``.manifest.json`` suffix)."""
    if name.endswith(MANIFEST_SUFFIX):
        name = name[: -len(MANIFEST_SUFFIX)]
    elif name.endswith(DATA_SUFFIX):
        name = name[: -len(DATA_SUFFIX)]
    where = store.url(name + MANIFEST_SUFFIX)
    try:
        return Manifest.from_bytes(store.read_bytes(name + MANIFEST_SUFFIX), where)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None


def list_manifests(store: Store, prefix: str) -> list[Manifest]:
    """The manifests under ``prefix`` that this tool wrote, oldest first (names sort by time stamp)."""
    found = []
    for name in store.list(prefix):
        if not name.endswith(MANIFEST_SUFFIX):
            continue
        try:
            found.append(read_manifest(store, name))
        except PermanentError:
            continue  # not ours (or unreadable): never treated as a backup, never pruned
    return sorted(found, key=lambda m: m.name)


def resolve_chain(store: Store, name: str) -> list[Manifest]:
    """The full backup and the increments leading to backup ``name``, in the order to apply them."""
    chain = [read_manifest(store, name)]
    seen = {chain[0].name}
    while chain[-1].previous is not None:
        if chain[-1].previous in seen:
            raise PermanentError(
                f"backup chain of {name} loops: {chain[-1].name} names {chain[-1].previous} as previous"
            )
        seen.add(chain[-1].previous)
        chain.append(read_manifest(store, chain[-1].previous))
    chain.reverse()
    return chain


def iter_backup_lines(store: Store, manifest: Manifest) -> Iterator[bytes]:
    with store.open_read(manifest.data_name) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
        yield from iter_lines(gz)  # type: ignore[arg-type]


class _Tee:
    """Hands reads through while hashing them, a new digest at each of ``cuts`` (byte offsets)."""

    def __init__(self, raw: IO[bytes], cuts: list[int]):
        self.raw = raw
        self.whole = hashlib.sha256()
        self.pieces = [hashlib.sha256()]
        self.cuts = list(cuts)
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.whole.update(data)
        view = memoryview(data)
        while self.cuts and self.offset + len(view) >= self.cuts[0]:
            head = self.cuts.pop(0) - self.offset
            self.pieces[-1].update(view[:head])
            self.pieces.append(hashlib.sha256())
            self.offset += head
            view = view[head:]
        self.pieces[-1].update(view)
        self.offset += len(view)
        return data


@dataclass
class ReadBack:
    """A data file read to its end: its SHA-256, the SHA-256 of each piece between the cuts asked for, its line
    count, and (when lines were checked) the first line that is not a ``_bulk_docs`` body."""

    sha256: str
    pieces: list[str]
    lines: int
    bad_line: str | None = None


def read_back(store: Store, name: str, cuts: Sequence[int] = (), *, check_lines: bool = False) -> ReadBack:
    """Read the data file ``name`` to its end (see ReadBack). The gzip CRC of every member is checked on the way;
    PermanentError if the file is missing, truncated or not gzip, saying where reading stopped."""
    lines = 0
    bad_line = None
    tee: _Tee | None = None
    try:
        with store.open_read(name) as raw:
            tee = _Tee(raw, list(cuts))
            with gzip.GzipFile(fileobj=tee, mode="rb") as gz:  # type: ignore[call-overload]
                for line in iter_lines(gz):  # type: ignore[arg-type]
                    lines += 1
                    if check_lines and bad_line is None:
                        try:
                            decode_line(line, f"{store.url(name)} line {lines}")
                        except ValueError as exc:
                            bad_line = str(exc)
    except (OSError, EOFError, zlib.error, TargetGone) as exc:
        where = f" (after {tee.offset} bytes, line {lines + 1})" if tee is not None else ""
        raise PermanentError(f"backup {store.url(name)} is unreadable{where}: {exc or type(exc).__name__}") from None
    return ReadBack(tee.whole.hexdigest(), [p.hexdigest() for p in tee.pieces], lines, bad_line)


def check_data_file(store: Store, manifest: Manifest, *, check_lines: bool = False) -> None:
    """Read the data file back: checksum, gzip integrity (CRC) and line count must match the manifest; with
    ``check_lines``, every line must also be a ``_bulk_docs`` body (a restore checks before writing anything)."""
    found = read_back(store, manifest.data_name, check_lines=check_lines)
    if found.sha256 != manifest.sha256 or found.lines != manifest.batches:
        raise PermanentError(
            f"backup {store.url(manifest.data_name)} does not match what was written"
            f" (sha256 {found.sha256[:12]} vs {manifest.sha256[:12]}, lines {found.lines} vs {manifest.batches})"
        )
    if found.bad_line is not None:
        raise PermanentError(f"backup {found.bad_line}; nothing was restored")
