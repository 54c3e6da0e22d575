"""WatchAlerts and alert webhooks through a real MonitorService on a real Redis, on a test clock."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from monitor_testing import T0, TestClock, log_and_count, prediction_record
from prometheus_client import REGISTRY
from structlog.testing import capture_logs
from support import eventually, running

from modelserve.monitor.v1 import monitor_service_pb2 as pb
from modelserve.monitor.v1 import monitor_service_pb2_grpc as pb_grpc
from modelserve.type.v1 import prediction_record_pb2 as rec_pb
from modelserve_monitor.config import AlertSettings, MonitorSettings, WebhookSettings
from modelserve_monitor.server import MonitorApp, build_server
from modelserve_runtime.errors import decode_rpc_error

V1 = "models/fraud/versions/1"
DEADLINE_S = 10.0
EVENTS_STREAM = "modelserve:monitor:alert_events"


def _record(
    request_id: str, *, endpoint: str = "fraud", error: bool = False
) -> rec_pb.PredictionRecord:
    return prediction_record(request_id, V1, endpoint=endpoint, error=error)


def _errors(prefix: str, *, endpoint: str = "fraud") -> list[rec_pb.PredictionRecord]:
    """100 records, 5 % of them errors: error_rate_high holds."""
    return [_record(f"{prefix}{i}", endpoint=endpoint, error=i % 20 == 0) for i in range(100)]


MonitorFactory = Any


@pytest.fixture
async def start_monitor(
    redis_url: str, redis_client: aioredis.Redis, clock: TestClock
) -> AsyncIterator[MonitorFactory]:
    """Starts monitors on the test clock (alerts evaluated only when the test asks); each
    is stopped when the test ends, or earlier through its own exit stack."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            webhooks: WebhookSettings | None = None,
        ) -> tuple[pb_grpc.MonitorServiceStub, MonitorApp, contextlib.AsyncExitStack]:
            settings = MonitorSettings(
                redis_url=redis_url,
                consumer_name="watch-test",
                block_ms=100,
                alerts=AlertSettings(interval_s=3600, webhook=webhooks or WebhookSettings()),
            )
            own = contextlib.AsyncExitStack()
            await stack.enter_async_context(own)
            _, channel, app = await own.enter_async_context(
                running(functools.partial(build_server, clock=clock), settings)
            )
            assert isinstance(app, MonitorApp)
            return pb_grpc.MonitorServiceStub(channel), app, own

        yield start


async def _next(call: Any) -> pb.AlertEvent:
    """The next event of a watch; fails the test when none comes in time."""
    async with asyncio.timeout(DEADLINE_S):
        response = await call.read()
    assert response is not grpc.aio.EOF, "the watch ended"
    event: pb.AlertEvent = response.event
    return event


def _summary(event: pb.AlertEvent) -> tuple[int, int, int, int]:
    return event.sequence, event.type, event.alert.state, event.previous_state


