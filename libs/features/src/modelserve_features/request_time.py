"""Request-time features: one function that serving and training code both call."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

#: The features :func:`compute_request_features` returns, in a stable order.
REQUEST_FEATURES: tuple[str, ...] = ("hour_of_day", "day_of_week", "is_mobile", "query_length")

# Tokens that mobile browsers and apps put in their User-Agent; "Mobi" is the token
# Mozilla recommends for detecting mobile browsers, the rest cover tablets and apps.
_MOBILE_UA = re.compile(r"Mobi|Android|iPhone|iPad|iPod|Windows Phone|okhttp|CFNetwork", re.I)


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What is known about one request before any stored feature is read."""

    event_time: datetime
    user_agent: str = ""
    query: str = ""


def compute_request_features(facts: RequestFacts) -> dict[str, float]:
    """Returns the request-time features of one request; naive times are taken as UTC."""
    when = facts.event_time
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    when = when.astimezone(UTC)
    return {
        "hour_of_day": float(when.hour),
        "day_of_week": float(when.weekday()),
        "is_mobile": 1.0 if _MOBILE_UA.search(facts.user_agent) else 0.0,
        "query_length": float(len(facts.query)),
    }
