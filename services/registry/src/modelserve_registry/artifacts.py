"""Content-addressed artifact storage: staged uploads made durable by an atomic rename."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlparse

import structlog

log = structlog.get_logger()

_TEMP_SUFFIX = ".partial"
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    """Where a committed artifact lives, and whether this commit created the file."""

    uri: str
    created: bool


class StagedArtifact(Protocol):
    """An upload in progress: bytes written so far, hashed as they arrive, not yet visible."""

    @property
    def size(self) -> int:
        """Bytes written so far."""
        ...

    async def write(self, chunk: bytes) -> None:
        """Appends bytes."""
        ...

    async def finish(self) -> str:
        """Ends the writing and returns the bytes' sha256, lowercase hex."""
        ...

    async def read(self) -> bytes:
        """Every byte written, for validation before commit."""
        ...

    async def commit(self) -> StoredArtifact:
        """Makes the bytes durable at their content address, or reuses an identical file there."""
        ...

    def discard(self) -> None:
        """Removes what was staged; does nothing after a commit. Never raises."""
        ...


class ArtifactStore(Protocol):
    """Stores artifact bytes under their digest and streams them back."""

    async def open(self) -> None:
        """Prepares the store and removes uploads that a previous process left unfinished."""
        ...

    async def stage(self) -> StagedArtifact:
        """Starts an upload."""
        ...

    def open_chunks(self, uri: str, chunk_bytes: int) -> AsyncIterator[bytes]:
        """The bytes of a committed artifact, in chunks of at most `chunk_bytes`."""
        ...

    async def remove(self, uri: str) -> None:
        """Deletes a committed artifact; a missing one is not an error."""
        ...

    async def remove_unreferenced(self, used: set[str]) -> int:
        """Deletes every committed artifact whose URI is not in `used`; returns how many."""
        ...


def _fsync(path: Path) -> None:
    """Flushes a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalStagedArtifact:
    """A temp file under the store's root, so the final rename stays on one filesystem."""

    def __init__(self, store: LocalArtifactStore, path: Path, file: BinaryIO) -> None:
        self._store = store
        self._path = path
        self._file: BinaryIO | None = file
        self._hash = hashlib.sha256()
        self._size = 0
        self._digest: str | None = None
        self._committed = False

    @property
    def size(self) -> int:
        return self._size

    async def write(self, chunk: bytes) -> None:
        file = self._file
        if file is None or self._digest is not None:
            raise RuntimeError("the staged artifact is finished")
        await asyncio.to_thread(self._write, file, chunk)
        self._size += len(chunk)

    def _write(self, file: BinaryIO, chunk: bytes) -> None:
        self._hash.update(chunk)
        file.write(chunk)

    async def finish(self) -> str:
        if self._digest is None:
            file = self._file
            if file is None:
                raise RuntimeError("the staged artifact was discarded")
            await asyncio.to_thread(file.close)
            self._file = None
            self._digest = self._hash.hexdigest()
        return self._digest

    async def read(self) -> bytes:
        if self._digest is None:
            raise RuntimeError("finish the staged artifact before reading it")
        return await asyncio.to_thread(self._path.read_bytes)

    async def commit(self) -> StoredArtifact:
        digest = await self.finish()
        stored = await asyncio.to_thread(self._store.place, self._path, digest)
        self._committed = True
        return stored

    def discard(self) -> None:
        if self._committed:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        self._path.unlink(missing_ok=True)


class LocalArtifactStore:
    """Artifacts as files named by their sha256 under `root/sha256/ab/abcdef...`.

    Uploads are written to `root/tmp/` and renamed into place, so a reader never sees a
    partial file and a crash leaves only temp files, which `open` removes.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._tmp = root / "tmp"
        self._objects = root / "sha256"

    async def open(self) -> None:
        removed = await asyncio.to_thread(self._prepare)
        if removed:
            log.info("artifact_temp_files_removed", count=removed, root=str(self._root))

    def _prepare(self) -> int:
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._objects.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self._tmp.iterdir():
            if leftover.is_file() and leftover.name.endswith(_TEMP_SUFFIX):
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    async def stage(self) -> StagedArtifact:
        path = self._tmp / f"{uuid.uuid4().hex}{_TEMP_SUFFIX}"
        file = await asyncio.to_thread(path.open, "xb")
        return _LocalStagedArtifact(self, path, file)

    def path_of(self, digest: str) -> Path:
        """Where the artifact with this sha256 lives."""
        return self._objects / digest[:2] / digest

    def place(self, staged: Path, digest: str) -> StoredArtifact:
        """Renames a finished temp file to its content address, or drops it for an existing copy."""
        target = self.path_of(digest)
        uri = target.resolve().as_uri()
        if target.exists():
            staged.unlink(missing_ok=True)
            return StoredArtifact(uri=uri, created=False)
        # Durable before visible: a crash can leave a temp file, never a torn artifact.
        _fsync(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        _fsync(target.parent)
        _fsync(target.parent.parent)
        return StoredArtifact(uri=uri, created=True)

    def _path_of_uri(self, uri: str) -> Path:
        # The digest is the artifact's identity; the directory the URI records is where it
        # was written. Finding it by digest under this root lets data_dir move.
        parsed = urlparse(uri)
        parts = PurePosixPath(unquote(parsed.path)).parts[-3:]
        if (
            parsed.scheme != "file"
            or len(parts) != 3
            or parts[0] != "sha256"
            or not _DIGEST.fullmatch(parts[2])
            or parts[1] != parts[2][:2]
        ):
            raise ValueError(f"{uri!r} is not a local artifact URI")
        return self.path_of(parts[2])

    async def open_chunks(self, uri: str, chunk_bytes: int) -> AsyncIterator[bytes]:
        path = self._path_of_uri(uri)
        file = await asyncio.to_thread(path.open, "rb")
        try:
            while chunk := await asyncio.to_thread(file.read, chunk_bytes):
                yield chunk
        finally:
            file.close()

    async def remove(self, uri: str) -> None:
        path = self._path_of_uri(uri)
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def remove_unreferenced(self, used: set[str]) -> int:
        keep = {self._path_of_uri(uri).name for uri in used}

        def sweep() -> int:
            removed = 0
            for path in self._objects.glob("*/*"):
                if path.is_file() and _DIGEST.fullmatch(path.name) and path.name not in keep:
                    path.unlink(missing_ok=True)
                    removed += 1
            return removed

        return await asyncio.to_thread(sweep)