class TestWatchAlerts:
    async def test_watch_sees_pending_firing_resolved(
        self, start_monitor: MonitorFactory, redis_client: aioredis.Redis, clock: TestClock
    ) -> None:
        """A watch from 0 gets the (empty) snapshot, then each change as it is made, numbered."""
        stub, app, _ = await start_monitor()
        call = stub.WatchAlerts(pb.WatchAlertsRequest())
        synced = await _next(call)
        assert (synced.type, synced.sequence, synced.HasField("alert")) == (
            pb.ALERT_EVENT_TYPE_SYNCED,
            0,
            False,
        )
        await log_and_count(redis_client, app, _errors("r"))
        await app.alerts.evaluate()
        pending = await _next(call)
        assert _summary(pending) == (
            1,
            pb.ALERT_EVENT_TYPE_CHANGED,
            pb.ALERT_STATE_PENDING,
            pb.ALERT_STATE_UNSPECIFIED,
        )
        assert (pending.alert.rule, pending.alert.endpoint, pending.alert.model_version) == (
            "error_rate_high",
            "fraud",
            V1,
        )
        assert pending.change_time.ToSeconds() == int(T0)
        clock.now += 120
        await app.alerts.evaluate()
        firing = await _next(call)
        assert _summary(firing) == (
            2,
            pb.ALERT_EVENT_TYPE_CHANGED,
            pb.ALERT_STATE_FIRING,
            pb.ALERT_STATE_PENDING,
        )
        assert firing.alert.fire_time.ToSeconds() == int(T0 + 120)
        clock.now += 600
        await app.alerts.evaluate()
        resolved = await _next(call)
        assert _summary(resolved) == (
            3,
            pb.ALERT_EVENT_TYPE_CHANGED,
            pb.ALERT_STATE_RESOLVED,
            pb.ALERT_STATE_FIRING,
        )
        call.cancel()

    async def test_reconnect_after_sequence_misses_nothing(
        self, start_monitor: MonitorFactory, redis_client: aioredis.Redis, clock: TestClock
    ) -> None:
        """Changes made while a watcher is away come, in order and once each, when it resumes
        after the last sequence it saw; a new watch starts from the alerts as they stand."""
        stub, app, _ = await start_monitor()
        first = stub.WatchAlerts(pb.WatchAlertsRequest())
        await _next(first)
        await log_and_count(redis_client, app, _errors("a"))
        await app.alerts.evaluate()
        last_seen = (await _next(first)).sequence
        first.cancel()
        clock.now += 120
        await app.alerts.evaluate()  # firing
        clock.now += 600
        await app.alerts.evaluate()  # resolved
        await log_and_count(redis_client, app, _errors("b"))
        await app.alerts.evaluate()  # holds again: a new pending alert
        resumed = stub.WatchAlerts(pb.WatchAlertsRequest(after_sequence=last_seen))
        missed = [_summary(await _next(resumed)) for _ in range(3)]
        assert missed == [
            (2, pb.ALERT_EVENT_TYPE_CHANGED, pb.ALERT_STATE_FIRING, pb.ALERT_STATE_PENDING),
            (3, pb.ALERT_EVENT_TYPE_CHANGED, pb.ALERT_STATE_RESOLVED, pb.ALERT_STATE_FIRING),
            (4, pb.ALERT_EVENT_TYPE_CHANGED, pb.ALERT_STATE_PENDING, pb.ALERT_STATE_RESOLVED),
        ]
        clock.now += 120
        await app.alerts.evaluate()
        live = await _next(resumed)
        assert _summary(live)[:3] == (5, pb.ALERT_EVENT_TYPE_CHANGED, pb.ALERT_STATE_FIRING)
        resumed.cancel()
        fresh = stub.WatchAlerts(pb.WatchAlertsRequest())
        current, synced = await _next(fresh), await _next(fresh)
        assert (current.type, current.sequence, current.alert.state) == (
            pb.ALERT_EVENT_TYPE_CURRENT,
            5,
            pb.ALERT_STATE_FIRING,
        )
        assert (synced.type, synced.sequence) == (pb.ALERT_EVENT_TYPE_SYNCED, 5)
        fresh.cancel()

    async def test_dropped_pending_alert_and_endpoint_filter(
        self, start_monitor: MonitorFactory, redis_client: aioredis.Redis, clock: TestClock
    ) -> None:
        """A pending alert that stops holding is reported DROPPED; a watch of one endpoint
        skips the changes of the others."""
        stub, app, _ = await start_monitor()
        await log_and_count(redis_client, app, _errors("f"))
        await app.alerts.evaluate()  # 1: fraud pending
        only_other = stub.WatchAlerts(pb.WatchAlertsRequest(endpoint="other", after_sequence=1))
        clock.now += 400
        await log_and_count(redis_client, app, (_record(f"ok{i}") for i in range(100)))
        await log_and_count(redis_client, app, _errors("o", endpoint="other"))
        await app.alerts.evaluate()  # 2: fraud dropped, 3: other pending
        event = await _next(only_other)
        assert (event.sequence, event.alert.endpoint, event.alert.state) == (
            3,
            "other",
            pb.ALERT_STATE_PENDING,
        )
        only_other.cancel()
        everything = stub.WatchAlerts(pb.WatchAlertsRequest(after_sequence=1))
        dropped = await _next(everything)
        assert _summary(dropped) == (
            2,
            pb.ALERT_EVENT_TYPE_DROPPED,
            pb.ALERT_STATE_PENDING,
            pb.ALERT_STATE_PENDING,
        )
        assert dropped.alert.endpoint == "fraud"
        everything.cancel()

    async def test_bad_or_lost_cursors_are_refused(
        self, start_monitor: MonitorFactory, redis_client: aioredis.Redis, clock: TestClock
    ) -> None:
        """A negative or never-given sequence is INVALID_ARGUMENT; one whose next changes are
        no longer kept is FAILED_PRECONDITION (ALERT_EVENTS_TRIMMED) rather than a silent gap."""
        stub, app, _ = await start_monitor()
        await log_and_count(redis_client, app, _errors("r"))
        await app.alerts.evaluate()  # 1: pending
        clock.now += 120
        await app.alerts.evaluate()  # 2: firing
        clock.now += 600
        await app.alerts.evaluate()  # 3: resolved
        assert await redis_client.xlen(EVENTS_STREAM) == 3
        for after in (-1, 99):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _next(stub.WatchAlerts(pb.WatchAlertsRequest(after_sequence=after)))
            error = decode_rpc_error(info.value)
            assert error.code is grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in error.violations] == ["after_sequence"]
        # Retention dropped the first two changes: resuming after 1 would miss number 2.
        await redis_client.xtrim(EVENTS_STREAM, minid="3-0", approximate=False)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _next(stub.WatchAlerts(pb.WatchAlertsRequest(after_sequence=1)))
        error = decode_rpc_error(info.value)
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ALERT_EVENTS_TRIMMED",
        )
        assert error.metadata["oldest_sequence"] == "3"
        resumed = stub.WatchAlerts(pb.WatchAlertsRequest(after_sequence=2))
        assert (await _next(resumed)).sequence == 3
        resumed.cancel()


