"""The registry's records in SQLite, with schema migrations: models, versions, deployments, audit."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
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
    Approval,
    ArtifactFormat,
    AuditEvent,
    Change,
    Deployment,
    DeploymentRevision,
    Model,
    ModelVersion,
    Rollout,
    RolloutState,
    RoutingPolicy,
    Signature,
    Stage,
    TrafficTarget,
    VersionRef,
)
from modelserve_runtime.errors import (
    AbortedError,
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
    (
        2,
        (
            # Every state a deployment has had; `sequence` orders them across deployments,
            # so a watcher can resume after the last one it saw.
            """CREATE TABLE deployment_revisions (
                sequence INTEGER PRIMARY KEY AUTOINCREMENT,
                deployment_id TEXT NOT NULL,
                revision INTEGER NOT NULL CHECK (revision >= 1),
                traffic TEXT NOT NULL,
                principal TEXT NOT NULL,
                reason TEXT NOT NULL,
                restored_revision INTEGER NOT NULL,
                create_time TEXT NOT NULL,
                UNIQUE (deployment_id, revision)
            ) STRICT""",
            """INSERT INTO deployment_revisions
                (deployment_id, revision, traffic, principal, reason, restored_revision,
                 create_time)
               SELECT deployment_id, revision, traffic, '', 'recorded before revision history',
                      0, update_time
               FROM deployments ORDER BY update_time""",
            """CREATE TABLE audit_events (
                event_id INTEGER PRIMARY KEY AUTOINCREMENT,
                create_time TEXT NOT NULL,
                principal TEXT NOT NULL,
                action TEXT NOT NULL,
                resource TEXT NOT NULL,
                reason TEXT NOT NULL,
                details TEXT NOT NULL
            ) STRICT""",
            "CREATE INDEX audit_events_by_resource ON audit_events (resource, event_id)",
            "ALTER TABLE model_versions ADD COLUMN stage TEXT NOT NULL DEFAULT 'development'",
            """CREATE TABLE approvals (
                model_id TEXT NOT NULL,
                version INTEGER NOT NULL,
                principal TEXT NOT NULL,
                reason TEXT NOT NULL,
                create_time TEXT NOT NULL,
                PRIMARY KEY (model_id, version, principal),
                FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
            ) STRICT""",
            """CREATE TABLE model_aliases (
                model_id TEXT NOT NULL,
                alias TEXT NOT NULL,
                version INTEGER NOT NULL,
                PRIMARY KEY (model_id, alias),
                FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
            ) STRICT""",
        ),
    ),
    (
        3,
        (
            # Sticky routing key, salt and shadow versions, as JSON; '{}' is none of them.
            "ALTER TABLE deployments ADD COLUMN policy TEXT NOT NULL DEFAULT '{}'",
            "ALTER TABLE deployment_revisions ADD COLUMN policy TEXT NOT NULL DEFAULT '{}'",
        ),
    ),
    (
        4,
        (
            # Labels and tags as JSON objects; validation set, version extras and the latest
            # validation run as serialized messages (empty: none).
            "ALTER TABLE models ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",
            "ALTER TABLE models ADD COLUMN validation_set BLOB NOT NULL DEFAULT x''",
            "ALTER TABLE model_versions ADD COLUMN extras BLOB NOT NULL DEFAULT x''",
            "ALTER TABLE model_versions ADD COLUMN tags TEXT NOT NULL DEFAULT '{}'",
            "ALTER TABLE model_versions ADD COLUMN validation BLOB NOT NULL DEFAULT x''",
            """CREATE TABLE rollouts (
                deployment_id TEXT NOT NULL,
                rollout_id INTEGER NOT NULL CHECK (rollout_id >= 1),
                stable_model TEXT NOT NULL,
                stable_version INTEGER NOT NULL,
                candidate_model TEXT NOT NULL,
                candidate_version INTEGER NOT NULL,
                strategy BLOB NOT NULL,
                state TEXT NOT NULL,
                step INTEGER NOT NULL,
                candidate_percent INTEGER NOT NULL,
                step_start_time TEXT NOT NULL,
                last_gate BLOB NOT NULL,
                reason TEXT NOT NULL,
                waiting_since TEXT,
                create_time TEXT NOT NULL,
                update_time TEXT NOT NULL,
                PRIMARY KEY (deployment_id, rollout_id)
            ) STRICT""",
            "CREATE INDEX rollouts_by_state ON rollouts (state)",
        ),
    ),
)

_VERSION_COLUMNS = (
    "model_id, version, description, format, signature, artifact_uri, sha256, size_bytes,"
    " create_time, stage, extras, tags, validation"
)
_MODEL_COLUMNS = "model_id, description, create_time, labels, validation_set"
_ROLLOUT_VALUES_ORDER = (
    "deployment_id",
    "rollout_id",
    "stable_model",
    "stable_version",
    "candidate_model",
    "candidate_version",
    "strategy",
    "state",
    "step",
    "candidate_percent",
    "step_start_time",
    "last_gate",
    "reason",
    "waiting_since",
    "create_time",
    "update_time",
)
_ROLLOUT_COLUMNS = ", ".join(_ROLLOUT_VALUES_ORDER)
_REVISION_COLUMNS = (
    "sequence, deployment_id, revision, traffic, principal, reason, restored_revision, create_time,"
    " policy"
)


class RegistryStore(Protocol):
    """Durable records of models, versions, deployments and the audit trail.

    Writes that must see a consistent state (allocating a version number, checking the
    targets of a deployment, moving a stage) run in one transaction inside the store, and
    each change writes its audit event in that same transaction: no change without its
    record, no record without its change.
    """

    async def open(self) -> None:
        """Opens the store and brings its schema up to date; opening twice is harmless."""
        ...

    async def close(self) -> None:
        """Closes the store."""
        ...

    async def create_model(self, model: Model, change: Change) -> None:
        """Records a new model; AlreadyExistsError when the id is taken."""
        ...

    async def get_model(self, model_id: str) -> Model | None:
        """The model, or None."""
        ...

    async def list_models(self, *, after: str | None, limit: int) -> list[Model]:
        """Up to `limit` models with ids after `after` (all when None), by id."""
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
        change: Change,
        extras: bytes = b"",
        tags: Sequence[tuple[str, str]] = (),
        parent: VersionRef | None = None,
    ) -> ModelVersion:
        """Records a version numbered one past the model's newest; NotFoundError without the
        model or without the `parent` version when one is named."""
        ...

    async def get_model_version(self, model_id: str, version: int) -> ModelVersion | None:
        """The version with its stage, aliases and approvals, or None."""
        ...

    async def list_model_versions(
        self, model_id: str, *, before: int | None, limit: int
    ) -> list[ModelVersion]:
        """Up to `limit` versions numbered below `before` (all when None), newest first."""
        ...

    async def set_stage(
        self, model_id: str, version: int, *, expected: Stage, stage: Stage, change: Change
    ) -> ModelVersion:
        """Moves a version from `expected` to `stage`; FailedPreconditionError when its stage
        is no longer `expected` (another change came first)."""
        ...

    async def add_approval(self, model_id: str, version: int, change: Change) -> ModelVersion:
        """Records `change.principal`'s approval; approving twice changes nothing."""
        ...

    async def set_alias(self, model_id: str, alias: str, version: int, change: Change) -> None:
        """Points the model's `alias` at `version`."""
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
        change: Change,
        restored_revision: int = 0,
        policy: RoutingPolicy = RoutingPolicy(),
        expected_revision: int | None = None,
        production_only: bool = False,
    ) -> tuple[Deployment, bool]:
        """Sets a deployment's traffic and routing policy as a new revision; returns it and
        whether it changed. Refused while a rollout is in progress on it; with
        `expected_revision`, ABORTED unless the deployment is still at that revision; with
        `production_only`, FAILED_PRECONDITION when a target with traffic is not in PRODUCTION.

        The revision goes up by one on every change; setting the traffic and policy it
        already has changes nothing.

        NotFoundError when a target or shadow version does not exist, or when the deployment
        does not exist and `allow_missing` is false.
        """
        ...

    async def get_deployment_revision(
        self, deployment_id: str, revision: int
    ) -> DeploymentRevision | None:
        """One revision of a deployment, or None."""
        ...

    async def list_deployment_revisions(
        self, deployment_id: str, *, before: int | None, limit: int
    ) -> list[DeploymentRevision]:
        """Up to `limit` revisions numbered below `before` (all when None), newest first."""
        ...

    async def current_revisions(
        self, deployment_id: str | None
    ) -> tuple[list[DeploymentRevision], int]:
        """The newest revision of each deployment (or of the one named), and the newest
        sequence of all, read together."""
        ...

    async def revisions_after(
        self, sequence: int, deployment_id: str | None, *, limit: int
    ) -> list[DeploymentRevision]:
        """Up to `limit` revisions with a sequence above `sequence`, oldest first."""
        ...

    async def update_model(
        self,
        model_id: str,
        *,
        description: str | None,
        labels: Sequence[tuple[str, str]] | None,
        validation_set: bytes | None,
        change: Change,
    ) -> Model:
        """Writes the fields that are not None; audited when something changed."""
        ...

    async def delete_model(self, model_id: str, *, force: bool, change: Change) -> list[str]:
        """Deletes a model and its versions; returns the artifact URIs no version uses any more.
        Refused while a deployment references the model, or one of its versions is in
        PRODUCTION unless `force`."""
        ...

    async def referenced_artifacts(self) -> set[str]:
        """The artifact URIs some version uses."""
        ...

    async def update_model_version(
        self,
        model_id: str,
        version: int,
        *,
        description: str | None,
        tags: Sequence[tuple[str, str]] | None,
        change: Change,
    ) -> ModelVersion:
        """Writes the mutable fields that are not None; audited when something changed."""
        ...

    async def record_validation(
        self, model_id: str, version: int, run: bytes, details: dict[str, str], change: Change
    ) -> ModelVersion:
        """Stores a version's latest validation run (a serialized ValidationRun), audited."""
        ...

    async def start_rollout(
        self,
        rollout: Rollout,
        traffic: Sequence[TrafficTarget],
        *,
        stable_revision: int,
        production_only: bool,
        change: Change,
    ) -> tuple[Rollout, Deployment]:
        """Numbers and records a rollout and sets the deployment's traffic to its first step,
        in one transaction; refused when another rollout is in progress or the deployment
        moved past `stable_revision`."""
        ...

    async def get_rollout(self, deployment_id: str, rollout_id: int) -> Rollout | None:
        """The rollout, or None."""
        ...

    async def list_rollouts(
        self, deployment_id: str, *, before: int | None, limit: int
    ) -> list[Rollout]:
        """Up to `limit` rollouts numbered below `before` (all when None), newest first."""
        ...

    async def running_rollouts(self) -> list[Rollout]:
        """Every RUNNING rollout, the controller's work."""
        ...

    async def save_rollout(
        self,
        rollout: Rollout,
        *,
        expected: Rollout,
        change: Change,
        traffic: Sequence[TrafficTarget] | None = None,
        audit: bool = True,
    ) -> tuple[Rollout, Deployment | None]:
        """Replaces a rollout that is still as `expected` (ABORTED otherwise), with its
        deployment's traffic set to `traffic` as a new revision in the same transaction."""
        ...

    async def list_audit_events(
        self, resource: str | None, *, before: int | None, limit: int
    ) -> list[AuditEvent]:
        """Up to `limit` events on `resource` or below it (all when None) with ids below
        `before` (all when None), newest first."""
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


