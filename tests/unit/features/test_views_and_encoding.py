"""Feature view rules and the value encoding in Redis, as pure functions."""

from __future__ import annotations

import pytest

from modelserve_features.convert import value_from_proto, value_to_proto
from modelserve_features.redis_store import (
    EntityKey,
    decode_value,
    encode_value,
    redis_key,
)
from modelserve_features.views import (
    FeatureDtype,
    FeatureRef,
    FeatureSpec,
    FeatureView,
    breaking_changes,
    value_problem,
    view_from_json,
    view_id,
    view_problems,
    view_to_json,
)

D = FeatureDtype


def _view(*features: FeatureSpec, entity_type: str = "customer") -> FeatureView:
    return FeatureView(name="customer", entity_type=entity_type, features=features)


class TestViews:
    def test_additions_and_metadata_do_not_break_readers(self) -> None:
        """A new feature, a new default or description is not a breaking change."""
        old = _view(FeatureSpec("a", D.DOUBLE))
        new = _view(FeatureSpec("a", D.DOUBLE, 1.0, "now documented"), FeatureSpec("b", D.BOOL))

        assert breaking_changes(old, new) == []

    def test_removal_retype_and_entity_change_break_readers(self) -> None:
        """A removed feature, a changed dtype and another entity type are each reported."""
        old = _view(FeatureSpec("a", D.DOUBLE), FeatureSpec("b", D.INT64))
        new = _view(FeatureSpec("b", D.STRING), entity_type="merchant")

        assert breaking_changes(old, new) == [
            "entity type changes from 'customer' to 'merchant'",
            "feature 'a' is removed",
            "feature 'b' changes dtype from int64 to string",
        ]

    @pytest.mark.parametrize(
        ("dtype", "value", "problem"),
        [
            (D.DOUBLE, 1.0, None),
            (D.DOUBLE, 1, "expected double, got int64"),
            (D.INT64, True, "expected int64, got bool"),
            (D.INT64, 2**63, "is out of the int64 range"),
            (D.BOOL, False, None),
            (D.STRING, "x", None),
            (D.FLOAT_VECTOR, (1.0, 2.0), None),
            (D.FLOAT_VECTOR, (1.0, float("nan")), "expected finite floats in the vector"),
            (D.FLOAT_VECTOR, 1.0, "expected float_vector, got double"),
        ],
    )
    def test_values_must_match_their_dtype_exactly(
        self, dtype: FeatureDtype, value: object, problem: str | None
    ) -> None:
        """A value is accepted only for its own dtype (no int-for-double, no bool-for-int)."""
        assert value_problem(dtype, value) == problem  # type: ignore[arg-type]

    def test_definition_problems_name_their_fields(self) -> None:
        """A bad id, a duplicate feature and a default of the wrong dtype are each named."""
        view = FeatureView(
            name="Customer",
            entity_type="customer",
            features=(FeatureSpec("a", D.DOUBLE, "x"), FeatureSpec("a", D.DOUBLE)),
        )

        assert [path for path, _ in view_problems(view)] == [
            "name",
            "features[0].default_value",
            "features[1].name",
        ]

    def test_json_round_trip_keeps_types(self) -> None:
        """A view survives its JSON form with every default's type intact."""
        view = _view(
            FeatureSpec("a", D.DOUBLE, 0.0),
            FeatureSpec("b", D.INT64, 3),
            FeatureSpec("c", D.FLOAT_VECTOR, (0.5,)),
            FeatureSpec("d", D.BOOL, False),
        )

        assert view_from_json(view_to_json(view)) == view

    def test_names_and_refs_parse(self) -> None:
        """`featureViews/{id}` gives the id; `view:feature` gives a ref; other shapes fail."""
        assert view_id("featureViews/customer") == "customer"
        assert FeatureRef.parse("customer:avg") == FeatureRef("customer", "avg")
        for bad in ("customer", "featureViews/", "featureViews/a/b", "views/customer"):
            with pytest.raises(ValueError):
                view_id(bad)
        with pytest.raises(ValueError):
            FeatureRef.parse("avg")


class TestEncoding:
    @pytest.mark.parametrize(
        ("dtype", "value"),
        [
            (D.INT64, -(2**63)),
            (D.DOUBLE, 0.1),
            (D.STRING, "naïve ✓"),
            (D.BOOL, True),
            (D.BOOL, False),
            (D.FLOAT_VECTOR, (0.5, -2.0, 3.25)),
            (D.FLOAT_VECTOR, ()),
        ],
    )
    def test_round_trip(self, dtype: FeatureDtype, value: object) -> None:
        """Every dtype decodes to the value, dtype and event time it was encoded with."""
        raw = encode_value(dtype, value, 1_717_208_000_123_456)  # type: ignore[arg-type]

        assert decode_value(raw) == (dtype, value, 1_717_208_000_123_456)

    @pytest.mark.parametrize(
        "raw",
        [
            b"d" + bytes(8) + b"\x00\x01\x02",  # a double of 3 bytes
            b"i" + bytes(8) + bytes(9),  # an int64 of 9 bytes
            b"v" + bytes(8) + bytes(5),  # a vector of one float and a byte
            b"s" + bytes(8) + b"\xff",  # text that is not UTF-8
            b"z" + bytes(8) + b"\x01",  # an unknown tag
            b"d" + bytes(4),  # shorter than the header
        ],
    )
    def test_malformed_values_are_value_errors(self, raw: bytes) -> None:
        """Whatever is wrong with a stored value, decoding it raises ValueError, which
        readers treat as nothing stored."""
        with pytest.raises(ValueError):
            decode_value(raw)

    def test_encoding_is_compact(self) -> None:
        """A double costs 17 bytes: a tag, 8 bytes of event time, 8 of value."""
        assert len(encode_value(D.DOUBLE, 42.5, 0)) == 17

    def test_keys_share_a_hash_tag_per_entity(self) -> None:
        """All views of an entity hash to one Cluster slot: the tag is the entity."""
        entity = EntityKey("customer", "c-1")

        assert redis_key(entity, "customer") == "fs:{customer:c-1}:customer"
        assert redis_key(entity, "risk") == "fs:{customer:c-1}:risk"


class TestProtoValues:
    @pytest.mark.parametrize("value", [None, 3, 2.5, "x", True, (0.5, -1.0)])
    def test_every_kind_round_trips(self, value: object) -> None:
        """Each value kind, the float vector included, survives FeatureValue and back."""
        assert value_from_proto(value_to_proto(value)) == value  # type: ignore[arg-type]
