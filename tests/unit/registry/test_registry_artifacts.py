"""LocalArtifactStore on real files: staging, content addresses, reuse, the start-up sweep."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from urllib.parse import urlparse

from modelserve_registry.artifacts import LocalArtifactStore

DATA = bytes(range(256)) * 5
DIGEST = hashlib.sha256(DATA).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def store_bytes(store: LocalArtifactStore, data: bytes) -> tuple[str, bool]:
    staged = await store.stage()
    for i in range(0, len(data), 100):
        await staged.write(data[i : i + 100])
    assert await staged.finish() == hashlib.sha256(data).hexdigest()
    stored = await staged.commit()
    return stored.uri, stored.created


class TestLocalArtifactStore:
    async def test_commit_places_bytes_at_their_digest(self, tmp_path: Path) -> None:
        """Committed bytes live at sha256/ab/abcd..., and nothing is left in the temp directory."""
        store = LocalArtifactStore(tmp_path)
        await store.open()
        uri, created = await store_bytes(store, DATA)
        assert created
        path = Path(urlparse(uri).path)
        assert path == (tmp_path / "sha256" / DIGEST[:2] / DIGEST).resolve()
        assert await asyncio.to_thread(path.read_bytes) == DATA
        assert files_under(tmp_path / "tmp") == []

    async def test_same_bytes_reuse_the_file(self, tmp_path: Path) -> None:
        """Committing the same bytes again reuses the existing file and says it created nothing."""
        store = LocalArtifactStore(tmp_path)
        await store.open()
        first, _ = await store_bytes(store, DATA)
        second, created = await store_bytes(store, DATA)
        assert (second, created) == (first, False)
        assert len(files_under(tmp_path)) == 1

    async def test_discard_removes_the_staged_file(self, tmp_path: Path) -> None:
        """A discarded upload leaves no file behind."""
        store = LocalArtifactStore(tmp_path)
        await store.open()
        staged = await store.stage()
        await staged.write(DATA)
        assert len(files_under(tmp_path)) == 1
        staged.discard()
        assert files_under(tmp_path) == []

    async def test_open_sweeps_unfinished_uploads(self, tmp_path: Path) -> None:
        """Opening the store removes temp files a previous process left behind, and only those."""
        store = LocalArtifactStore(tmp_path)
        await store.open()
        uri, _ = await store_bytes(store, DATA)
        leftover = await store.stage()
        await leftover.write(b"partial")
        await LocalArtifactStore(tmp_path).open()
        assert files_under(tmp_path) == [Path(urlparse(uri).path)]

    async def test_chunks_stream_back_after_the_directory_moved(self, tmp_path: Path) -> None:
        """Artifacts are found by digest, so a moved data directory still serves its URIs."""
        store = LocalArtifactStore(tmp_path / "before")
        await store.open()
        uri, _ = await store_bytes(store, DATA)
        shutil.move(tmp_path / "before", tmp_path / "after")
        moved = LocalArtifactStore(tmp_path / "after")
        await moved.open()
        chunks = [c async for c in moved.open_chunks(uri, 300)]
        assert [len(c) for c in chunks] == [300, 300, 300, 300, 80]
        assert b"".join(chunks) == DATA

    async def test_remove_deletes_the_file(self, tmp_path: Path) -> None:
        """Removing a committed artifact deletes its file; removing it again is harmless."""
        store = LocalArtifactStore(tmp_path)
        await store.open()
        uri, _ = await store_bytes(store, DATA)
        await store.remove(uri)
        await store.remove(uri)
        assert files_under(tmp_path) == []