def _version_not_found(model_id: str, version: int) -> NotFoundError:
    name = f"models/{model_id}/versions/{version}"
    return NotFoundError(
        f"model version {name} does not exist",
        reason="MODEL_VERSION_NOT_FOUND",
        metadata={"name": name},
    )


def _audit(
    conn: sqlite3.Connection, change: Change, resource: str, details: dict[str, str]
) -> None:
    conn.execute(
        "INSERT INTO audit_events (create_time, principal, action, resource, reason, details)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            change.time.isoformat(),
            change.principal,
            change.action,
            resource,
            change.reason,
            json.dumps(details, sort_keys=True),
        ),
    )


def _read_version(conn: sqlite3.Connection, row: sqlite3.Row) -> ModelVersion:
    """A version row with its aliases and approvals."""
    key = (row["model_id"], row["version"])
    aliases = tuple(
        r["alias"]
        for r in conn.execute(
            "SELECT alias FROM model_aliases WHERE model_id = ? AND version = ? ORDER BY alias",
            key,
        )
    )
    approvals = tuple(
        Approval(r["principal"], r["reason"], _time(r["create_time"]))
        for r in conn.execute(
            "SELECT principal, reason, create_time FROM approvals"
            " WHERE model_id = ? AND version = ? ORDER BY create_time, principal",
            key,
        )
    )
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
        stage=Stage(row["stage"]),
        aliases=aliases,
        approvals=approvals,
        extras=row["extras"],
        tags=_pairs_from_json(row["tags"]),
        validation=row["validation"],
    )


