"""How long one request may take at the router, alone or as one request of a stream."""

from __future__ import annotations

import pytest

from modelserve_router.predict import request_budget


@pytest.mark.parametrize(
    ("remaining_s", "streamed", "budget_s"),
    [
        (None, False, 2.0),  # no deadline: REQUEST_TIMEOUT_S
        (10.0, False, 10.0),  # a unary call's own deadline
        (7200.0, False, 3600.0),  # at most an hour
        (None, True, 2.0),
        (3600.0, True, 2.0),  # a stream's hour is not each request's
        (0.5, True, 0.5),  # but a stream about to end bounds its requests
    ],
)
def test_budget(remaining_s: float | None, streamed: bool, budget_s: float) -> None:
    assert request_budget(remaining_s, 2.0, streamed=streamed) == budget_s
