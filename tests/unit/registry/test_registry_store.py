"""SqliteRegistryStore on a real SQLite file: migrations, version numbers, deployments."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelserve_registry.resources import (
    ArtifactFormat,
    Change,
    DataType,
    Model,
    ModelVersion,
    Signature,
    TensorSpec,
    TrafficTarget,
)
from modelserve_registry.store import MIGRATIONS, SqliteRegistryStore
from modelserve_runtime.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
SIGNATURE = Signature(
    inputs=(TensorSpec("features", DataType.FP32, (-1, 3)),),
    outputs=(TensorSpec("probabilities", DataType.FP32, (-1, 2)),),
    feature_refs=("customer:age", "request:hour_of_day", "customer:spend"),
)


def change(at: datetime = NOW, action: str = "Test") -> Change:
    """A change by the principal `tester`."""
    return Change("tester", "testing", action, at)


def query(db: Path, sql: str) -> list[tuple[object, ...]]:
    """Rows from a second, independent connection to the database file."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteRegistryStore]:
    """An opened store in a fresh file, with the model `fraud`."""
    opened = SqliteRegistryStore(tmp_path / "data" / "registry.db")
    await opened.open()
    await opened.create_model(Model("fraud", "card fraud", NOW), change())
    yield opened
    await opened.close()


async def add_version(store: SqliteRegistryStore, model_id: str = "fraud") -> ModelVersion:
    return await store.create_model_version(
        model_id=model_id,
        description="d",
        format=ArtifactFormat.ONNX,
        signature=SIGNATURE,
        artifact_uri="file:///a/sha256/ab/" + "ab" * 32,
        sha256="ab" * 32,
        size_bytes=10,
        change=change(),
    )


class TestSchema:
    async def test_migrations_run_once(self, tmp_path: Path) -> None:
        """Opening a new file applies every migration; reopening it applies none."""
        db = tmp_path / "registry.db"
        store = SqliteRegistryStore(db)
        await store.open()
        await store.close()
        applied = query(db, "SELECT version FROM schema_migrations ORDER BY version")
        assert applied == [(number,) for number, _ in MIGRATIONS]
        store = SqliteRegistryStore(db)
        await store.open()
        await store.close()
        assert query(db, "SELECT version FROM schema_migrations ORDER BY version") == applied

    async def test_upgrade_keeps_deployments_as_their_first_revision(self, tmp_path: Path) -> None:
        """A database made before revision history gets each deployment's current state as
        a revision, and existing versions start in DEVELOPMENT."""
        db = tmp_path / "registry.db"
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_time TEXT NOT NULL) STRICT"
        )
        for statement in MIGRATIONS[0][1]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (1, 'then')")
        conn.execute("INSERT INTO models VALUES ('fraud', '', ?)", (NOW.isoformat(),))
        conn.execute(
            "INSERT INTO model_versions VALUES ('fraud', 1, '', 'onnx', x'', 'file:///x', ?, 1, ?)",
            ("ab" * 32, NOW.isoformat()),
        )
        traffic = '[{"model": "fraud", "version": 1, "percent": 100}]'
        conn.execute(
            "INSERT INTO deployments VALUES ('fraud', ?, 4, ?)", (traffic, NOW.isoformat())
        )
        conn.close()
        store = SqliteRegistryStore(db)
        await store.open()
        try:
            [revision] = await store.list_deployment_revisions("fraud", before=None, limit=10)
            assert revision.deployment == await store.get_deployment("fraud")
            assert revision.deployment.revision == 4
            assert (await store.current_revisions(None))[1] == revision.sequence
            assert query(db, "SELECT stage FROM model_versions") == [("development",)]
        finally:
            await store.close()

    async def test_file_is_in_wal_mode(self, store: SqliteRegistryStore, tmp_path: Path) -> None:
        """The database runs in WAL mode, so readers do not block the writer."""
        assert query(tmp_path / "data" / "registry.db", "PRAGMA journal_mode") == [("wal",)]

    async def test_newer_schema_is_refused(self, tmp_path: Path) -> None:
        """A database migrated by a newer build is not opened by this one."""
        db = tmp_path / "registry.db"
        store = SqliteRegistryStore(db)
        await store.open()
        await store.close()
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("INSERT INTO schema_migrations VALUES (999, 'later')")
        conn.close()
        with pytest.raises(FailedPreconditionError) as info:
            await SqliteRegistryStore(db).open()
        assert info.value.reason == "SCHEMA_TOO_NEW"

    async def test_calls_before_open_are_unavailable(self, tmp_path: Path) -> None:
        """A store that is not open answers UNAVAILABLE instead of touching the disk."""
        store = SqliteRegistryStore(tmp_path / "registry.db")
        with pytest.raises(UnavailableError):
            await store.get_model("fraud")
        assert not (tmp_path / "registry.db").exists()