def pairs_to_json(pairs: Sequence[tuple[str, str]]) -> str:
    """Labels or tags as the JSON object they are stored (and audited) as."""
    return json.dumps(dict(pairs), sort_keys=True)


def _pairs_from_json(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(json.loads(text).items()))


def parent_key(ref: VersionRef) -> tuple[str, int]:
    """A version reference as the (model id, version) key of its row."""
    return ref.model_id, ref.version


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_model(row: sqlite3.Row) -> Model:
    return Model(
        model_id=row["model_id"],
        description=row["description"],
        create_time=_time(row["create_time"]),
        labels=_pairs_from_json(row["labels"]),
        validation_set=row["validation_set"],
    )


def _read_rollout(row: sqlite3.Row) -> Rollout:
    return Rollout(
        deployment_id=row["deployment_id"],
        rollout_id=row["rollout_id"],
        stable=VersionRef(row["stable_model"], row["stable_version"]),
        candidate=VersionRef(row["candidate_model"], row["candidate_version"]),
        strategy=row["strategy"],
        state=RolloutState(row["state"]),
        step=row["step"],
        candidate_percent=row["candidate_percent"],
        step_start_time=_time(row["step_start_time"]),
        create_time=_time(row["create_time"]),
        update_time=_time(row["update_time"]),
        last_gate=row["last_gate"],
        reason=row["reason"],
        waiting_since=None if row["waiting_since"] is None else _time(row["waiting_since"]),
    )


def _rollout_values(rollout: Rollout) -> tuple[object, ...]:
    """The rollout's columns in `_ROLLOUT_COLUMNS` order."""
    return (
        rollout.deployment_id,
        rollout.rollout_id,
        rollout.stable.model_id,
        rollout.stable.version,
        rollout.candidate.model_id,
        rollout.candidate.version,
        rollout.strategy,
        rollout.state.value,
        rollout.step,
        rollout.candidate_percent,
        rollout.step_start_time.isoformat(),
        rollout.last_gate,
        rollout.reason,
        None if rollout.waiting_since is None else rollout.waiting_since.isoformat(),
        rollout.create_time.isoformat(),
        rollout.update_time.isoformat(),
    )


def _select_version(conn: sqlite3.Connection, model_id: str, version: int) -> ModelVersion | None:
    row = conn.execute(
        f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE model_id = ? AND version = ?",
        (model_id, version),
    ).fetchone()
    return None if row is None else _read_version(conn, row)


def traffic_to_json(traffic: Sequence[TrafficTarget]) -> str:
    """Traffic as the JSON it is stored (and audited) as."""
    return json.dumps(
        [{"model": t.model_id, "version": t.version, "percent": t.percent} for t in traffic]
    )


def _traffic_from_json(text: str) -> tuple[TrafficTarget, ...]:
    return tuple(TrafficTarget(t["model"], t["version"], t["percent"]) for t in json.loads(text))


def policy_to_json(policy: RoutingPolicy) -> str:
    """A routing policy as the JSON it is stored (and audited) as; '{}' when it is empty."""
    stored: dict[str, object] = {}
    if policy.routing_key:
        stored["routing_key"] = policy.routing_key
    if policy.salt:
        stored["salt"] = policy.salt
    if policy.shadow:
        stored["shadow"] = [{"model": v.model_id, "version": v.version} for v in policy.shadow]
    if policy.fallback is not None:
        stored["fallback"] = {"model": policy.fallback.model_id, "version": policy.fallback.version}
    if policy.default_outputs:
        stored["default_outputs"] = [base64.b64encode(t).decode() for t in policy.default_outputs]
    for field in ("inference", "hybrid", "strategy"):
        value: bytes = getattr(policy, field)
        if value:
            stored[field] = base64.b64encode(value).decode()
    return json.dumps(stored)


def _policy_from_json(text: str) -> RoutingPolicy:
    stored = json.loads(text)
    return RoutingPolicy(
        routing_key=stored.get("routing_key", ""),
        salt=stored.get("salt", ""),
        shadow=tuple(VersionRef(v["model"], v["version"]) for v in stored.get("shadow", [])),
        fallback=(
            VersionRef(stored["fallback"]["model"], stored["fallback"]["version"])
            if "fallback" in stored
            else None
        ),
        default_outputs=tuple(base64.b64decode(t) for t in stored.get("default_outputs", [])),
        inference=base64.b64decode(stored.get("inference", "")),
        hybrid=base64.b64decode(stored.get("hybrid", "")),
        strategy=base64.b64decode(stored.get("strategy", "")),
    )


