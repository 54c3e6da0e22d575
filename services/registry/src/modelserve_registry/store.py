"""The registry's records: models, versions and deployments in SQLite, with schema migrations."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar

import structlog

from modelserve_registry.convert import signature_from_bytes, signature_to_bytes
from modelserve_registry.resources import (
    ArtifactFormat,
    Deployment,
    Model,
    ModelVersion,
    Signature,
    TrafficTarget,
)
from modelserve_runtime.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
)

log = structlog.get_logger()

T = TypeVar("T")

#: Schema changes in order; each runs once, in its own transaction, when the store opens.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE models (
                model_id TEXT PRIMARY KEY,
                description TEXT NOT NULL,
                create_time TEXT NOT NULL
            ) STRICT""",
            """CREATE TABLE model_versions (
                model_id TEXT NOT NULL REFERENCES models (model_id),
                version INTEGER NOT NULL CHECK (version >= 1),
                description TEXT NOT NULL,
                format TEXT NOT NULL,
                signature BLOB NOT NULL,
                artifact_uri TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                size_bytes INTEGER NOT NULL,
                create_time TEXT NOT NULL,
                PRIMARY KEY (model_id, version)
            ) STRICT""",
            """CREATE TABLE deployments (
                deployment_id TEXT PRIMARY KEY,
                traffic TEXT NOT NULL,
                revision INTEGER NOT NULL CHECK (revision >= 1),
                update_time TEXT NOT NULL
            ) STRICT""",
        ),
    ),
)

_VERSION_COLUMNS = "model_id, version, description, format, signature, artifact_uri, sha256, size_bytes, create_time"


class RegistryStore(Protocol):
    """Durable records of models, versions and deployments.

    Writes that must see a consistent state (allocating a version number, checking the
    targets of a deployment) run in one transaction inside the store.
    """

    async def open(self) -> None:
        """Opens the store and brings its schema up to date; opening twice is harmless."""
        ...

    async def close(self) -> None:
        """Closes the store."""
        ...

    async def create_model(self, model: Model) -> None:
        """Records a new model; AlreadyExistsError when the id is taken."""
        ...

    async def get_model(self, model_id: str) -> Model | None:
        """The model, or None."""
        ...

    async def create_model_version(
        self,
        *,
        model_id: str,
        description: str,
        format: ArtifactFormat,
        signature: Signature,
        artifact_uri: str,
        sha256: str,
        size_bytes: int,
        create_time: datetime,
    ) -> ModelVersion:
        """Records a version numbered one past the model's newest; NotFoundError without the model."""
        ...

    async def get_model_version(self, model_id: str, version: int) -> ModelVersion | None:
        """The version, or None."""
        ...

    async def list_model_versions(
        self, model_id: str, *, before: int | None, limit: int
    ) -> list[ModelVersion]:
        """Up to `limit` versions numbered below `before` (all when None), newest first."""
        ...

    async def get_deployment(self, deployment_id: str) -> Deployment | None:
        """The deployment, or None."""
        ...

    async def put_deployment(
        self,
        deployment_id: str,
        traffic: Sequence[TrafficTarget],
        *,
        allow_missing: bool,
        update_time: datetime,
    ) -> tuple[Deployment, bool]:
        """Sets a deployment's traffic; returns it and whether it changed.

        The revision goes up by one on every change; setting the traffic it already has
        changes nothing.

        NotFoundError when a target version does not exist, or when the deployment does
        not exist and `allow_missing` is false.
        """
        ...


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE takes the write lock up front, so reads inside see what the write acts on."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _model_not_found(model_id: str) -> NotFoundError:
    return NotFoundError(
        f"model models/{model_id} does not exist",
        reason="MODEL_NOT_FOUND",
        metadata={"name": f"models/{model_id}"},
    )


def _version_from_row(row: sqlite3.Row) -> ModelVersion:
    return ModelVersion(
        model_id=row["model_id"],
        version=row["version"],
        description=row["description"],
        format=ArtifactFormat(row["format"]),
        signature=signature_from_bytes(row["signature"]),
        artifact_uri=row["artifact_uri"],
        sha256=row["sha256"],
        size_bytes=row["size_bytes"],
        create_time=_time(row["create_time"]),
    )


