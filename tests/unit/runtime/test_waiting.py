"""wait_until_set and wait_for_notify: woken, timed out, and never losing a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from modelserve_runtime.waiting import cancel_all, wait_for_notify, wait_until_set


async def test_an_event_set_meanwhile_wakes_the_waiter() -> None:
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_until_set(event, 30.0))
    await asyncio.sleep(0)
    event.set()
    assert await waiter is True


async def test_a_wait_that_runs_out_answers_false() -> None:
    assert await wait_until_set(asyncio.Event(), 0.01) is False


async def test_a_cancel_in_the_pass_that_sets_the_event_still_cancels() -> None:
    """The Python 3.11 asyncio.wait_for race: the event is set and the waiting task cancelled
    before either runs. wait_for would return normally and the cancel would be lost; a loop
    waiting that way would never stop."""
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_until_set(event, 30.0))
    await asyncio.sleep(0)
    event.set()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_a_notify_wakes_and_a_cancel_in_the_same_pass_still_cancels() -> None:
    condition = asyncio.Condition()

    async def wait() -> bool:
        async with condition:
            return await wait_for_notify(condition, 30.0)

    woken = asyncio.create_task(wait())
    await asyncio.sleep(0)
    async with condition:
        condition.notify_all()
    assert await woken is True

    cancelled = asyncio.create_task(wait())
    await asyncio.sleep(0)
    async with condition:
        condition.notify_all()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await _times_out(condition) is False


async def _times_out(condition: asyncio.Condition) -> bool:
    async with condition:
        return await wait_for_notify(condition, 0.01)


async def test_cancel_all_stops_tasks_and_names_one_that_will_not_stop() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # swallows every cancel, as a buggy loop would

    polite = asyncio.create_task(asyncio.Event().wait(), name="polite")
    stuck = asyncio.create_task(stubborn(), name="stuck")
    await asyncio.sleep(0)
    try:
        assert await cancel_all([polite, stuck], timeout_s=0.05) == ["stuck"]
        assert polite.cancelled()
    finally:
        release.set()
    await stuck
