"""Request-time features: registered pure functions that serving and training code both call.

Add one with the decorator::

    @request_feature("is_weekend")
    def is_weekend(facts: RequestFacts) -> float:
        return 1.0 if utc(facts.event_time).weekday() >= 5 else 0.0

The router computes every registered feature for each request (a model reads the ones its
signature names as `request:<name>`), and training code calls `compute_request_features`
on the same facts, so the two cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

# Tokens that mobile browsers and apps put in their User-Agent; "Mobi" is the token
# Mozilla recommends for detecting mobile browsers, the rest cover tablets and apps.
_MOBILE_UA = re.compile(r"Mobi|Android|iPhone|iPad|iPod|Windows Phone|okhttp|CFNetwork", re.I)


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What is known about one request before any stored feature is read."""

    event_time: datetime
    user_agent: str = ""
    query: str = ""


RequestFeature = Callable[[RequestFacts], float]

_REGISTRY: dict[str, RequestFeature] = {}


def request_feature(name: str) -> Callable[[RequestFeature], RequestFeature]:
    """Registers the decorated function as request-time feature `name`.

    ValueError when the name is taken or not of [a-z0-9_] starting with a letter.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
        raise ValueError(f"request feature name {name!r} must be of [a-z0-9_], starting a-z")

    def register(function: RequestFeature) -> RequestFeature:
        if name in _REGISTRY and _REGISTRY[name] is not function:
            raise ValueError(f"request feature {name!r} is registered already")
        _REGISTRY[name] = function
        return function

    return register


def registered_features() -> tuple[str, ...]:
    """The names of every registered request-time feature, in registration order."""
    return tuple(_REGISTRY)


def utc(when: datetime) -> datetime:
    """`when` in UTC; a naive time is taken as UTC."""
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


@request_feature("hour_of_day")
def hour_of_day(facts: RequestFacts) -> float:
    """The hour (0-23, UTC) of the event."""
    return float(utc(facts.event_time).hour)


@request_feature("day_of_week")
def day_of_week(facts: RequestFacts) -> float:
    """The weekday (Monday 0 to Sunday 6, UTC) of the event."""
    return float(utc(facts.event_time).weekday())


@request_feature("is_mobile")
def is_mobile(facts: RequestFacts) -> float:
    """1.0 when the User-Agent is a phone, tablet or mobile app's, else 0.0."""
    return 1.0 if _MOBILE_UA.search(facts.user_agent) else 0.0


@request_feature("query_length")
def query_length(facts: RequestFacts) -> float:
    """The number of characters in the request's query."""
    return float(len(facts.query))


#: The built-in features, in a stable order.
REQUEST_FEATURES: tuple[str, ...] = ("hour_of_day", "day_of_week", "is_mobile", "query_length")


def compute_request_features(
    facts: RequestFacts, names: Iterable[str] | None = None
) -> dict[str, float]:
    """The named request-time features of one request (every registered one by default).

    KeyError naming a feature that is not registered.
    """
    wanted = registered_features() if names is None else tuple(names)
    unknown = [n for n in wanted if n not in _REGISTRY]
    if unknown:
        raise KeyError(f"unknown request features: {', '.join(unknown)}")
    return {name: _REGISTRY[name](facts) for name in wanted}