def _deployment_from_row(row: sqlite3.Row) -> Deployment:
    return Deployment(
        deployment_id=row["deployment_id"],
        traffic=_traffic_from_json(row["traffic"]),
        revision=row["revision"],
        update_time=_time(row["update_time"]),
        policy=_policy_from_json(row["policy"]),
    )


def _revision_from_row(row: sqlite3.Row) -> DeploymentRevision:
    return DeploymentRevision(
        deployment=Deployment(
            deployment_id=row["deployment_id"],
            traffic=_traffic_from_json(row["traffic"]),
            revision=row["revision"],
            update_time=_time(row["create_time"]),
            policy=_policy_from_json(row["policy"]),
        ),
        sequence=row["sequence"],
        principal=row["principal"],
        reason=row["reason"],
        restored_revision=row["restored_revision"],
    )


def concurrent_change(name: str, revision: int, expected_revision: int) -> AbortedError:
    """The error of a deployment change made against `expected_revision` when the deployment
    is at `revision` (0: it does not exist)."""
    now = f"revision {revision}" if revision else "it does not exist"
    against = f"revision {expected_revision}" if expected_revision else "its absence"
    return AbortedError(
        f"{name} changed ({now}; the change was made against {against}); read it again and retry",
        reason="CONCURRENT_CHANGE",
        metadata={
            "name": name,
            "revision": str(revision),
            "expected_revision": str(expected_revision),
        },
    )


def _put_deployment(
    conn: sqlite3.Connection,
    deployment_id: str,
    targets: tuple[TrafficTarget, ...],
    *,
    allow_missing: bool,
    change: Change,
    restored_revision: int,
    policy: RoutingPolicy,
    expected_revision: int | None,
    production_only: bool,
) -> tuple[Deployment, bool]:
    """Writes a deployment's new revision inside the caller's transaction.

    Every referenced version must exist; with `production_only`, each target with a share
    of traffic must be in PRODUCTION. With `expected_revision`, the deployment must still be
    at that revision (ABORTED otherwise): the caller merged its change into that one.
    """
    update_time = change.time
    needed = [(t.model_id, t.version) for t in targets]
    needed += [(v.model_id, v.version) for v in policy.shadow]
    if policy.fallback is not None:
        needed.append((policy.fallback.model_id, policy.fallback.version))
    for model_id, version in needed:
        found = conn.execute(
            "SELECT 1 FROM model_versions WHERE model_id = ? AND version = ?",
            (model_id, version),
        ).fetchone()
        if found is None:
            raise _version_not_found(model_id, version)
    if production_only:
        _check_production_targets(conn, targets)
    row = conn.execute(
        "SELECT deployment_id, traffic, revision, update_time, policy FROM deployments"
        " WHERE deployment_id = ?",
        (deployment_id,),
    ).fetchone()
    if row is None and not allow_missing:
        raise NotFoundError(
            f"deployment deployments/{deployment_id} does not exist",
            reason="DEPLOYMENT_NOT_FOUND",
            metadata={"name": f"deployments/{deployment_id}"},
        )
    if row is None and expected_revision:
        raise concurrent_change(f"deployments/{deployment_id}", 0, expected_revision)
    if row is not None:
        current = _deployment_from_row(row)
        if expected_revision is not None and current.revision != expected_revision:
            raise concurrent_change(
                f"deployments/{deployment_id}", current.revision, expected_revision
            )
        # Order carries no meaning in a traffic split; only a real change is a
        # new revision, so watchers do not converge on nothing.
        if set(current.traffic) == set(targets) and current.policy == policy:
            return current, False
        revision = current.revision + 1
    else:
        revision = 1
    traffic_json = traffic_to_json(targets)
    policy_json = policy_to_json(policy)
    conn.execute(
        "INSERT INTO deployments"
        " (deployment_id, traffic, revision, update_time, policy)"
        " VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (deployment_id) DO UPDATE SET"
        " traffic = excluded.traffic, revision = excluded.revision,"
        " update_time = excluded.update_time, policy = excluded.policy",
        (deployment_id, traffic_json, revision, update_time.isoformat(), policy_json),
    )
    conn.execute(
        f"INSERT INTO deployment_revisions ({_REVISION_COLUMNS})"
        " VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            deployment_id,
            revision,
            traffic_json,
            change.principal,
            change.reason,
            restored_revision,
            update_time.isoformat(),
            policy_json,
        ),
    )
    details = {"revision": str(revision), "traffic": traffic_json}
    if policy_json != "{}":
        details["policy"] = policy_json
    if restored_revision:
        details["restored_revision"] = str(restored_revision)
    _audit(conn, change, f"deployments/{deployment_id}", details)
    return Deployment(deployment_id, targets, revision, update_time, policy), True


def _check_production_targets(conn: sqlite3.Connection, targets: Sequence[TrafficTarget]) -> None:
    for target in targets:
        if target.percent == 0:
            continue
        row = conn.execute(
            "SELECT stage FROM model_versions WHERE model_id = ? AND version = ?",
            (target.model_id, target.version),
        ).fetchone()
        if row is not None and row["stage"] != Stage.PRODUCTION.value:
            stage = Stage(row["stage"]).name
            raise FailedPreconditionError(
                f"{target.model_version} is in {stage}; only an approved PRODUCTION version"
                " may take a share of production traffic",
                reason="NOT_IN_PRODUCTION",
                metadata={
                    "name": target.model_version,
                    "stage": stage,
                    "unmet_condition": "traffic only to PRODUCTION versions",
                },
            )


