"""Fans the state changes of held versions out to watchers (WatchModelStates, the reconcile loop)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelserve_runtime.errors import UnavailableError

if TYPE_CHECKING:
    from modelserve_inference.models import HeldVersion


@dataclass(frozen=True, slots=True)
class StateChange:
    """Versions whose state changed (copies, as they are now) and versions no longer held."""

    changed: tuple[HeldVersion, ...] = ()
    removed: tuple[str, ...] = ()


class StateWatch:
    """One watcher's view: the held versions when it started, then every change in order.

    Changes queue up to `max_pending`; a watcher that falls further behind is ended with
    UnavailableError, so that it reconnects and starts again from the whole state rather
    than holding the service's memory.
    """

    def __init__(self, initial: Sequence[HeldVersion], max_pending: int) -> None:
        self.initial = tuple(initial)
        self._pending: deque[StateChange] = deque()
        self._max_pending = max_pending
        self._arrived = asyncio.Event()
        self._overflowed = False
        self._ended = False

    def _push(self, change: StateChange) -> None:
        if len(self._pending) >= self._max_pending:
            self._overflowed = True
        else:
            self._pending.append(change)
        self._arrived.set()

    def _end(self) -> None:
        self._ended = True
        self._arrived.set()

    async def __aiter__(self) -> AsyncIterator[StateChange]:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if self._overflowed:
                raise UnavailableError(
                    f"the watcher fell more than {self._max_pending} changes behind; reconnect",
                    reason="WATCHER_TOO_SLOW",
                )
            while self._pending:
                yield self._pending.popleft()
            if self._ended:
                return


class StateFeed:
    """Publishes state changes to every open StateWatch and to plain listeners."""

    def __init__(self, *, max_pending: int = 10_000) -> None:
        self._watches: set[StateWatch] = set()
        self._listeners: list[Callable[[], None]] = []
        self._max_pending = max_pending

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Calls `listener` (without arguments, synchronously) after every publish."""
        self._listeners.append(listener)

    def open(self, initial: Sequence[HeldVersion]) -> StateWatch:
        """A watch starting from `initial`, which the caller reads in the same step (no await
        between), so that no change falls between the whole state and the first change."""
        watch = StateWatch(initial, self._max_pending)
        self._watches.add(watch)
        return watch

    def close_watch(self, watch: StateWatch) -> None:
        """Stops feeding a watch whose reader has gone."""
        self._watches.discard(watch)

    def publish(self, change: StateChange) -> None:
        """Hands a change to every watch and wakes every listener."""
        if change.changed or change.removed:
            for watch in self._watches:
                watch._push(change)
        for listener in self._listeners:
            listener()

    def end_watches(self) -> None:
        """Ends every watch after what it has queued (the service is stopping)."""
        for watch in self._watches:
            watch._end()
        self._watches.clear()
