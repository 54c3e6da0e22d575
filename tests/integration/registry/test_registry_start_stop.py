"""A service told to stop while its start still waits (for its workers, say) stops at once,
never reporting SERVING, instead of finishing the wait first."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from modelserve_registry.config import RegistrySettings
from modelserve_registry.server import build_server
from modelserve_runtime.discovery import StaticDiscovery
from modelserve_runtime.server import ServiceApp, serve


async def test_a_stop_during_the_wait_before_serving_ends_the_start(tmp_path: Path) -> None:
    stop = asyncio.Event()
    waiting = asyncio.Event()
    ended: list[str] = []

    async def never_ready(_: ServiceApp) -> None:
        waiting.set()
        try:
            await asyncio.Event().wait()
        finally:
            ended.append("cancelled")

    settings = RegistrySettings(production_traffic_only=False, data_dir=tmp_path)
    with capture_logs() as logs:
        running = asyncio.create_task(
            serve(
                "registry",
                settings,
                build_server,
                discovery=StaticDiscovery({}),
                stop_event=stop,
                before_serving=never_ready,
            )
        )
        await asyncio.wait_for(waiting.wait(), 30)
        stop.set()
        # Without the race against the stop, the start would wait for ever.
        await asyncio.wait_for(running, 30)
    assert ended == ["cancelled"]
    events = [e["event"] for e in logs]
    assert "service_started" not in events
    (stopping,) = [e for e in logs if e["event"] == "service_stopping"]
    assert stopping["serving"] is False
    assert events[-1] == "service_stopped"