def _select_deployment(conn: sqlite3.Connection, deployment_id: str) -> Deployment | None:
    row = conn.execute(
        "SELECT deployment_id, traffic, revision, update_time, policy FROM deployments"
        " WHERE deployment_id = ?",
        (deployment_id,),
    ).fetchone()
    return None if row is None else _deployment_from_row(row)


def _deployment_not_found(deployment_id: str) -> NotFoundError:
    return NotFoundError(
        f"deployment deployments/{deployment_id} does not exist",
        reason="DEPLOYMENT_NOT_FOUND",
        metadata={"name": f"deployments/{deployment_id}"},
    )


def _rollout_not_found(name: str) -> NotFoundError:
    return NotFoundError(
        f"rollout {name} does not exist", reason="ROLLOUT_NOT_FOUND", metadata={"name": name}
    )


def _deployment_from_row_parts(row: sqlite3.Row) -> set[str]:
    """The model ids a deployment row references: traffic, shadow and fallback."""
    models = {t.model_id for t in _traffic_from_json(row["traffic"])}
    policy = _policy_from_json(row["policy"])
    models |= {v.model_id for v in policy.shadow}
    if policy.fallback is not None:
        models.add(policy.fallback.model_id)
    return models


def _rollout_details(rollout: Rollout) -> dict[str, str]:
    details = {
        "state": rollout.state.name,
        "step": str(rollout.step),
        "candidate_percent": str(rollout.candidate_percent),
        "stable_version": rollout.stable.model_version,
        "candidate_version": rollout.candidate.model_version,
    }
    if rollout.reason:
        details["why"] = rollout.reason
    return details


def _active_rollout(conn: sqlite3.Connection, deployment_id: str) -> Rollout | None:
    row = conn.execute(
        f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE deployment_id = ? AND state IN (?, ?)",
        (deployment_id, RolloutState.RUNNING.value, RolloutState.PAUSED.value),
    ).fetchone()
    return None if row is None else _read_rollout(row)


