"""The fan-out of version state changes behind WatchModelStates."""

from __future__ import annotations

import pytest

from modelserve_inference.models import HeldVersion, VersionState
from modelserve_inference.state_feed import StateChange, StateFeed
from modelserve_runtime.errors import UnavailableError

V1 = "models/fraud/versions/1"


def _held(state: VersionState) -> HeldVersion:
    return HeldVersion(V1, "fraud", 1, state)


class TestStateFeed:
    async def test_a_watch_gets_the_whole_state_then_each_change_in_order(self) -> None:
        """A watch starts from the state it was opened with and then sees every change, until
        the feed ends its watches."""
        feed = StateFeed()
        watch = feed.open([_held(VersionState.LOADING)])
        feed.publish(StateChange(changed=(_held(VersionState.WARMING),)))
        feed.publish(StateChange(changed=(_held(VersionState.READY),)))
        feed.publish(StateChange(removed=(V1,)))
        feed.end_watches()

        seen = [change async for change in watch]

        assert [h.state for h in watch.initial] == [VersionState.LOADING]
        assert [[h.state for h in c.changed] for c in seen] == [
            [VersionState.WARMING],
            [VersionState.READY],
            [],
        ]
        assert seen[-1].removed == (V1,)

    async def test_a_watcher_too_far_behind_is_ended(self) -> None:
        """More unread changes than the limit end the watch with UNAVAILABLE, so it starts over."""
        feed = StateFeed(max_pending=2)
        watch = feed.open([])
        for state in (VersionState.LOADING, VersionState.WARMING, VersionState.READY):
            feed.publish(StateChange(changed=(_held(state),)))

        with pytest.raises(UnavailableError) as info:
            await anext(aiter(watch))

        assert info.value.reason == "WATCHER_TOO_SLOW"

    async def test_listeners_hear_every_publish(self) -> None:
        """Listeners are woken by every publish, an empty one (Triton back) included."""
        feed = StateFeed()
        calls: list[None] = []
        feed.add_listener(lambda: calls.append(None))

        feed.publish(StateChange())
        feed.publish(StateChange(removed=(V1,)))

        assert len(calls) == 2