class TestModelsAndVersions:
    async def test_model_round_trips(self, store: SqliteRegistryStore) -> None:
        """A created model reads back equal, creation time to the microsecond."""
        assert await store.get_model("fraud") == Model("fraud", "card fraud", NOW)
        assert await store.get_model("churn") is None

    async def test_duplicate_model_is_already_exists(self, store: SqliteRegistryStore) -> None:
        """A second model with the same id is refused, and the first one is unchanged."""
        with pytest.raises(AlreadyExistsError):
            await store.create_model(Model("fraud", "other", NOW), change())
        model = await store.get_model("fraud")
        assert model is not None and model.description == "card fraud"

    async def test_version_round_trips(self, store: SqliteRegistryStore) -> None:
        """A version reads back equal, its signature included."""
        created = await add_version(store)
        assert created.version == 1
        assert await store.get_model_version("fraud", 1) == created

    async def test_version_of_unknown_model_is_not_found(self, store: SqliteRegistryStore) -> None:
        """A version for a model that does not exist is refused and not written."""
        with pytest.raises(NotFoundError):
            await add_version(store, "churn")
        assert await store.list_model_versions("churn", before=None, limit=10) == []

    async def test_numbers_are_per_model_and_never_repeat(self, store: SqliteRegistryStore) -> None:
        """Concurrent inserts number a model's versions 1..n; another model starts again at 1."""
        await store.create_model(Model("churn", "", NOW), change())
        created = await asyncio.gather(*(add_version(store) for _ in range(20)))
        assert sorted(v.version for v in created) == list(range(1, 21))
        assert (await add_version(store, "churn")).version == 1

    async def test_list_pages_backwards(self, store: SqliteRegistryStore) -> None:
        """Listing returns versions below `before`, newest first, at most `limit`."""
        for _ in range(5):
            await add_version(store)
        listed = await store.list_model_versions("fraud", before=None, limit=2)
        assert [v.version for v in listed] == [5, 4]
        listed = await store.list_model_versions("fraud", before=4, limit=10)
        assert [v.version for v in listed] == [3, 2, 1]


class TestDeployments:
    async def test_put_creates_then_changes(self, store: SqliteRegistryStore) -> None:
        """allow_missing creates at revision 1; a different split is revision 2; the same split is no change."""
        await add_version(store)
        await add_version(store)
        one = (TrafficTarget("fraud", 1, 100),)
        created, changed = await store.put_deployment(
            "fraud", one, allow_missing=True, change=change(NOW)
        )
        assert (created.revision, changed) == (1, True)
        split = (TrafficTarget("fraud", 1, 80), TrafficTarget("fraud", 2, 20))
        later = NOW + timedelta(seconds=1)
        updated, changed = await store.put_deployment(
            "fraud", split, allow_missing=False, change=change(later)
        )
        assert (updated.revision, changed, updated.update_time) == (2, True, later)
        same, changed = await store.put_deployment(
            "fraud", split[::-1], allow_missing=False, change=change(later + timedelta(seconds=1))
        )
        assert (same, changed) == (updated, False)
        assert await store.get_deployment("fraud") == updated

    async def test_missing_target_changes_nothing(self, store: SqliteRegistryStore) -> None:
        """A split naming a version that does not exist is refused whole."""
        await add_version(store)
        split = (TrafficTarget("fraud", 1, 50), TrafficTarget("fraud", 2, 50))
        with pytest.raises(NotFoundError) as info:
            await store.put_deployment("fraud", split, allow_missing=True, change=change(NOW))
        assert info.value.metadata == {"name": "models/fraud/versions/2"}
        assert await store.get_deployment("fraud") is None

    async def test_missing_deployment_needs_allow_missing(self, store: SqliteRegistryStore) -> None:
        """Without allow_missing, a deployment that does not exist is not created."""
        await add_version(store)
        with pytest.raises(NotFoundError) as info:
            await store.put_deployment(
                "fraud", (TrafficTarget("fraud", 1, 100),), allow_missing=False, change=change(NOW)
            )
        assert info.value.reason == "DEPLOYMENT_NOT_FOUND"
        assert await store.get_deployment("fraud") is None