def _traffic_to_json(traffic: Sequence[TrafficTarget]) -> str:
    return json.dumps(
        [{"model": t.model_id, "version": t.version, "percent": t.percent} for t in traffic]
    )


def _traffic_from_json(text: str) -> tuple[TrafficTarget, ...]:
    return tuple(TrafficTarget(t["model"], t["version"], t["percent"]) for t in json.loads(text))


def _deployment_from_row(row: sqlite3.Row) -> Deployment:
    return Deployment(
        deployment_id=row["deployment_id"],
        traffic=_traffic_from_json(row["traffic"]),
        revision=row["revision"],
        update_time=_time(row["update_time"]),
    )


class SqliteRegistryStore:
    """A RegistryStore in one SQLite file (WAL, synchronous=NORMAL, foreign keys on).

    One connection, used only from one dedicated thread: calls queue up there in order,
    the event loop never blocks on the disk, and no two statements interleave.
    """

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        executor = self._executor
        if executor is None:
            raise UnavailableError("the registry store is not open", reason="STORE_NOT_OPEN")

        def run() -> T:
            if self._conn is None:
                raise UnavailableError("the registry store is not open", reason="STORE_NOT_OPEN")
            return work(self._conn)

        return await asyncio.get_running_loop().run_in_executor(executor, run)

    async def open(self) -> None:
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-sqlite")
        try:
            applied = await asyncio.get_running_loop().run_in_executor(executor, self._open)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor
        log.info("registry_store_opened", path=str(self._path), migrations_applied=applied)

    def _open(self) -> list[int]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; each write says BEGIN itself.
        conn = sqlite3.connect(self._path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise UnavailableError(f"{self._path}: cannot switch to WAL (journal_mode={mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            applied = _migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return applied

    async def close(self) -> None:
        executor = self._executor
        if executor is None:
            return
        self._executor = None

        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(executor, close)
        executor.shutdown(wait=False)

    async def create_model(self, model: Model) -> None:
        def work(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "INSERT INTO models (model_id, description, create_time) VALUES (?, ?, ?)"
                " ON CONFLICT (model_id) DO NOTHING",
                (model.model_id, model.description, model.create_time.isoformat()),
            )
            return cursor.rowcount

        if await self._call(work) == 0:
            raise AlreadyExistsError(
                f"model {model.name} already exists",
                reason="MODEL_ALREADY_EXISTS",
                metadata={"name": model.name},
            )

    async def get_model(self, model_id: str) -> Model | None:
        def work(conn: sqlite3.Connection) -> Model | None:
            row = conn.execute(
                "SELECT model_id, description, create_time FROM models WHERE model_id = ?",
                (model_id,),
            ).fetchone()
            if row is None:
                return None
            return Model(row["model_id"], row["description"], _time(row["create_time"]))

        return await self._call(work)

    async def create_model_version(
        self,
        *,
        model_id: str,
        description: str,
        format: ArtifactFormat,
        signature: Signature,
        artifact_uri: str,
        sha256: str,
        size_bytes: int,
        create_time: datetime,
    ) -> ModelVersion:
        signature_bytes = signature_to_bytes(signature)

        def work(conn: sqlite3.Connection) -> ModelVersion:
            with _transaction(conn):
                if (
                    conn.execute("SELECT 1 FROM models WHERE model_id = ?", (model_id,)).fetchone()
                    is None
                ):
                    raise _model_not_found(model_id)
                # The number is allocated in the statement that inserts the row, inside the
                # write transaction, so two uploads can never get the same one.
                row = conn.execute(
                    f"INSERT INTO model_versions ({_VERSION_COLUMNS})"
                    " SELECT ?, COALESCE(MAX(version), 0) + 1, ?, ?, ?, ?, ?, ?, ?"
                    " FROM model_versions WHERE model_id = ?"
                    f" RETURNING {_VERSION_COLUMNS}",
                    (
                        model_id,
                        description,
                        format.value,
                        signature_bytes,
                        artifact_uri,
                        sha256,
                        size_bytes,
                        create_time.isoformat(),
                        model_id,
                    ),
                ).fetchone()
                return _version_from_row(row)

        return await self._call(work)

    async def get_model_version(self, model_id: str, version: int) -> ModelVersion | None:
        def work(conn: sqlite3.Connection) -> ModelVersion | None:
            row = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE model_id = ? AND version = ?",
                (model_id, version),
            ).fetchone()
            return None if row is None else _version_from_row(row)

        return await self._call(work)

    async def list_model_versions(
        self, model_id: str, *, before: int | None, limit: int
    ) -> list[ModelVersion]:
        def work(conn: sqlite3.Connection) -> list[ModelVersion]:
            rows = conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM model_versions"
                " WHERE model_id = ? AND (? IS NULL OR version < ?)"
                " ORDER BY version DESC LIMIT ?",
                (model_id, before, before, limit),
            ).fetchall()
            return [_version_from_row(row) for row in rows]

        return await self._call(work)

    async def get_deployment(self, deployment_id: str) -> Deployment | None:
        def work(conn: sqlite3.Connection) -> Deployment | None:
            row = conn.execute(
                "SELECT deployment_id, traffic, revision, update_time FROM deployments"
                " WHERE deployment_id = ?",
                (deployment_id,),
            ).fetchone()
            return None if row is None else _deployment_from_row(row)

        return await self._call(work)

    async def put_deployment(
        self,
        deployment_id: str,
        traffic: Sequence[TrafficTarget],
        *,
        allow_missing: bool,
        update_time: datetime,
    ) -> tuple[Deployment, bool]:
        targets = tuple(traffic)

        def work(conn: sqlite3.Connection) -> tuple[Deployment, bool]:
            with _transaction(conn):
                for target in targets:
                    found = conn.execute(
                        "SELECT 1 FROM model_versions WHERE model_id = ? AND version = ?",
                        (target.model_id, target.version),
                    ).fetchone()
                    if found is None:
                        raise NotFoundError(
                            f"model version {target.model_version} does not exist",
                            reason="MODEL_VERSION_NOT_FOUND",
                            metadata={"name": target.model_version},
                        )
                row = conn.execute(
                    "SELECT deployment_id, traffic, revision, update_time FROM deployments"
                    " WHERE deployment_id = ?",
                    (deployment_id,),
                ).fetchone()
                if row is None and not allow_missing:
                    raise NotFoundError(
                        f"deployment deployments/{deployment_id} does not exist",
                        reason="DEPLOYMENT_NOT_FOUND",
                        metadata={"name": f"deployments/{deployment_id}"},
                    )
                if row is not None:
                    current = _deployment_from_row(row)
                    # Order carries no meaning in a traffic split; only a real change is a
                    # new revision, so watchers do not converge on nothing.
                    if set(current.traffic) == set(targets):
                        return current, False
                    revision = current.revision + 1
                else:
                    revision = 1
                conn.execute(
                    "INSERT INTO deployments (deployment_id, traffic, revision, update_time)"
                    " VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (deployment_id) DO UPDATE SET"
                    " traffic = excluded.traffic, revision = excluded.revision,"
                    " update_time = excluded.update_time",
                    (deployment_id, _traffic_to_json(targets), revision, update_time.isoformat()),
                )
                return Deployment(deployment_id, targets, revision, update_time), True

        return await self._call(work)


def _migrate(conn: sqlite3.Connection) -> list[int]:
    """Applies the migrations this database lacks; returns their numbers."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, applied_time TEXT NOT NULL) STRICT"
    )
    known = MIGRATIONS[-1][0]
    applied: list[int] = []
    for number, statements in MIGRATIONS:
        with _transaction(conn):
            current = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
            ).fetchone()[0]
            if current > known:
                raise FailedPreconditionError(
                    f"the database schema is at version {current}, newer than this build's {known}",
                    reason="SCHEMA_TOO_NEW",
                )
            if number <= current:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_time) VALUES (?, ?)",
                (number, datetime.now(UTC).isoformat()),
            )
            applied.append(number)
    return applied
