"""Where each version's feature baseline comes from: its model's validation set, asked of the
registry when the monitor first sees the version, or else the version's first records.

The prediction baseline is always the version's first records: a validation set holds the
inputs and the labels, not what this version answers to them, and labels are not predictions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import redis.asyncio as redis
import structlog

from modelserve.registry.v1 import registry_service_pb2 as registry_pb
from modelserve_monitor.aggregate import SEP, Increment
from modelserve_monitor.histogram import Histogram
from modelserve_monitor.monitor import Clock
from modelserve_monitor.store import AggregateStore, BaselineDecision, BaselineSource
from modelserve_runtime.convert import tensor_to_numpy
from modelserve_runtime.errors import InvalidArgumentError, NotFoundError, UnavailableError
from modelserve_runtime.waiting import wait_until_set

log = structlog.get_logger()

VersionKey = tuple[str, str]


class ModelCatalog(Protocol):
    """What the monitor asks the registry about a version."""

    async def version_and_model(
        self, model_version: str
    ) -> tuple[registry_pb.ModelVersion, registry_pb.Model]:
        """The version and its model; NotFoundError when the registry does not know them,
        UnavailableError when the registry could not be asked."""
        ...


def _first_records(reason: str, now: float) -> tuple[BaselineDecision, list[Increment]]:
    return BaselineDecision(BaselineSource.FIRST_RECORDS, reason, decided_at=now), []


def validation_reference(
    version: registry_pb.ModelVersion, model: registry_pb.Model, now: float
) -> tuple[BaselineDecision, list[Increment]]:
    """The feature baseline of a version from its model's validation set, as the counters a
    record adds (`f SEP ref SEP n|miss|vn|sum|h SEP bucket|c SEP value`), or the decision to
    use the first records, with the reason, when the set cannot give one.

    The validation set's input named as the signature's first input holds one column per
    `signature.feature_refs` entry, in order. A non-finite value counts as missing, as in
    records; a column of only 0 and 1 also counts `true`/`false`, so a bool feature in the
    records is compared by category.
    """
    refs = list(version.signature.feature_refs)
    validation = model.validation_set
    if not validation.inputs:
        return _first_records("the model has no validation set", now)
    if not refs:
        return _first_records("the version's signature has no feature_refs", now)
    signature_inputs = version.signature.inputs
    name = signature_inputs[0].name if signature_inputs else validation.inputs[0].name
    tensor = next((t for t in validation.inputs if t.name == name), None)
    if tensor is None:
        return _first_records(f"the validation set has no input {name!r}", now)
    try:
        array = tensor_to_numpy(tensor, f"validation_set.inputs[{name}]")
    except InvalidArgumentError as exc:
        return _first_records(f"the validation set's input {name!r} is malformed: {exc}", now)
    if array.dtype.kind not in "biuf":
        return _first_records(f"the validation set's input {name!r} is not numeric", now)
    if array.ndim == 1 and len(refs) == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2 or array.shape[1] != len(refs) or array.shape[0] == 0:
        return _first_records(
            f"the validation set's input {name!r} has shape {list(array.shape)}, not "
            f"[rows, {len(refs)}] for the {len(refs)} feature_refs",
            now,
        )
    rows = int(array.shape[0])
    increments: list[Increment] = []
    for column, ref in enumerate(refs):
        values = array[:, column].astype(np.float64)
        finite = values[np.isfinite(values)]
        prefix = f"f{SEP}{ref}{SEP}"
        increments.append((prefix + "n", rows))
        if len(finite) < rows:
            increments.append((prefix + "miss", rows - len(finite)))
        if not len(finite):
            continue
        histogram = Histogram.of(float(v) for v in finite)
        increments += [(prefix + "vn", histogram.total), (prefix + "sum", histogram.sum)]
        increments += [(f"{prefix}h{SEP}{b}", c) for b, c in sorted(histogram.counts.items())]
        ones = int(np.count_nonzero(finite == 1.0))
        zeros = int(np.count_nonzero(finite == 0.0))
        if ones + zeros == len(finite):
            increments += [(f"{prefix}c{SEP}true", ones), (f"{prefix}c{SEP}false", zeros)]
    decision = BaselineDecision(
        BaselineSource.VALIDATION_SET,
        f"{rows} rows of the validation set of {model.name}",
        rows=rows,
        decided_at=now,
    )
    return decision, increments


class BaselineResolver:
    """Decides, once per endpoint and version, where the version's feature baseline comes from.

    The consumer tells it which versions each batch held (`notice`); for one it has not seen
    it first looks in Redis (a decision made before a restart, or by another replica, stands),
    else asks the registry for the version and its model and records the validation set's
    counters, or the decision to keep the first records with the reason. When the registry
    cannot be asked (unreachable, not configured, refusing the API key) the version keeps its
    first records and is asked about again after `retry_s`, doubling up to `retry_max_s`,
    until the registry answers.
    """

    def __init__(
        self,
        store: AggregateStore,
        catalog: ModelCatalog,
        *,
        clock: Clock = time.time,
        retry_s: float = 30.0,
        retry_max_s: float = 600.0,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._clock = clock
        self._retry_s = retry_s
        self._retry_max_s = retry_max_s
        self._settled: set[VersionKey] = set()
        self._due: dict[VersionKey, float] = {}
        self._failures: dict[VersionKey, int] = {}
        self._wake = asyncio.Event()
        self.deferrals = 0

    def notice(self, versions: Iterable[VersionKey]) -> None:
        """Versions just counted; the new ones are looked into in the background."""
        for key in versions:
            if key not in self._settled and key not in self._due:
                self._due[key] = 0.0
                self._wake.set()

    @property
    def waiting(self) -> int:
        """Versions not decided yet (waiting for their first attempt or a retry)."""
        return len(self._due)

    async def run(self) -> None:
        """Decides noticed versions until cancelled."""
        while True:
            self._wake.clear()
            now = time.monotonic()
            ready = [key for key, due in self._due.items() if due <= now]
            for key in ready:
                await self._attempt(key)
            if ready:
                continue
            timeout = min(self._due.values()) - now if self._due else None
            await wait_until_set(self._wake, timeout)

    async def _attempt(self, key: VersionKey) -> None:
        endpoint, model_version = key
        try:
            decision = await self._store.baseline_decision(endpoint, model_version)
            if decision is None:
                decision, reference = await self._decide(model_version)
                await self._store.decide_baseline(endpoint, model_version, decision, reference)
                log.info(
                    "baseline_decided",
                    endpoint=endpoint,
                    version=model_version,
                    source=decision.source.value,
                    rows=decision.rows,
                    reason=decision.reason,
                )
        except (UnavailableError, redis.RedisError) as exc:
            self._retry_later(key, exc)
        except Exception as exc:
            # A bug must not stop the other versions from being decided; the traceback is logged.
            log.exception("baseline_decision_failed", endpoint=endpoint, version=model_version)
            self._retry_later(key, exc)
        else:
            self._settled.add(key)
            self._due.pop(key, None)
            self._failures.pop(key, None)

    def _retry_later(self, key: VersionKey, exc: BaseException) -> None:
        self.deferrals += 1
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        wait_s = min(self._retry_s * 2 ** (failures - 1), self._retry_max_s)
        self._due[key] = time.monotonic() + wait_s
        log.warning(
            "baseline_decision_deferred",
            endpoint=key[0],
            version=key[1],
            retry_in_s=wait_s,
            error=str(exc),
        )

    async def _decide(self, model_version: str) -> tuple[BaselineDecision, list[Increment]]:
        try:
            version, model = await self._catalog.version_and_model(model_version)
        except NotFoundError as exc:
            return _first_records(f"the registry does not know the version: {exc}", self._clock())
        # Histograms of up to 100 000 rows per feature take a while: off the event loop.
        return await asyncio.to_thread(validation_reference, version, model, self._clock())
