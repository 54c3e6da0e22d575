"""Alert webhooks: every alert change POSTed as JSON to a URL, off the evaluation path.

Each URL has its own task that follows the stream of alert changes from a cursor kept in
Redis, so evaluation never waits on a webhook, a slow or failing URL delays no other, a
restart resumes where delivery stopped (at least once: a receiver drops repeats by
`sequence`), and changes arrive in order. A POST that fails (no answer within the timeout,
a connection error, HTTP 408, 429 or 5xx) is retried with a doubling pause; after the last
attempt, or at once for any other 4xx, the change is logged, counted as failed and skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio as redis
import structlog
from prometheus_client import Counter

from modelserve_monitor.alerts import AlertEvent, AlertLog
from modelserve_monitor.store import PREFIX

log = structlog.get_logger()

DELIVERIES = Counter(
    "modelserve_monitor_alert_webhook_total",
    "Alert changes sent to webhooks, by outcome (delivered, retried, failed, skipped).",
    ["webhook", "outcome"],
)

_RETRY_STATUSES = frozenset({408, 429})
_MAX_REDIS_BACKOFF_S = 5.0


class WebhookError(Exception):
    """A POST that did not succeed; `retry` says whether trying again may help."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def _post_blocking(url: str, body: bytes, timeout_s: float) -> int:
    request = urllib.request.Request(
        url,
        data=body,
        headers={"Content-Type": "application/json", "User-Agent": "modelserve-monitor"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return int(response.status)


async def post_json(url: str, body: bytes, timeout_s: float) -> int:
    """POSTs with the standard library's HTTP client in a worker thread (proxies from the
    environment apply); the HTTP status, or WebhookError."""
    try:
        return await asyncio.to_thread(_post_blocking, url, body, timeout_s)
    except urllib.error.HTTPError as exc:
        retry = exc.code in _RETRY_STATUSES or exc.code >= 500
        raise WebhookError(f"HTTP {exc.code}", retry=retry) from None
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections
        raise WebhookError(str(exc), retry=True) from None


def webhook_name(url: str) -> str:
    """The URL's host and port: safe to log, while its path or user info may hold a token."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a change is sent."""

    timeout_s: float = 5.0
    max_attempts: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0


class AlertWebhook:
    """Delivers every alert change to one URL, in order, from a cursor kept in Redis."""

    def __init__(
        self,
        client: redis.Redis,
        alert_log: AlertLog,
        url: str,
        *,
        policy: RetryPolicy,
        block_ms: int,
    ) -> None:
        self._redis = client
        self._log = alert_log
        self._url = url
        self._policy = policy
        self._block_ms = block_ms
        self.name = webhook_name(url)
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        self._cursor_key = f"{PREFIX}:webhook:{digest}:cursor"

    async def start_position(self) -> int:
        """The sequence delivery continues after; a new URL starts after the newest change
        (earlier changes are not replayed to it)."""
        _, newest = await self._log.bounds()
        await self._redis.set(self._cursor_key, newest, nx=True)
        return int(await self._redis.get(self._cursor_key) or 0)

    async def run(self) -> None:
        """Delivers until cancelled; a Redis error is logged and retried after a pause."""
        backoff_s = 0.1
        while True:
            try:
                cursor = await self.start_position()
                while True:
                    for change in await self._log.changes_after(cursor, block_ms=self._block_ms):
                        if change.sequence > cursor + 1:
                            missed = change.sequence - cursor - 1
                            DELIVERIES.labels(self.name, "skipped").inc(missed)
                            log.warning(
                                "alert_webhook_changes_trimmed", webhook=self.name, missed=missed
                            )
                        await self.deliver(change)
                        cursor = change.sequence
                        await self._redis.set(self._cursor_key, cursor)
                    backoff_s = 0.1
            except redis.RedisError as exc:
                log.warning("alert_webhook_read_failed", webhook=self.name, error=str(exc))
            except Exception:
                # A bug must not end deliveries for good; the traceback goes to the log.
                log.exception("alert_webhook_crashed", webhook=self.name)
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, _MAX_REDIS_BACKOFF_S)

    async def deliver(self, change: AlertEvent) -> bool:
        """POSTs one change, retrying as the policy says; False when it was given up."""
        body = json.dumps(change.to_dict()).encode()
        policy = self._policy
        for attempt in range(1, policy.max_attempts + 1):
            started = time.monotonic()
            try:
                await post_json(self._url, body, policy.timeout_s)
            except WebhookError as exc:
                if exc.retry and attempt < policy.max_attempts:
                    DELIVERIES.labels(self.name, "retried").inc()
                    pause = min(policy.backoff_s * 2 ** (attempt - 1), policy.backoff_max_s)
                    log.info(
                        "alert_webhook_retry",
                        webhook=self.name,
                        sequence=change.sequence,
                        attempt=attempt,
                        retry_in_s=pause,
                        error=str(exc),
                    )
                    await asyncio.sleep(pause)
                    continue
                DELIVERIES.labels(self.name, "failed").inc()
                log.warning(
                    "alert_webhook_failed",
                    webhook=self.name,
                    sequence=change.sequence,
                    attempts=attempt,
                    error=str(exc),
                )
                return False
            DELIVERIES.labels(self.name, "delivered").inc()
            log.info(
                "alert_webhook_delivered",
                webhook=self.name,
                sequence=change.sequence,
                attempts=attempt,
                seconds=round(time.monotonic() - started, 4),
            )
            return True
        return False
