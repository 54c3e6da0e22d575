"""The feature service's domain: validated online reads and writes over the Redis store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from modelserve_features.redis_store import EntityKey, FeatureRef, RedisFeatureStore, Value
from modelserve_runtime.errors import FieldViolation, InvalidArgumentError


class OnlineFeatures:
    """Validates requests, then reads or writes through one Redis round trip."""

    def __init__(self, store: RedisFeatureStore, *, max_entities: int, max_features: int) -> None:
        self._store = store
        self._max_entities = max_entities
        self._max_features = max_features

    async def read(
        self, entities: Sequence[EntityKey], features: Sequence[str]
    ) -> list[dict[FeatureRef, Value | None]]:
        """Every requested feature of every entity whose type it belongs to."""
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
        refs: list[FeatureRef] = []
        for i, ref in enumerate(features):
            try:
                refs.append(FeatureRef.parse(ref))
            except ValueError:
                violations.append(
                    FieldViolation(f"features[{i}]", f"{ref!r} is not 'entity_type:name'")
                )
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        return await self._store.read(entities, refs)

    async def write(self, writes: Sequence[tuple[EntityKey, Mapping[str, Value | None]]]) -> int:
        """Writes all values atomically; a batch with any bad entry writes nothing."""
        violations: list[FieldViolation] = []
        if not writes:
            violations.append(FieldViolation("writes", "at least one write is required"))
        clean: list[tuple[EntityKey, Mapping[str, Value]]] = []
        for i, (entity, values) in enumerate(writes):
            if not entity.entity_type or not entity.entity_id:
                violations.append(
                    FieldViolation(f"writes[{i}].entity", "entity_type and entity_id are required")
                )
            if not values:
                violations.append(
                    FieldViolation(f"writes[{i}].values", "at least one value is required")
                )
            for name, value in values.items():
                if not name or ":" in name:
                    violations.append(
                        FieldViolation(f"writes[{i}].values[{name!r}]", "bad feature name")
                    )
                if value is None:
                    violations.append(
                        FieldViolation(f"writes[{i}].values[{name!r}]", "value must be set")
                    )
            clean.append((entity, {k: v for k, v in values.items() if v is not None}))
        if violations:
            raise InvalidArgumentError.from_violations(violations)
        return await self._store.write(clean)
