"""The garbage collector's set-up once a service is up (`tune_gc`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from modelserve_runtime.config import ServerSettings
from modelserve_runtime.server import tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_start_up_objects_are_frozen_and_young_collections_are_rarer(restored_gc: None) -> None:
    """Objects alive at start-up leave the collected generations (a full collection no longer
    walks them), and the youngest generation waits for the configured allocation count; the
    older generations keep their thresholds."""
    start_up = [{"object": i} for i in range(1000)]
    before = gc.get_threshold()

    tune_gc(ServerSettings().gc_threshold)

    assert gc.get_freeze_count() >= len(start_up)
    assert gc.get_threshold() == (50_000, before[1], before[2])
    assert sum(gc.get_count()) < len(start_up)
