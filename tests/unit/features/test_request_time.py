"""The request-time feature registry shared by serving and training."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from modelserve_features import request_time
from modelserve_features.request_time import (
    REQUEST_FEATURES,
    RequestFacts,
    compute_request_features,
    registered_features,
    request_feature,
)


class TestRequestTimeFeatures:
    def test_builtins_are_registered(self) -> None:
        """hour_of_day, day_of_week, is_mobile and query_length are registered and computed."""
        facts = RequestFacts(
            event_time=datetime(2024, 6, 1, 23, 30, tzinfo=timezone(timedelta(hours=-2))),
            user_agent="Mozilla/5.0 (Linux; Android 14) Mobile",
            query="red shoes",
        )

        assert set(REQUEST_FEATURES) <= set(registered_features())
        assert compute_request_features(facts, REQUEST_FEATURES) == {
            "hour_of_day": 1.0,  # 23:30 at UTC-2 is 01:30 UTC
            "day_of_week": 6.0,  # Sunday, 2 June in UTC
            "is_mobile": 1.0,
            "query_length": 9.0,
        }

    def test_decorator_adds_a_feature(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A function registered with the decorator is computed with the others; a second
        function under the same name is refused."""
        monkeypatch.setattr(request_time, "_REGISTRY", dict(request_time._REGISTRY))

        @request_feature("is_weekend")
        def is_weekend(facts: RequestFacts) -> float:
            return 1.0 if facts.event_time.weekday() >= 5 else 0.0

        facts = RequestFacts(event_time=datetime(2024, 6, 1, tzinfo=UTC))
        assert compute_request_features(facts)["is_weekend"] == 1.0
        with pytest.raises(ValueError, match="registered already"):
            request_feature("is_weekend")(lambda facts: 0.0)

    def test_unknown_and_bad_names_are_refused(self) -> None:
        """Asking for an unregistered feature names it; a bad name cannot be registered."""
        facts = RequestFacts(event_time=datetime(2024, 6, 1, tzinfo=UTC))
        with pytest.raises(KeyError, match="no_such"):
            compute_request_features(facts, ["no_such"])
        with pytest.raises(ValueError):
            request_feature("Bad-Name")