def _rollout_in_progress(deployment_id: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"deployments/{deployment_id} has a rollout in progress; abort it or let it finish"
        " before changing the deployment by hand",
        reason="ROLLOUT_IN_PROGRESS",
        metadata={"name": f"deployments/{deployment_id}"},
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

    async def create_model(self, model: Model, change: Change) -> None:
        def work(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                cursor = conn.execute(
                    f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (model_id) DO NOTHING",
                    (
                        model.model_id,
                        model.description,
                        model.create_time.isoformat(),
                        pairs_to_json(model.labels),
                        model.validation_set,
                    ),
                )
                if cursor.rowcount:
                    details = {"description": model.description}
                    if model.labels:
                        details["labels"] = pairs_to_json(model.labels)
                    if model.validation_set:
                        details["validation_set_sha256"] = _digest(model.validation_set)
                    _audit(conn, change, model.name, details)
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
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE model_id = ?", (model_id,)
            ).fetchone()
            return None if row is None else _read_model(row)

        return await self._call(work)

    async def list_models(self, *, after: str | None, limit: int) -> list[Model]:
        def work(conn: sqlite3.Connection) -> list[Model]:
            rows = conn.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models"
                " WHERE (? IS NULL OR model_id > ?) ORDER BY model_id LIMIT ?",
                (after, after, limit),
            ).fetchall()
            return [_read_model(r) for r in rows]

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
        change: Change,
        extras: bytes = b"",
        tags: Sequence[tuple[str, str]] = (),
        parent: VersionRef | None = None,
    ) -> ModelVersion:
        signature_bytes = signature_to_bytes(signature)

        def work(conn: sqlite3.Connection) -> ModelVersion:
            with _transaction(conn):
                if (
                    conn.execute("SELECT 1 FROM models WHERE model_id = ?", (model_id,)).fetchone()
                    is None
                ):
                    raise _model_not_found(model_id)
                if parent is not None and _select_version(conn, *parent_key(parent)) is None:
                    raise _version_not_found(parent.model_id, parent.version)
                # The number is allocated in the statement that inserts the row, inside the
                # write transaction, so two uploads can never get the same one.
                row = conn.execute(
                    f"INSERT INTO model_versions ({_VERSION_COLUMNS})"
                    " SELECT ?, COALESCE(MAX(version), 0) + 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, x''"
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
                        change.time.isoformat(),
                        Stage.DEVELOPMENT.value,
                        extras,
                        pairs_to_json(tags),
                        model_id,
                    ),
                ).fetchone()
                version = _read_version(conn, row)
                _audit(
                    conn,
                    change,
                    version.name,
                    {"sha256": sha256, "size_bytes": str(size_bytes), "artifact_uri": artifact_uri},
                )
                return version

        return await self._call(work)

    async def get_model_version(self, model_id: str, version: int) -> ModelVersion | None:
        return await self._call(lambda conn: _select_version(conn, model_id, version))

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
            return [_read_version(conn, row) for row in rows]

        return await self._call(work)

    async def set_stage(
        self, model_id: str, version: int, *, expected: Stage, stage: Stage, change: Change
    ) -> ModelVersion:
        def work(conn: sqlite3.Connection) -> ModelVersion:
            with _transaction(conn):
                cursor = conn.execute(
                    "UPDATE model_versions SET stage = ?"
                    " WHERE model_id = ? AND version = ? AND stage = ?",
                    (stage.value, model_id, version, expected.value),
                )
                current = _select_version(conn, model_id, version)
                if current is None:
                    raise _version_not_found(model_id, version)
                if cursor.rowcount == 0:
                    raise FailedPreconditionError(
                        f"{current.name} is in {current.stage.name}, no longer in {expected.name}",
                        reason="STAGE_CHANGED",
                        metadata={"name": current.name, "stage": current.stage.name},
                    )
                _audit(
                    conn, change, current.name, {"from_stage": expected.name, "stage": stage.name}
                )
                return current

        return await self._call(work)

    async def add_approval(self, model_id: str, version: int, change: Change) -> ModelVersion:
        def work(conn: sqlite3.Connection) -> ModelVersion:
            with _transaction(conn):
                if _select_version(conn, model_id, version) is None:
                    raise _version_not_found(model_id, version)
                cursor = conn.execute(
                    "INSERT INTO approvals (model_id, version, principal, reason, create_time)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (model_id, version, change.principal, change.reason, change.time.isoformat()),
                )
                current = _select_version(conn, model_id, version)
                assert current is not None
                if cursor.rowcount:
                    _audit(conn, change, current.name, {"approved_for": Stage.PRODUCTION.name})
                return current

        return await self._call(work)

    async def set_alias(self, model_id: str, alias: str, version: int, change: Change) -> None:
        def work(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                if _select_version(conn, model_id, version) is None:
                    raise _version_not_found(model_id, version)
                previous = conn.execute(
                    "SELECT version FROM model_aliases WHERE model_id = ? AND alias = ?",
                    (model_id, alias),
                ).fetchone()
                if previous is not None and previous["version"] == version:
                    return
                conn.execute(
                    "INSERT INTO model_aliases (model_id, alias, version) VALUES (?, ?, ?)"
                    " ON CONFLICT (model_id, alias) DO UPDATE SET version = excluded.version",
                    (model_id, alias, version),
                )
                details = {"alias": alias}
                if previous is not None:
                    details["previous_version"] = f"models/{model_id}/versions/{previous[0]}"
                _audit(conn, change, f"models/{model_id}/versions/{version}", details)

        await self._call(work)

    async def get_deployment(self, deployment_id: str) -> Deployment | None:
        def work(conn: sqlite3.Connection) -> Deployment | None:
            row = conn.execute(
                "SELECT deployment_id, traffic, revision, update_time, policy FROM deployments"
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
        change: Change,
        restored_revision: int = 0,
        policy: RoutingPolicy = RoutingPolicy(),
        expected_revision: int | None = None,
        production_only: bool = False,
    ) -> tuple[Deployment, bool]:
        targets = tuple(traffic)

        def work(conn: sqlite3.Connection) -> tuple[Deployment, bool]:
            with _transaction(conn):
                if _active_rollout(conn, deployment_id) is not None:
                    raise _rollout_in_progress(deployment_id)
                return _put_deployment(
                    conn,
                    deployment_id,
                    targets,
                    allow_missing=allow_missing,
                    change=change,
                    restored_revision=restored_revision,
                    policy=policy,
                    expected_revision=expected_revision,
                    production_only=production_only,
                )

        return await self._call(work)

    async def update_model(
        self,
        model_id: str,
        *,
        description: str | None,
        labels: Sequence[tuple[str, str]] | None,
        validation_set: bytes | None,
        change: Change,
    ) -> Model:
        def work(conn: sqlite3.Connection) -> Model:
            with _transaction(conn):
                row = conn.execute(
                    f"SELECT {_MODEL_COLUMNS} FROM models WHERE model_id = ?", (model_id,)
                ).fetchone()
                if row is None:
                    raise _model_not_found(model_id)
                current = _read_model(row)
                details: dict[str, str] = {}
                if description is not None and description != current.description:
                    details["description"] = description
                if labels is not None and tuple(sorted(labels)) != current.labels:
                    details["labels"] = pairs_to_json(labels)
                if validation_set is not None and validation_set != current.validation_set:
                    details["validation_set_sha256"] = (
                        _digest(validation_set) if validation_set else ""
                    )
                if not details:
                    return current
                conn.execute(
                    "UPDATE models SET description = ?, labels = ?, validation_set = ?"
                    " WHERE model_id = ?",
                    (
                        current.description if description is None else description,
                        pairs_to_json(current.labels if labels is None else labels),
                        current.validation_set if validation_set is None else validation_set,
                        model_id,
                    ),
                )
                _audit(conn, change, current.name, details)
                row = conn.execute(
                    f"SELECT {_MODEL_COLUMNS} FROM models WHERE model_id = ?", (model_id,)
                ).fetchone()
                return _read_model(row)

        return await self._call(work)

    async def delete_model(self, model_id: str, *, force: bool, change: Change) -> list[str]:
        def work(conn: sqlite3.Connection) -> list[str]:
            with _transaction(conn):
                if (
                    conn.execute("SELECT 1 FROM models WHERE model_id = ?", (model_id,)).fetchone()
                    is None
                ):
                    raise _model_not_found(model_id)
                name = f"models/{model_id}"
                for row in conn.execute("SELECT deployment_id, traffic, policy FROM deployments"):
                    deployment = _deployment_from_row_parts(row)
                    if model_id in deployment:
                        raise FailedPreconditionError(
                            f"{name} cannot be deleted: deployments/{row['deployment_id']}"
                            " references its versions",
                            reason="MODEL_IN_USE",
                            metadata={
                                "name": name,
                                "deployment": f"deployments/{row['deployment_id']}",
                            },
                        )
                in_production = conn.execute(
                    "SELECT version FROM model_versions WHERE model_id = ? AND stage = ?"
                    " ORDER BY version LIMIT 1",
                    (model_id, Stage.PRODUCTION.value),
                ).fetchone()
                if in_production is not None and not force:
                    version = f"{name}/versions/{in_production[0]}"
                    raise FailedPreconditionError(
                        f"{name} cannot be deleted: {version} is in PRODUCTION (set force to"
                        " delete anyway)",
                        reason="MODEL_IN_PRODUCTION",
                        metadata={"name": name, "model_version": version},
                    )
                uris = [
                    r[0]
                    for r in conn.execute(
                        "SELECT DISTINCT artifact_uri FROM model_versions WHERE model_id = ?",
                        (model_id,),
                    )
                ]
                versions = conn.execute(
                    "SELECT COUNT(*) FROM model_versions WHERE model_id = ?", (model_id,)
                ).fetchone()[0]
                conn.execute("DELETE FROM model_aliases WHERE model_id = ?", (model_id,))
                conn.execute("DELETE FROM approvals WHERE model_id = ?", (model_id,))
                conn.execute("DELETE FROM model_versions WHERE model_id = ?", (model_id,))
                conn.execute("DELETE FROM models WHERE model_id = ?", (model_id,))
                _audit(conn, change, name, {"deleted_versions": str(versions)})
                # Artifacts that another model's version still uses stay.
                return [
                    uri
                    for uri in uris
                    if conn.execute(
                        "SELECT 1 FROM model_versions WHERE artifact_uri = ? LIMIT 1", (uri,)
                    ).fetchone()
                    is None
                ]

        return await self._call(work)

    async def referenced_artifacts(self) -> set[str]:
        def work(conn: sqlite3.Connection) -> set[str]:
            return {r[0] for r in conn.execute("SELECT DISTINCT artifact_uri FROM model_versions")}

        return await self._call(work)

    async def update_model_version(
        self,
        model_id: str,
        version: int,
        *,
        description: str | None,
        tags: Sequence[tuple[str, str]] | None,
        change: Change,
    ) -> ModelVersion:
        def work(conn: sqlite3.Connection) -> ModelVersion:
            with _transaction(conn):
                current = _select_version(conn, model_id, version)
                if current is None:
                    raise _version_not_found(model_id, version)
                details: dict[str, str] = {}
                if description is not None and description != current.description:
                    details["description"] = description
                if tags is not None and tuple(sorted(tags)) != current.tags:
                    details["tags"] = pairs_to_json(tags)
                if not details:
                    return current
                conn.execute(
                    "UPDATE model_versions SET description = ?, tags = ?"
                    " WHERE model_id = ? AND version = ?",
                    (
                        current.description if description is None else description,
                        pairs_to_json(current.tags if tags is None else tags),
                        model_id,
                        version,
                    ),
                )
                _audit(conn, change, current.name, details)
                updated = _select_version(conn, model_id, version)
                assert updated is not None
                return updated

        return await self._call(work)

    async def record_validation(
        self, model_id: str, version: int, run: bytes, details: dict[str, str], change: Change
    ) -> ModelVersion:
        def work(conn: sqlite3.Connection) -> ModelVersion:
            with _transaction(conn):
                cursor = conn.execute(
                    "UPDATE model_versions SET validation = ? WHERE model_id = ? AND version = ?",
                    (run, model_id, version),
                )
                if cursor.rowcount == 0:
                    raise _version_not_found(model_id, version)
                _audit(conn, change, f"models/{model_id}/versions/{version}", details)
                updated = _select_version(conn, model_id, version)
                assert updated is not None
                return updated

        return await self._call(work)

    async def start_rollout(
        self,
        rollout: Rollout,
        traffic: Sequence[TrafficTarget],
        *,
        stable_revision: int,
        production_only: bool,
        change: Change,
    ) -> tuple[Rollout, Deployment]:
        def work(conn: sqlite3.Connection) -> tuple[Rollout, Deployment]:
            with _transaction(conn):
                if _active_rollout(conn, rollout.deployment_id) is not None:
                    raise _rollout_in_progress(rollout.deployment_id)
                number = conn.execute(
                    "SELECT COALESCE(MAX(rollout_id), 0) + 1 FROM rollouts WHERE deployment_id = ?",
                    (rollout.deployment_id,),
                ).fetchone()[0]
                started = dataclasses.replace(rollout, rollout_id=int(number))
                current = _select_deployment(conn, rollout.deployment_id)
                if current is None:
                    raise _deployment_not_found(rollout.deployment_id)
                deployment, _ = _put_deployment(
                    conn,
                    rollout.deployment_id,
                    tuple(traffic),
                    allow_missing=False,
                    change=change,
                    restored_revision=0,
                    policy=current.policy,
                    expected_revision=stable_revision,
                    production_only=production_only,
                )
                conn.execute(
                    f"INSERT INTO rollouts ({_ROLLOUT_COLUMNS})"
                    f" VALUES ({', '.join('?' * len(_ROLLOUT_VALUES_ORDER))})",
                    _rollout_values(started),
                )
                _audit(conn, change, started.name, _rollout_details(started))
                return started, deployment

        return await self._call(work)

    async def get_rollout(self, deployment_id: str, rollout_id: int) -> Rollout | None:
        def work(conn: sqlite3.Connection) -> Rollout | None:
            row = conn.execute(
                f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE deployment_id = ? AND rollout_id = ?",
                (deployment_id, rollout_id),
            ).fetchone()
            return None if row is None else _read_rollout(row)

        return await self._call(work)

    async def list_rollouts(
        self, deployment_id: str, *, before: int | None, limit: int
    ) -> list[Rollout]:
        def work(conn: sqlite3.Connection) -> list[Rollout]:
            rows = conn.execute(
                f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts"
                " WHERE deployment_id = ? AND (? IS NULL OR rollout_id < ?)"
                " ORDER BY rollout_id DESC LIMIT ?",
                (deployment_id, before, before, limit),
            ).fetchall()
            return [_read_rollout(r) for r in rows]

        return await self._call(work)

    async def running_rollouts(self) -> list[Rollout]:
        def work(conn: sqlite3.Connection) -> list[Rollout]:
            rows = conn.execute(
                f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE state = ?"
                " ORDER BY deployment_id, rollout_id",
                (RolloutState.RUNNING.value,),
            ).fetchall()
            return [_read_rollout(r) for r in rows]

        return await self._call(work)

    async def save_rollout(
        self,
        rollout: Rollout,
        *,
        expected: Rollout,
        change: Change,
        traffic: Sequence[TrafficTarget] | None = None,
        audit: bool = True,
    ) -> tuple[Rollout, Deployment | None]:
        def work(conn: sqlite3.Connection) -> tuple[Rollout, Deployment | None]:
            with _transaction(conn):
                row = conn.execute(
                    f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts"
                    " WHERE deployment_id = ? AND rollout_id = ?",
                    (rollout.deployment_id, rollout.rollout_id),
                ).fetchone()
                if row is None:
                    raise _rollout_not_found(rollout.name)
                current = _read_rollout(row)
                if (current.state, current.step, current.update_time) != (
                    expected.state,
                    expected.step,
                    expected.update_time,
                ):
                    raise AbortedError(
                        f"{rollout.name} changed meanwhile (now {current.state.name} at step"
                        f" {current.step}); read it again and retry",
                        reason="CONCURRENT_CHANGE",
                        metadata={"name": rollout.name, "state": current.state.name},
                    )
                deployment: Deployment | None = None
                if traffic is not None:
                    now = _select_deployment(conn, rollout.deployment_id)
                    if now is None:
                        raise _deployment_not_found(rollout.deployment_id)
                    deployment, _ = _put_deployment(
                        conn,
                        rollout.deployment_id,
                        tuple(traffic),
                        allow_missing=False,
                        change=change,
                        restored_revision=0,
                        policy=now.policy,
                        expected_revision=None,
                        production_only=False,
                    )
                conn.execute(
                    f"UPDATE rollouts SET ({_ROLLOUT_COLUMNS}) ="
                    f" ({', '.join('?' * len(_ROLLOUT_VALUES_ORDER))})"
                    " WHERE deployment_id = ? AND rollout_id = ?",
                    (*_rollout_values(rollout), rollout.deployment_id, rollout.rollout_id),
                )
                if audit:
                    _audit(conn, change, rollout.name, _rollout_details(rollout))
                return rollout, deployment

        return await self._call(work)

    async def get_deployment_revision(
        self, deployment_id: str, revision: int
    ) -> DeploymentRevision | None:
        def work(conn: sqlite3.Connection) -> DeploymentRevision | None:
            row = conn.execute(
                f"SELECT {_REVISION_COLUMNS} FROM deployment_revisions"
                " WHERE deployment_id = ? AND revision = ?",
                (deployment_id, revision),
            ).fetchone()
            return None if row is None else _revision_from_row(row)

        return await self._call(work)

    async def list_deployment_revisions(
        self, deployment_id: str, *, before: int | None, limit: int
    ) -> list[DeploymentRevision]:
        def work(conn: sqlite3.Connection) -> list[DeploymentRevision]:
            rows = conn.execute(
                f"SELECT {_REVISION_COLUMNS} FROM deployment_revisions"
                " WHERE deployment_id = ? AND (? IS NULL OR revision < ?)"
                " ORDER BY revision DESC LIMIT ?",
                (deployment_id, before, before, limit),
            ).fetchall()
            return [_revision_from_row(row) for row in rows]

        return await self._call(work)

    async def current_revisions(
        self, deployment_id: str | None
    ) -> tuple[list[DeploymentRevision], int]:
        def work(conn: sqlite3.Connection) -> tuple[list[DeploymentRevision], int]:
            # Both reads in one transaction, so no revision falls between the snapshot and
            # the sequence a watcher resumes after.
            conn.execute("BEGIN")
            try:
                rows = conn.execute(
                    f"SELECT {_REVISION_COLUMNS} FROM deployment_revisions"
                    " WHERE sequence IN (SELECT MAX(sequence) FROM deployment_revisions"
                    "  WHERE (? IS NULL OR deployment_id = ?) GROUP BY deployment_id)"
                    " ORDER BY sequence",
                    (deployment_id, deployment_id),
                ).fetchall()
                latest = conn.execute(
                    "SELECT COALESCE(MAX(sequence), 0) FROM deployment_revisions"
                ).fetchone()[0]
            finally:
                conn.execute("COMMIT")
            return [_revision_from_row(row) for row in rows], int(latest)

        return await self._call(work)

    async def revisions_after(
        self, sequence: int, deployment_id: str | None, *, limit: int
    ) -> list[DeploymentRevision]:
        def work(conn: sqlite3.Connection) -> list[DeploymentRevision]:
            rows = conn.execute(
                f"SELECT {_REVISION_COLUMNS} FROM deployment_revisions"
                " WHERE sequence > ? AND (? IS NULL OR deployment_id = ?)"
                " ORDER BY sequence LIMIT ?",
                (sequence, deployment_id, deployment_id, limit),
            ).fetchall()
            return [_revision_from_row(row) for row in rows]

        return await self._call(work)

    async def list_audit_events(
        self, resource: str | None, *, before: int | None, limit: int
    ) -> list[AuditEvent]:
        def work(conn: sqlite3.Connection) -> list[AuditEvent]:
            # A prefix match by range, not LIKE, so `_` and `%` in names mean themselves.
            rows = conn.execute(
                "SELECT event_id, create_time, principal, action, resource, reason, details"
                " FROM audit_events"
                " WHERE (? IS NULL OR resource = ? OR (resource > ? AND resource < ?))"
                " AND (? IS NULL OR event_id < ?)"
                " ORDER BY event_id DESC LIMIT ?",
                (
                    resource,
                    resource,
                    f"{resource}/",
                    f"{resource}0",  # '0' is the character after '/'
                    before,
                    before,
                    limit,
                ),
            ).fetchall()
            return [
                AuditEvent(
                    event_id=r["event_id"],
                    create_time=_time(r["create_time"]),
                    principal=r["principal"],
                    action=r["action"],
                    resource=r["resource"],
                    reason=r["reason"],
                    details=json.loads(r["details"]),
                )
                for r in rows
            ]

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
