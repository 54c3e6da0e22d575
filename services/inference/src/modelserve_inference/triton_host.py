"""The two kinds of Triton the supervisor can watch: a child process, or a remote server."""

from __future__ import annotations

import asyncio
import contextlib

from modelserve_triton.process import TritonServer
from modelserve_triton.runner import TritonError, TritonRunner


class LocalTriton:
    """A tritonserver this service started: restarted on the same ports when it dies."""

    def __init__(
        self,
        server: TritonServer,
        runner: TritonRunner,
        *,
        probe_timeout_s: float,
        start_timeout_s: float,
    ) -> None:
        self._server = server
        self._runner = runner
        self._probe_timeout_s = probe_timeout_s
        self._start_timeout_s = start_timeout_s

    async def is_live(self) -> bool:
        return await self._runner.is_server_live(timeout_s=self._probe_timeout_s)

    async def wait_exited(self) -> None:
        await self._server.wait_exited()

    async def recover(self) -> None:
        await self._server.restart(timeout=self._start_timeout_s)


class RemoteTriton:
    """A Triton someone else runs: we can only wait for it to answer again."""

    def __init__(
        self, runner: TritonRunner, *, probe_timeout_s: float, poll_interval_s: float
    ) -> None:
        self._runner = runner
        self._probe_timeout_s = probe_timeout_s
        self._poll_interval_s = poll_interval_s

    async def is_live(self) -> bool:
        return await self._runner.is_server_live(timeout_s=self._probe_timeout_s)

    async def wait_exited(self) -> None:
        await asyncio.Event().wait()

    async def recover(self) -> None:
        while True:
            with contextlib.suppress(TritonError):
                if await self._runner.is_server_ready(timeout_s=self._probe_timeout_s):
                    return
            await asyncio.sleep(self._poll_interval_s)
