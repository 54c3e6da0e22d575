"""Feature views: which features an entity type has, their dtypes, defaults and max age."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

#: A feature value as Python sees it; a float vector is a tuple of floats.
Value = int | float | str | bool | tuple[float, ...]

#: Resource-name prefix of feature views (`featureViews/{feature_view}`).
NAME_PREFIX = "featureViews/"

_ID = re.compile(r"[a-z][a-z0-9_]{0,62}")
_INT64 = (-(2**63), 2**63 - 1)


class FeatureDtype(StrEnum):
    """The type of a feature's values."""

    INT64 = "int64"
    DOUBLE = "double"
    STRING = "string"
    BOOL = "bool"
    FLOAT_VECTOR = "float_vector"


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One feature of a view."""

    name: str
    dtype: FeatureDtype
    default: Value | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class FeatureView:
    """A named group of features of one entity type, stored in one Redis hash per entity."""

    name: str
    """The view id (`customer`); features are referenced as `{name}:{feature}`."""
    entity_type: str
    features: tuple[FeatureSpec, ...]
    max_age_s: float = 0.0
    """Values older than this read as EXPIRED; 0 means never."""
    owner: str = ""
    description: str = ""
    version: int = 0
    create_time_us: int = 0
    update_time_us: int = 0
    _by_name: dict[str, FeatureSpec] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {f.name: f for f in self.features})

    def feature(self, name: str) -> FeatureSpec | None:
        """The feature named `name`, or None."""
        return self._by_name.get(name)

    def same_definition(self, other: FeatureView) -> bool:
        """True when both declare the same thing, whatever their versions and times."""
        return _definition(self) == _definition(other)


@dataclass(frozen=True, slots=True)
class FeatureRef:
    """A feature of a view, written `feature_view:feature`."""

    view: str
    name: str

    @classmethod
    def parse(cls, ref: str) -> FeatureRef:
        """Parses `feature_view:feature`; raises ValueError on any other shape."""
        view, sep, name = ref.partition(":")
        if not sep or not view or not name or ":" in name:
            raise ValueError(f"feature reference {ref!r} is not of the form 'feature_view:feature'")
        return cls(view, name)

    def __str__(self) -> str:
        return f"{self.view}:{self.name}"


def is_valid_id(value: str) -> bool:
    """True for a view or feature id: 1-63 of [a-z0-9_], starting with a letter."""
    return _ID.fullmatch(value) is not None


def view_id(name: str) -> str:
    """The id in `featureViews/{id}`; ValueError for any other shape."""
    if not name.startswith(NAME_PREFIX) or not is_valid_id(name[len(NAME_PREFIX) :]):
        raise ValueError(
            f"{name!r} is not 'featureViews/{{feature_view}}' with an id of [a-z0-9_], "
            "starting with a letter"
        )
    return name[len(NAME_PREFIX) :]


def value_problem(dtype: FeatureDtype, value: Value) -> str | None:
    """Why `value` is not a value of `dtype`, or None when it is."""
    if dtype_name(value) != dtype.value:
        return f"expected {dtype.value}, got {dtype_name(value)}"
    if isinstance(value, tuple) and not all(
        isinstance(v, float) and math.isfinite(v) for v in value
    ):
        return "expected finite floats in the vector"
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        return "is out of the int64 range"
    return None


def dtype_name(value: Value) -> str:
    """The dtype name of a Python value, for messages."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    return "float_vector"


def view_problems(view: FeatureView) -> list[tuple[str, str]]:
    """(field path, problem) for each way `view` is not a valid definition."""
    problems: list[tuple[str, str]] = []
    if not is_valid_id(view.name):
        problems.append(("name", "the id must be 1-63 of [a-z0-9_], starting with a letter"))
    if not view.entity_type or ":" in view.entity_type or "}" in view.entity_type:
        problems.append(("entity_type", "must be set, without ':' or '}'"))
    if not view.features:
        problems.append(("features", "at least one feature is required"))
    if view.max_age_s < 0:
        problems.append(("max_age", "must not be negative"))
    seen: set[str] = set()
    for i, spec in enumerate(view.features):
        if not is_valid_id(spec.name):
            problems.append(
                (f"features[{i}].name", "must be 1-63 of [a-z0-9_], starting with a letter")
            )
        elif spec.name in seen:
            problems.append((f"features[{i}].name", f"{spec.name!r} is declared twice"))
        seen.add(spec.name)
        if spec.default is not None:
            problem = value_problem(spec.dtype, spec.default)
            if problem:
                problems.append((f"features[{i}].default_value", problem))
    return problems


def breaking_changes(old: FeatureView, new: FeatureView) -> list[str]:
    """What in `new` would break a reader of `old`: a removed or retyped feature, another
    entity type. Added features, new defaults, descriptions, owner and max age do not."""
    changes: list[str] = []
    if old.entity_type != new.entity_type:
        changes.append(f"entity type changes from {old.entity_type!r} to {new.entity_type!r}")
    for spec in old.features:
        now = new.feature(spec.name)
        if now is None:
            changes.append(f"feature {spec.name!r} is removed")
        elif now.dtype is not spec.dtype:
            changes.append(
                f"feature {spec.name!r} changes dtype from {spec.dtype.value} to {now.dtype.value}"
            )
    return changes


def _definition(view: FeatureView) -> tuple[Any, ...]:
    return (
        view.name,
        view.entity_type,
        view.features,
        view.max_age_s,
        view.owner,
        view.description,
    )


def _value_to_json(value: Value | None) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _value_from_json(dtype: FeatureDtype, raw: Any) -> Value | None:
    if raw is None:
        return None
    if dtype is FeatureDtype.DOUBLE:
        return float(raw)
    if dtype is FeatureDtype.FLOAT_VECTOR:
        return tuple(float(v) for v in raw)
    if dtype is FeatureDtype.INT64:
        return int(raw)
    if dtype is FeatureDtype.BOOL:
        return bool(raw)
    return str(raw)


def view_to_json(view: FeatureView) -> str:
    """The view as the JSON document stored in Redis."""
    return json.dumps(
        {
            "name": view.name,
            "entity_type": view.entity_type,
            "features": [
                {
                    "name": f.name,
                    "dtype": f.dtype.value,
                    "default": _value_to_json(f.default),
                    "description": f.description,
                }
                for f in view.features
            ],
            "max_age_s": view.max_age_s,
            "owner": view.owner,
            "description": view.description,
            "version": view.version,
            "create_time_us": view.create_time_us,
            "update_time_us": view.update_time_us,
        },
        separators=(",", ":"),
    )


def view_from_json(raw: str | bytes) -> FeatureView:
    """Inverse of view_to_json."""
    doc: Mapping[str, Any] = json.loads(raw)
    features: Sequence[Mapping[str, Any]] = doc["features"]
    return FeatureView(
        name=doc["name"],
        entity_type=doc["entity_type"],
        features=tuple(
            FeatureSpec(
                name=f["name"],
                dtype=FeatureDtype(f["dtype"]),
                default=_value_from_json(FeatureDtype(f["dtype"]), f["default"]),
                description=f["description"],
            )
            for f in features
        ),
        max_age_s=float(doc["max_age_s"]),
        owner=doc["owner"],
        description=doc["description"],
        version=int(doc["version"]),
        create_time_us=int(doc["create_time_us"]),
        update_time_us=int(doc["update_time_us"]),
    )


def stamped(view: FeatureView, *, version: int, create_time_us: int, now_us: int) -> FeatureView:
    """The view with its version and times set."""
    return replace(view, version=version, create_time_us=create_time_us, update_time_us=now_us)
