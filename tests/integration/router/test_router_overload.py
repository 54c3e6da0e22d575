"""Overload limits and API keys at the router: an endpoint's in-flight limit and each caller's
token bucket answer RESOURCE_EXHAUSTED at once with a RetryInfo while requests within limits
are served; a missing or wrong key is UNAUTHENTICATED."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from router_testing import (
    V1,
    WAIT_S,
    Dependencies,
    deploy,
    refused,
    request,
    router,
    router_settings,
)
from support import eventually, running

from modelserve.router.v1 import router_service_pb2_grpc as router_grpc
from modelserve_router.server import build_server
from modelserve_runtime.auth import Role, new_api_key
from modelserve_runtime.channels import create_channel

pytestmark = pytest.mark.triton

#: Cheap scrypt for tests; production keys use the default cost.
TEST_SCRYPT_N = 16


class TestInFlightLimit:
    async def test_refused_at_the_limit_served_within_it(self, dependencies: Dependencies) -> None:
        """With one request of the endpoint held in flight (Redis paused under its feature
        read), the next is refused at once with ENDPOINT_OVERLOADED and the configured retry
        delay; the held one then completes, and so does a request after it."""
        deps = dependencies
        await deploy(deps, "in-flight", V1)
        async with router(
            deps,
            endpoints={"in-flight": {"max_in_flight": 1, "in_flight_retry_after_s": 0.25}},
            feature_timeout_s=WAIT_S,
            request_timeout_s=WAIT_S,
        ) as (stub, app):
            assert (await stub.Predict(request("in-flight"))).model_version == V1
            pid = deps.redis.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                held = asyncio.ensure_future(stub.Predict(request("in-flight")))
                await eventually(
                    lambda: app.predictor.in_flight("in-flight") == 1,
                    "the held request in flight",
                    within_s=WAIT_S,
                )
                error = await refused(stub.Predict(request("in-flight"), timeout=WAIT_S))
            finally:
                os.kill(pid, signal.SIGCONT)
            answered = await held
            after = await stub.Predict(request("in-flight"))
        assert (error.code, error.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "ENDPOINT_OVERLOADED",
        )
        assert error.retry_delay_s == 0.25
        assert error.metadata == {"endpoint": "in-flight", "max_in_flight": "1"}
        assert (answered.model_version, answered.degraded) == (V1, False)
        assert (after.model_version, after.degraded) == (V1, False)
        assert app.predictor.in_flight("in-flight") == 0


class TestRateLimit:
    async def test_each_key_has_its_own_bucket(self, dependencies: Dependencies) -> None:
        """A key over its burst is refused with RATE_LIMITED and a RetryInfo of the wait for
        its next token, while another key, with its own larger burst, is still served."""
        deps = dependencies
        await deploy(deps, "rate-keys", V1)
        alice_key, alice = new_api_key("alice", {Role.VIEWER}, n=TEST_SCRYPT_N)
        bob_key, bob = new_api_key("bob", {Role.DEPLOYER}, n=TEST_SCRYPT_N)
        async with router(
            deps,
            auth={"enabled": True, "keys": [alice.model_dump(), bob.model_dump()]},
            rate_limit={"requests_per_s": 0.01, "burst": 2},
            principal_rate_limits={"bob": {"burst": 4}},
        ) as (stub, _):
            alice_meta = (("x-api-key", alice_key),)
            bob_meta = (("authorization", f"Bearer {bob_key}"),)
            for _ in range(2):
                await stub.Predict(request("rate-keys"), metadata=alice_meta)
            over = await refused(stub.Predict(request("rate-keys"), metadata=alice_meta))
            served = [await stub.Predict(request("rate-keys"), metadata=bob_meta) for _ in range(4)]
            bob_over = await refused(stub.Predict(request("rate-keys"), metadata=bob_meta))
        assert (over.code, over.reason, over.metadata) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
            {"principal": "alice"},
        )
        # 0.01 tokens a second: the next token is about 100 s away.
        assert over.retry_delay_s is not None and 90 < over.retry_delay_s <= 100
        assert {(a.model_version, a.degraded) for a in served} == {(V1, False)}
        assert (bob_over.reason, bob_over.metadata) == ("RATE_LIMITED", {"principal": "bob"})

    async def test_anonymous_callers_share_one_bucket(self, dependencies: Dependencies) -> None:
        """With auth off every caller is `anonymous`: callers on different connections draw
        from one bucket, and the one that finds it empty is refused."""
        deps = dependencies
        await deploy(deps, "rate-anonymous", V1)
        settings = router_settings(deps, rate_limit={"requests_per_s": 0.01, "burst": 2})
        async with (
            running(build_server, settings) as (server, channel, _),
            create_channel(f"127.0.0.1:{server.port}") as other_channel,
        ):
            stub = router_grpc.RouterServiceStub(channel)
            other = router_grpc.RouterServiceStub(other_channel)
            assert (await stub.Predict(request("rate-anonymous"))).model_version == V1
            assert (await other.Predict(request("rate-anonymous"))).model_version == V1
            error = await refused(other.Predict(request("rate-anonymous")))
            again = await refused(stub.Predict(request("rate-anonymous")))
        assert (error.reason, error.metadata) == ("RATE_LIMITED", {"principal": "anonymous"})
        assert again.reason == "RATE_LIMITED"


class TestAuth:
    async def test_missing_or_wrong_key_is_unauthenticated(
        self, dependencies: Dependencies
    ) -> None:
        """With auth on, no key and a wrong key are UNAUTHENTICATED before any work; a valid
        key of any role predicts."""
        deps = dependencies
        await deploy(deps, "auth", V1)
        key, record = new_api_key("carol", {Role.VIEWER}, n=TEST_SCRYPT_N)
        wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
        async with router(deps, auth={"enabled": True, "keys": [record.model_dump()]}) as (
            stub,
            _,
        ):
            missing = await refused(stub.Predict(request("auth")))
            invalid = await refused(stub.Predict(request("auth"), metadata=(("x-api-key", wrong),)))
            served = await stub.Predict(request("auth"), metadata=(("x-api-key", key),))
        assert (missing.code, missing.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_MISSING",
        )
        assert (invalid.code, invalid.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_INVALID",
        )
        assert (served.model_version, served.degraded) == (V1, False)
