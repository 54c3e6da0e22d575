"""The feature service's domain: request limits and resource names over the online store."""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, replace

from modelserve_features.catalog import ApplyResult
from modelserve_features.online import (
    FeatureWrite,
    OnlineStore,
    ReadValue,
    WriteResult,
    refused,
)
from modelserve_features.redis_store import EntityKey
from modelserve_features.views import FeatureRef, FeatureView, view_id, view_problems
from modelserve_runtime.errors import FieldViolation, InvalidArgumentError

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: Most distinct feature lists whose parsed refs are kept; all are dropped when full.
_MAX_PARSED = 1024


@dataclass(frozen=True, slots=True)
class BulkResult:
    """What a bulk write stored."""

    batches: int
    written: int
    stale: int


@dataclass(frozen=True, slots=True)
class ViewPage:
    """A page of views and the token of the next one ("" on the last)."""

    views: list[FeatureView]
    next_page_token: str


def _parse(features: Sequence[str], violations: list[FieldViolation]) -> tuple[FeatureRef, ...]:
    """The refs in `features`; each one that is not `view:feature` adds a violation."""
    refs: list[FeatureRef] = []
    for i, ref in enumerate(features):
        try:
            refs.append(FeatureRef.parse(ref))
        except ValueError:
            violations.append(
                FieldViolation(f"features[{i}]", f"{ref!r} is not 'feature_view:feature'")
            )
    return tuple(refs)


def _view_id(name: str, field_path: str) -> str:
    try:
        return view_id(name)
    except ValueError as exc:
        raise InvalidArgumentError.for_field(field_path, str(exc)) from None


class OnlineFeatures:
    """Validates requests, then reads, writes and defines views through the online store."""

    def __init__(self, store: OnlineStore, *, max_entities: int, max_features: int) -> None:
        self._store = store
        self._max_entities = max_entities
        self._max_features = max_features
        self._parsed: dict[tuple[str, ...], tuple[FeatureRef, ...]] = {}

    async def read(
        self,
        entities: Sequence[EntityKey],
        features: Sequence[str],
        *,
        timeout_s: float | None = None,
    ) -> list[list[ReadValue]]:
        """Every requested feature of every entity of its view's entity type, one round trip:
        per entity (in request order) its values in the order of `features`."""
        violations: list[FieldViolation] = []
        if not entities:
            violations.append(FieldViolation("entities", "at least one entity is required"))
        elif len(entities) > self._max_entities:
            violations.append(
                FieldViolation("entities", f"at most {self._max_entities} entities per call")
            )
        if not features:
            violations.append(FieldViolation("features", "at least one feature is required"))
        elif len(features) > self._max_features:
            violations.append(
                FieldViolation("features", f"at most {self._max_features} features per call")
            )
        for i, entity in enumerate(entities):
            if not entity.entity_type:
                violations.append(FieldViolation(f"entities[{i}].entity_type", "must not be empty"))
            if not entity.entity_id:
                violations.append(FieldViolation(f"entities[{i}].entity_id", "must not be empty"))
        requested = tuple(features)
        refs = self._parsed.get(requested)
        new = refs is None
        if refs is None:
            refs = _parse(requested, violations)
        if violations:
            raise refused(violations)
        if new:
            if len(self._parsed) >= _MAX_PARSED:
                self._parsed.clear()
            self._parsed[requested] = refs
        return await self._store.read_values(entities, refs, timeout_s=timeout_s)

    async def write(
        self, writes: Sequence[FeatureWrite], *, timeout_s: float | None = None
    ) -> WriteResult:
        """Writes the batch whole or not at all; each write names its view `featureViews/{id}`."""
        if len(writes) > self._max_entities:
            raise InvalidArgumentError.for_field(
                "writes", f"at most {self._max_entities} writes per batch"
            )
        violations: list[FieldViolation] = []
        resolved: list[FeatureWrite] = []
        for i, write in enumerate(writes):
            try:
                resolved.append(replace(write, view=view_id(write.view)))
            except ValueError as exc:
                violations.append(FieldViolation(f"writes[{i}].feature_view", str(exc)))
        if violations:
            raise refused(violations)
        return await self._store.write(resolved, timeout_s=timeout_s)

    async def bulk_write(self, batches: AsyncIterable[Sequence[FeatureWrite]]) -> BulkResult:
        """Writes each batch whole; the first bad batch ends the call, naming its index
        (`requests[k]`); batches before it stay written."""
        count = written = stale = 0
        async for batch in batches:
            try:
                result = await self.write(batch)
            except InvalidArgumentError as exc:
                violations = [
                    FieldViolation(f"requests[{count}].{v.field}", v.description)
                    for v in exc.violations
                ]
                raise InvalidArgumentError(
                    f"batch {count} refused ({count} earlier batches written): {exc.message}",
                    violations=violations,
                    reason=exc.reason,
                    metadata={**exc.metadata, "batches_written": str(count)},
                ) from exc
            count += 1
            written += result.written
            stale += result.stale
        if count == 0:
            raise InvalidArgumentError.for_field("requests", "at least one batch is required")
        return BulkResult(batches=count, written=written, stale=stale)

    async def apply_view(
        self, view: FeatureView, *, force: bool, expected_version: int | None = None
    ) -> ApplyResult:
        """Creates or changes the view named `featureViews/{id}` in `view.name`; with
        `expected_version`, only while it is at that version (0: does not exist)."""
        if expected_version is not None and expected_version < 0:
            raise InvalidArgumentError.for_field("expected_version", "must not be negative")
        named = replace(view, name=_view_id(view.name, "feature_view.name"))
        problems = view_problems(named)
        if problems:
            raise InvalidArgumentError.from_violations(
                [FieldViolation(f"feature_view.{path}", text) for path, text in problems]
            )
        return await self._store.apply_view(named, force=force, expected_version=expected_version)

    async def get_view(self, name: str, version: int = 0) -> FeatureView:
        """A view, current or at `version`."""
        if version < 0:
            raise InvalidArgumentError.for_field("version", "must not be negative")
        return await self._store.get_view(_view_id(name, "name"), version)

    async def list_views(self, page_size: int, page_token: str) -> ViewPage:
        """Views by name, after `page_token` (the last name of the previous page)."""
        if page_size < 0:
            raise InvalidArgumentError.for_field("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        views = [v for v in await self._store.list_views() if v.name > page_token]
        page = views[:size]
        return ViewPage(page, page[-1].name if len(views) > size else "")

    async def delete_view(self, name: str) -> None:
        """Deletes a view's definition."""
        await self._store.delete_view(_view_id(name, "name"))