class WebhookReceiver:
    """A small HTTP server that records each POSTed JSON body and answers with a status.

    `failures` says how many times each change (by sequence) is refused with 503 before
    it is accepted; None refuses every attempt with 500.
    """

    def __init__(self, failures: int | None = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        self._failures = failures
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> WebhookReceiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hooks/secret-token"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = json.loads(await reader.readexactly(int(headers["content-length"])))
        assert request_line.startswith(b"POST /hooks/secret-token ")
        assert headers["content-type"] == "application/json"
        self.bodies.append(body)
        tries = sum(1 for b in self.bodies if b["sequence"] == body["sequence"])
        if self._failures is None:
            status = "500 Internal Server Error"
        elif tries <= self._failures:
            status = "503 Service Unavailable"
        else:
            status = "200 OK"
            self.accepted.append(body)
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()


def _deliveries(url: str, outcome: str) -> float:
    host = url.split("/")[2]
    value = REGISTRY.get_sample_value(
        "modelserve_monitor_alert_webhook_total", {"webhook": host, "outcome": outcome}
    )
    return value or 0.0


async def _webhook_cursor(client: aioredis.Redis, expected: bytes) -> bool:
    """True when the only webhook's delivery cursor in Redis is `expected`."""
    keys = [key async for key in client.scan_iter("modelserve:monitor:webhook:*:cursor")]
    return len(keys) == 1 and await client.get(keys[0]) == expected


def _quick(urls: list[str]) -> WebhookSettings:
    return WebhookSettings(urls=urls, timeout_s=5, max_attempts=3, backoff_s=0.01)


class TestAlertWebhooks:
    async def test_each_change_is_posted_in_order_and_a_failing_webhook_stops_nothing(
        self, start_monitor: MonitorFactory, redis_client: aioredis.Redis, clock: TestClock
    ) -> None:
        """Every change reaches the webhook once accepted, in order, after retries of refused
        attempts; a webhook that always fails is given up per change and counted, while the
        alerts and the other webhook carry on."""
        with capture_logs() as logs:
            await self._deliver_through_flaky_and_broken(start_monitor, redis_client, clock)
        given_up = [e for e in logs if e["event"] == "alert_webhook_failed"]
        assert [(e["sequence"], e["attempts"], e["error"]) for e in given_up] == [
            (1, 3, "HTTP 500"),
            (2, 3, "HTTP 500"),
            (3, 3, "HTTP 500"),
        ]
        assert "secret-token" not in repr(logs), "a webhook URL's path may hold a secret"

    async def _deliver_through_flaky_and_broken(
        self, start_monitor: MonitorFactory, redis_client: aioredis.Redis, clock: TestClock
    ) -> None:
        async with (
            WebhookReceiver(failures=1) as flaky,
            WebhookReceiver(failures=None) as broken,
        ):
            failed_before = _deliveries(broken.url, "failed")
            stub, app, _ = await start_monitor(_quick([flaky.url, broken.url]))
            await log_and_count(redis_client, app, _errors("r"))
            await app.alerts.evaluate()
            clock.now += 120
            await app.alerts.evaluate()
            clock.now += 600
            await app.alerts.evaluate()
            resolved = await stub.ListAlerts(pb.ListAlertsRequest(state=pb.ALERT_STATE_RESOLVED))
            assert [a.rule for a in resolved.alerts] == ["error_rate_high"]
            await eventually(lambda: len(flaky.accepted) == 3, "three changes delivered")
            assert [
                (b["sequence"], b["type"], b["previous_state"], b["alert"]["state"])
                for b in flaky.accepted
            ] == [
                (1, "changed", None, "pending"),
                (2, "changed", "pending", "firing"),
                (3, "changed", "firing", "resolved"),
            ]
            first = flaky.accepted[0]
            assert first["time"] == T0
            assert (first["alert"]["rule"], first["alert"]["endpoint"]) == (
                "error_rate_high",
                "fraud",
            )
            assert first["alert"]["model_version"] == V1
            assert first["alert"]["value"] == pytest.approx(0.05)
            assert [b["sequence"] for b in flaky.bodies] == [1, 1, 2, 2, 3, 3]
            await eventually(lambda: len(broken.bodies) == 9, "three attempts at each change")
            await eventually(
                lambda: _deliveries(broken.url, "failed") - failed_before == 3,
                "each change given up once",
            )
            assert [b["sequence"] for b in broken.bodies] == [1, 1, 1, 2, 2, 2, 3, 3, 3]

    async def test_delivery_resumes_after_a_restart_without_repeats(
        self, start_monitor: MonitorFactory, redis_client: aioredis.Redis, clock: TestClock
    ) -> None:
        """The webhook's cursor lives in Redis: a change made while no monitor delivered is
        sent after the restart, and nothing delivered before is sent again."""
        async with WebhookReceiver() as receiver:
            _, app, stack = await start_monitor(_quick([receiver.url]))
            await log_and_count(redis_client, app, _errors("r"))
            await app.alerts.evaluate()
            await eventually(
                lambda: _webhook_cursor(redis_client, b"1"), "first change delivered and noted"
            )
            await stack.aclose()
            _, app, stack = await start_monitor()
            clock.now += 120
            await app.alerts.evaluate()  # fires while no webhook runs
            await stack.aclose()
            _, app, _ = await start_monitor(_quick([receiver.url]))
            clock.now += 600
            await app.alerts.evaluate()
            await eventually(lambda: len(receiver.accepted) == 3, "missed and new change delivered")
            assert [b["alert"]["state"] for b in receiver.accepted] == [
                "pending",
                "firing",
                "resolved",
            ]
            assert [b["sequence"] for b in receiver.bodies] == [1, 2, 3]

    async def test_a_new_webhook_starts_after_the_newest_change(
        self, start_monitor: MonitorFactory, redis_client: aioredis.Redis, clock: TestClock
    ) -> None:
        """A URL configured later gets the changes from then on, not the history."""
        _, app, stack = await start_monitor()
        await log_and_count(redis_client, app, _errors("r"))
        await app.alerts.evaluate()
        await stack.aclose()
        async with WebhookReceiver() as receiver:
            _, app, _ = await start_monitor(_quick([receiver.url]))
            clock.now += 120
            await app.alerts.evaluate()
            await eventually(lambda: len(receiver.accepted) == 1, "the new change delivered")
            assert [b["sequence"] for b in receiver.bodies] == [2]
