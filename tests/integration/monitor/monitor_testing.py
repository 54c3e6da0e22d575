"""Helpers the monitor tests share."""

from __future__ import annotations

#: Midnight, 1 Jan 2026: a fixed start for the test clock.
T0 = 1_767_225_600.0


class TestClock:
    """A clock the test moves by hand."""

    __test__ = False

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now
