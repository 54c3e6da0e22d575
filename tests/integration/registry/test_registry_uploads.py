"""Registry uploads against the real SQLite and artifact stores: atomicity under failure and races."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from registry_testing import files_under, tiny_onnx

from modelserve_registry.artifacts import LocalArtifactStore
from modelserve_registry.domain import Registry
from modelserve_registry.resources import (
    Actor,
    ArtifactFormat,
    DataType,
    Signature,
    TensorSpec,
    VersionUpload,
)
from modelserve_registry.store import SqliteRegistryStore
from modelserve_runtime.errors import NotFoundError, ResourceExhaustedError

ACTOR = Actor("tester", "testing")
SIGNATURE = Signature(
    inputs=(TensorSpec("features", DataType.FP32, (-1, 3)),),
    outputs=(TensorSpec("probabilities", DataType.FP32, (-1, 2)),),
)


def metadata(data: bytes, parent: str = "models/fraud") -> VersionUpload:
    return VersionUpload(
        parent=parent,
        description="",
        format=ArtifactFormat.ONNX,
        signature=SIGNATURE,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def delete_model(db: Path, model_id: str) -> None:
    """Deletes a model row from outside the service, as a concurrent writer would."""
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM models WHERE model_id = ?", (model_id,))
    conn.close()


def registry_over(store: SqliteRegistryStore, root: Path, max_artifact_bytes: int) -> Registry:
    """Another Registry on the same stores, with its own size limit."""
    return Registry(
        store,
        LocalArtifactStore(root / "artifacts"),
        max_artifact_bytes=max_artifact_bytes,
        read_chunk_bytes=1 << 10,
    )


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[Registry, SqliteRegistryStore, Path]]:
    """A Registry over opened real stores in tmp_path; yields it, its store and the artifact root."""
    store = SqliteRegistryStore(tmp_path / "registry.db")
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    await store.open()
    await artifacts.open()
    registry = Registry(store, artifacts, max_artifact_bytes=1 << 20, read_chunk_bytes=1 << 10)
    yield registry, store, tmp_path
    await store.close()


class TestUploadAtomicity:
    async def test_failed_insert_removes_the_new_artifact(
        self, stores: tuple[Registry, SqliteRegistryStore, Path]
    ) -> None:
        """When the version row cannot be written, the artifact file this upload created is removed."""
        registry, _, root = stores
        await registry.create_model("fraud", "", ACTOR)
        data = tiny_onnx()

        async def messages() -> AsyncIterator[VersionUpload | bytes]:
            yield metadata(data)
            yield data
            # The model disappears after the bytes arrived, so the insert finds no model.
            await asyncio.to_thread(delete_model, root / "registry.db", "fraud")

        with pytest.raises(NotFoundError) as info:
            await registry.create_model_version(messages(), "tester")
        assert info.value.reason == "MODEL_NOT_FOUND"
        assert files_under(root / "artifacts") == []

    async def test_failed_insert_keeps_an_artifact_other_versions_use(
        self, stores: tuple[Registry, SqliteRegistryStore, Path]
    ) -> None:
        """A failed upload of bytes another version already stored leaves that version's file alone."""
        registry, _, root = stores
        await registry.create_model("fraud", "", ACTOR)
        await registry.create_model("churn", "", ACTOR)
        data = tiny_onnx()

        async def upload(parent: str) -> AsyncIterator[VersionUpload | bytes]:
            yield metadata(data, parent)
            yield data

        kept = await registry.create_model_version(upload("models/fraud"), "tester")

        async def then_delete() -> AsyncIterator[VersionUpload | bytes]:
            async for message in upload("models/churn"):
                yield message
            await asyncio.to_thread(delete_model, root / "registry.db", "churn")

        with pytest.raises(NotFoundError):
            await registry.create_model_version(then_delete(), "tester")
        chunks = [c async for c in registry.read_artifact(kept.name)]
        assert b"".join(chunks) == data

    async def test_cancelled_upload_leaves_no_temp_file(
        self, stores: tuple[Registry, SqliteRegistryStore, Path]
    ) -> None:
        """A caller that goes away mid-upload leaves no staged file and no version."""
        registry, store, root = stores
        await registry.create_model("fraud", "", ACTOR)
        data = tiny_onnx()
        asked_for_more = asyncio.Event()

        async def stalls() -> AsyncIterator[VersionUpload | bytes]:
            yield metadata(data)
            yield data[:100]
            asked_for_more.set()
            await asyncio.Event().wait()
            yield data[100:]

        task = asyncio.create_task(registry.create_model_version(stalls(), "tester"))
        await asked_for_more.wait()
        assert len(files_under(root / "artifacts" / "tmp")) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert files_under(root / "artifacts") == []
        assert await store.list_model_versions("fraud", before=None, limit=10) == []

    async def test_caller_leaving_during_the_insert_still_records_consistently(
        self, stores: tuple[Registry, SqliteRegistryStore, Path]
    ) -> None:
        """A caller cancelled while its version row is being written leaves row and file together."""
        _, store, root = stores
        recording = asyncio.Event()

        def clock() -> datetime:
            recording.set()
            return datetime.now(UTC)

        registry = Registry(
            store,
            LocalArtifactStore(root / "artifacts"),
            max_artifact_bytes=1 << 20,
            read_chunk_bytes=1 << 10,
            clock=clock,
        )
        await registry.create_model("fraud", "", ACTOR)
        recording.clear()
        data = tiny_onnx()

        async def upload() -> AsyncIterator[VersionUpload | bytes]:
            yield metadata(data)
            yield data

        # Another writer holds the database, so the version insert waits while we cancel.
        blocker = sqlite3.connect(root / "registry.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(registry.create_model_version(upload(), "tester"))
        await recording.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        blocker.execute("ROLLBACK")
        blocker.close()
        # The store runs its calls in order, so this read comes after the pending insert.
        version = await store.get_model_version("fraud", 1)
        assert version is not None
        chunks = [c async for c in registry.read_artifact(version.name)]
        assert b"".join(chunks) == data

    async def test_concurrent_uploads_get_distinct_numbers(
        self, stores: tuple[Registry, SqliteRegistryStore, Path]
    ) -> None:
        """Uploads racing for one model get versions 1..n, each exactly once."""
        registry, _, root = stores
        await registry.create_model("fraud", "", ACTOR)
        models = [tiny_onnx(weight=float(i % 3)) for i in range(12)]

        async def upload(data: bytes) -> AsyncIterator[VersionUpload | bytes]:
            yield metadata(data)
            for i in range(0, len(data), 64):
                yield data[i : i + 64]

        versions = await asyncio.gather(
            *(registry.create_model_version(upload(d), "tester") for d in models)
        )
        assert sorted(v.version for v in versions) == list(range(1, 13))
        assert len(files_under(root / "artifacts")) == 3
        for version, data in zip(versions, models, strict=True):
            assert version.sha256 == hashlib.sha256(data).hexdigest()


class TestSizeLimit:
    async def test_reading_stops_at_the_chunk_that_crosses_the_limit(
        self, stores: tuple[Registry, SqliteRegistryStore, Path]
    ) -> None:
        """The chunk that takes the upload past the limit is the last one read."""
        _, store, root = stores
        registry = registry_over(store, root, max_artifact_bytes=1000)
        await registry.create_model("fraud", "", ACTOR)
        pulled = 0

        async def chunks() -> AsyncIterator[VersionUpload | bytes]:
            nonlocal pulled
            yield metadata(b"")
            for _ in range(10):
                pulled += 1
                yield b"x" * 300

        with pytest.raises(ResourceExhaustedError):
            await registry.create_model_version(chunks(), "tester")
        assert pulled == 4
        assert files_under(root / "artifacts") == []

    async def test_an_artifact_of_exactly_the_limit_fits(
        self, stores: tuple[Registry, SqliteRegistryStore, Path]
    ) -> None:
        """An artifact as large as max_artifact_bytes is accepted; one byte less of limit refuses it."""
        registry, store, root = stores
        data = tiny_onnx()
        await registry.create_model("fraud", "", ACTOR)

        async def upload() -> AsyncIterator[VersionUpload | bytes]:
            yield metadata(data)
            yield data

        with pytest.raises(ResourceExhaustedError):
            await registry_over(store, root, len(data) - 1).create_model_version(upload(), "tester")
        version = await registry_over(store, root, len(data)).create_model_version(
            upload(), "tester"
        )
        assert version.size_bytes == len(data)
