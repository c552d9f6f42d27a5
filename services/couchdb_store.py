"""Where CouchDB backups live: a local directory or a Cloud Storage prefix, behind one small interface.

Files are streamed in both directions (``open_write`` / ``open_read``), so a backup never has to fit in memory.
A local file is written under a ``.partial`` name and renamed when complete; a Cloud Storage object only becomes
visible when its upload is finalised. Either way the manifest is written last: a data file without a manifest
is not a backup, and nothing reads or prunes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from services.errors import ConfigError, TargetGone


class Store:
    """A place for backup files. Names are '/'-separated and relative to the store's root."""

    def url(self, name: str) -> str:
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

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[IO[bytes]]:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with open(partial, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            if partial.exists():
                partial.unlink()

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
