"""The coalescing runner's batching rules, over a small in-process model that implements the
router's ModelRunner interface (`y = x @ W`), whose calls a test can hold open."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelserve_router.coalesce import ENDPOINT_BUDGET, WAIT_BOUNDED, CoalescingRunner
from modelserve_router.routing import ServedVersion
from modelserve_router.sources import BATCH_LINKS
from modelserve_runtime.errors import UnavailableError

V1 = ServedVersion("models/m/versions/1", "triton:1", "m", 1)
V2 = ServedVersion("models/m/versions/2", "triton:1", "m", 2)
W = np.arange(6, dtype=np.float32).reshape(3, 2)


class MatMulRunner:
    """`y = x @ (W * version)`; records every call's row count, and holds calls while
    `gate` is clear. Refuses NaN like Triton's INVALID_ARGUMENT; fails all when `down`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.traced: list[tuple[trace.SpanContext, tuple[trace.Link, ...]]] = []
        """Each call's current span and the links it was given (BATCH_LINKS)."""
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False

    async def run(
        self,
        version: ServedVersion,
        inputs: Mapping[str, npt.NDArray[Any]],
        output_names: Sequence[str],
    ) -> dict[str, npt.NDArray[Any]]:
        x = inputs["x"]
        self.calls.append((version.model_version, x.shape[0]))
        self.traced.append((trace.get_current_span().get_span_context(), BATCH_LINKS.get()))
        await self.gate.wait()
        if self.down:
            raise UnavailableError("triton is down", metadata={"upstream_code": "UNAVAILABLE"})
        if np.isnan(x).any():
            raise UnavailableError(
                "triton refused the input", metadata={"upstream_code": "INVALID_ARGUMENT"}
            )
        return {"y": x @ (W * version.triton_model_version)}


def rows(*values: float) -> dict[str, npt.NDArray[np.float32]]:
    return {"x": np.array([[v, v, v] for v in values], dtype=np.float32)}


async def until(check: Any) -> None:
    """Lets the event loop run until `check()` holds (the runner's tasks are in-process)."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0)
    pytest.fail("the coalescer did not get there")


async def test_a_lone_request_goes_at_once() -> None:
    inner = MatMulRunner()
    runner = CoalescingRunner(inner)
    out = await runner.run(V1, rows(1.0), ["y"])
    np.testing.assert_allclose(out["y"], rows(1.0)["x"] @ W)
    assert inner.calls == [(V1.model_version, 1)]


async def test_waiting_requests_ride_together_and_get_their_own_rows() -> None:
    """With one call in flight, the requests that arrive meanwhile go out as ONE call, and
    each caller gets exactly its rows back."""
    inner = MatMulRunner()
    runner = CoalescingRunner(inner, max_batches=1)
    inner.gate.clear()
    first = asyncio.create_task(runner.run(V1, rows(1.0), ["y"]))
    await until(lambda: len(inner.calls) == 1)
    rest = [
        asyncio.create_task(runner.run(V1, rows(float(i), float(i)), ["y"])) for i in range(2, 7)
    ]
    await until(lambda: all(not t.done() for t in rest))
    inner.gate.set()
    answers = await asyncio.gather(first, *rest)
    assert inner.calls == [(V1.model_version, 1), (V1.model_version, 10)]
    for i, answer in zip(range(2, 7), answers[1:], strict=True):
        np.testing.assert_allclose(answer["y"], rows(float(i), float(i))["x"] @ W)


async def test_versions_never_mix_and_batches_respect_the_row_limit() -> None:
    inner = MatMulRunner()
    runner = CoalescingRunner(inner, max_batches=1, max_batch_rows=4)
    inner.gate.clear()
    first = asyncio.create_task(runner.run(V1, rows(1.0), ["y"]))
    await until(lambda: len(inner.calls) == 1)
    ones = [asyncio.create_task(runner.run(V1, rows(1.0, 1.0), ["y"])) for _ in range(3)]
    twos = [asyncio.create_task(runner.run(V2, rows(2.0), ["y"])) for _ in range(2)]
    # V2's lane is free: its two requests, queued in the same turn of the loop, go at once
    # and together, while V1's wait for V1's call in flight.
    await until(lambda: len(inner.calls) == 2)
    assert inner.calls[1] == (V2.model_version, 2)
    inner.gate.set()
    answers = await asyncio.gather(first, *ones, *twos)
    # V1's six waiting rows split at the 4-row limit, never inside a request.
    assert inner.calls[2:] == [(V1.model_version, 4), (V1.model_version, 2)]
    np.testing.assert_allclose(answers[-1]["y"], rows(2.0)["x"] @ (W * 2))


async def _first_alone_then_three_together(
    runner: CoalescingRunner, inner: MatMulRunner, tracer: trace.Tracer
) -> dict[str, trace.SpanContext]:
    """Four requests, each in a span of its own: "first" goes alone and is held while
    "second", "third" and "fourth" queue, then ride in one call. Returns their spans."""
    inner.gate.clear()
    spans: dict[str, trace.SpanContext] = {}

    async def traced(name: str, value: float) -> dict[str, npt.NDArray[Any]]:
        with tracer.start_as_current_span(name) as span:
            spans[name] = span.get_span_context()
            return await runner.run(V1, rows(value), ["y"])

    first = asyncio.create_task(traced("first", 1.0))
    await until(lambda: len(inner.calls) == 1)
    rest = [asyncio.create_task(traced(name, 2.0)) for name in ("second", "third", "fourth")]
    await until(lambda: runner.waiting(V1.model_version) == 3)
    inner.gate.set()
    await asyncio.gather(first, *rest)
    return spans


async def test_a_batch_call_is_its_first_members_and_links_the_others() -> None:
    """A coalesced call runs under its first member's span (its trace continues into Triton
    there), not under the span of whichever request's task drains the lane, and links the
    other members' spans; a call alone runs under its own request's span."""
    tracer = TracerProvider().get_tracer("test")
    inner = MatMulRunner()
    runner = CoalescingRunner(inner, max_batches=1)
    spans = await _first_alone_then_three_together(runner, inner, tracer)
    (alone, no_links), (batch, links) = inner.traced
    assert (alone, no_links) == (spans["first"], ())
    # The drain task is the first request's; the batch is the second's, linked to the rest.
    assert batch == spans["second"]
    assert [link.context for link in links] == [spans["third"], spans["fourth"]]


async def test_the_other_members_traces_show_their_time_in_the_batch_call() -> None:
    """The call is in the first member's trace; each other member's trace gets a
    `router.coalesced` span for its time from queueing to answer, under its own span and
    linked to the first member's span, where the call is. A call alone needs none."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    inner = MatMulRunner()
    runner = CoalescingRunner(inner, max_batches=1, tracer=tracer)
    spans = await _first_alone_then_three_together(runner, inner, tracer)
    coalesced = [s for s in exporter.get_finished_spans() if s.name == "router.coalesced"]
    assert sorted(
        (s.parent.span_id, [link.context for link in s.links]) for s in coalesced if s.parent
    ) == sorted((spans[name].span_id, [spans["second"]]) for name in ("third", "fourth"))
    assert {s.context.trace_id for s in coalesced} == {
        spans["third"].trace_id,
        spans["fourth"].trace_id,
    }
    assert [s.attributes["modelserve.batch.requests"] for s in coalesced] == [3, 3]
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    for span in coalesced:
        assert span.start_time is not None and span.end_time is not None
        assert span.start_time <= span.end_time <= by_name["fourth"].end_time


async def test_a_bad_request_fails_alone() -> None:
    """A batch refused for its input is retried request by request: the NaN request gets the
    refusal, the others their answers."""
    inner = MatMulRunner()
    runner = CoalescingRunner(inner, max_batches=1)
    inner.gate.clear()
    first = asyncio.create_task(runner.run(V1, rows(1.0), ["y"]))
    await until(lambda: len(inner.calls) == 1)
    good = asyncio.create_task(runner.run(V1, rows(3.0), ["y"]))
    bad = asyncio.create_task(runner.run(V1, rows(float("nan")), ["y"]))
    also_good = asyncio.create_task(runner.run(V1, rows(4.0), ["y"]))
    await until(lambda: runner.waiting(V1.model_version) == 3)
    inner.gate.set()
    await first
    np.testing.assert_allclose((await good)["y"], rows(3.0)["x"] @ W)
    np.testing.assert_allclose((await also_good)["y"], rows(4.0)["x"] @ W)
    with pytest.raises(UnavailableError) as info:
        await bad
    assert info.value.metadata["upstream_code"] == "INVALID_ARGUMENT"
    assert inner.calls[1] == (V1.model_version, 3)


async def test_a_backend_failure_is_every_members_failure() -> None:
    inner = MatMulRunner()
    runner = CoalescingRunner(inner, max_batches=1)
    inner.gate.clear()
    first = asyncio.create_task(runner.run(V1, rows(1.0), ["y"]))
    await until(lambda: len(inner.calls) == 1)
    others = [asyncio.create_task(runner.run(V1, rows(2.0), ["y"])) for _ in range(3)]
    await until(lambda: runner.waiting(V1.model_version) == 3)
    inner.down = True
    inner.gate.set()
    results = await asyncio.gather(first, *others, return_exceptions=True)
    assert all(isinstance(r, UnavailableError) for r in results)
    assert len(inner.calls) == 2  # no retry one by one for a backend failure


async def test_a_caller_that_gives_up_leaves_the_batch() -> None:
    inner = MatMulRunner()
    runner = CoalescingRunner(inner, max_batches=1)
    inner.gate.clear()
    first = asyncio.create_task(runner.run(V1, rows(1.0), ["y"]))
    await until(lambda: len(inner.calls) == 1)
    gone = asyncio.create_task(runner.run(V1, rows(5.0), ["y"]))
    stays = asyncio.create_task(runner.run(V1, rows(6.0), ["y"]))
    await until(lambda: runner.waiting(V1.model_version) == 2)
    gone.cancel()
    inner.gate.set()
    await first
    np.testing.assert_allclose((await stays)["y"], rows(6.0)["x"] @ W)
    assert inner.calls[1] == (V1.model_version, 1)


async def test_a_request_queued_behind_a_hung_call_fails_after_its_own_timeout() -> None:
    """The call in flight hangs: the requests queued behind it fail `timeout_s` after they
    joined (UNAVAILABLE, UPSTREAM_TIMEOUT, which the fallback chain answers), not after the
    hung call's timeout and then their own; the lane goes on when the model answers again."""
    inner = MatMulRunner()
    runner = CoalescingRunner(inner, max_batches=1, timeout_s=0.2)
    inner.gate.clear()
    loop = asyncio.get_running_loop()
    started = loop.time()
    hung = asyncio.create_task(runner.run(V1, rows(1.0), ["y"]))
    await until(lambda: len(inner.calls) == 1)
    queued = asyncio.create_task(runner.run(V1, rows(2.0), ["y"]))
    async with asyncio.timeout(5):  # the model never answers: only `timeout_s` ends them
        results = await asyncio.gather(hung, queued, return_exceptions=True)
    waited = loop.time() - started
    for result in results:
        assert isinstance(result, UnavailableError), result
        assert result.reason == "UPSTREAM_TIMEOUT"
        assert result.metadata == {
            "model_version": V1.model_version,
            "upstream_code": "DEADLINE_EXCEEDED",
            "timeout_s": "0.200",
        }
    assert waited >= 0.19, waited
    assert inner.calls == [(V1.model_version, 1)]  # the queued request was never sent
    inner.gate.set()
    out = await runner.run(V1, rows(3.0), ["y"])
    np.testing.assert_allclose(out["y"], rows(3.0)["x"] @ W)


async def test_a_shadow_copy_waits_within_its_own_deadline() -> None:
    """With `WAIT_BOUNDED` off (a shadow copy, which has its own deadline), a request queued
    behind a slow call waits for its answer past `timeout_s`."""
    inner = MatMulRunner()
    runner = CoalescingRunner(inner, max_batches=1, timeout_s=0.05)
    inner.gate.clear()

    async def shadow_copy(value: float) -> dict[str, npt.NDArray[Any]]:
        WAIT_BOUNDED.set(False)  # in the copy's own task, as the predictor does
        return await runner.run(V1, rows(value), ["y"])

    first = asyncio.create_task(shadow_copy(1.0))
    await until(lambda: len(inner.calls) == 1)
    queued = asyncio.create_task(shadow_copy(2.0))
    await until(lambda: runner.waiting(V1.model_version) == 1)
    # A bounded request queued after them runs out of time; theirs would have run out first.
    with pytest.raises(UnavailableError):
        await runner.run(V2, rows(3.0), ["y"])
    assert not first.done() and not queued.done()
    inner.gate.set()
    np.testing.assert_allclose((await queued)["y"], rows(2.0)["x"] @ W)
    await first


async def test_inputs_without_a_shared_row_count_go_alone() -> None:
    inner = MatMulRunner()
    runner = CoalescingRunner(inner)
    out = await runner.run(V1, {"x": np.ones((2, 3), dtype=np.float32), "z": np.ones(1)}, ["y"])
    assert inner.calls == [(V1.model_version, 2)]
    assert out["y"].shape == (2, 2)


def _arriving(runner: CoalescingRunner) -> Callable[[float], Awaitable[Any]]:
    """A request for V1 as the predictor makes it, once it has entered `runner.upstream`:
    done with its features, it leaves upstream and joins the lane, and is done after."""
    upstream = runner.upstream

    async def request(value: float) -> dict[str, npt.NDArray[Any]]:
        upstream.leave(V1.model_version)
        try:
            return await runner.run(V1, rows(value), ["y"])
        finally:
            upstream.done(V1.model_version)

    return request


def _calling(
    runner: CoalescingRunner, budget_s: float | None, value: float
) -> asyncio.Task[dict[str, npt.NDArray[Any]]]:
    """A call for V1 as the predictor makes it for an endpoint with `budget_s` of its own."""
    token = ENDPOINT_BUDGET.set(budget_s)
    try:
        return asyncio.create_task(runner.run(V1, rows(value), ["y"]))
    finally:
        ENDPOINT_BUDGET.reset(token)


class TestBudget:
    """With a budget, an idle lane's first request waits for the requests the router already
    has for its version (counted by `Upstream` as the predictor enters, leaves and finishes
    them), never for nobody."""

    async def test_a_request_alone_in_the_router_never_waits(self) -> None:
        """However long the budget, a request with no other for its version goes at once."""
        inner = MatMulRunner()
        runner = CoalescingRunner(inner, budget_s=3600.0)
        upstream = runner.upstream
        upstream.enter(V1.model_version)
        upstream.leave(V1.model_version)

        out = await asyncio.wait_for(runner.run(V1, rows(1.0), ["y"]), 5)

        upstream.done(V1.model_version)
        np.testing.assert_allclose(out["y"], rows(1.0)["x"] @ W)
        assert inner.calls == [(V1.model_version, 1)]

    async def test_the_first_request_waits_for_those_gathering_their_features(self) -> None:
        """Three requests enter the router for a version; the first to reach the model waits
        until the two others have too, and the three go as one call."""
        inner = MatMulRunner()
        runner = CoalescingRunner(inner, budget_s=3600.0)
        upstream = runner.upstream
        for _ in range(3):
            upstream.enter(V1.model_version)

        request = _arriving(runner)

        first = asyncio.create_task(request(1.0))
        await until(lambda: bool(runner._lanes))
        second = asyncio.create_task(request(2.0))
        await until(lambda: second.done() or len(next(iter(runner._lanes.values())).waiting) == 2)
        assert inner.calls == []
        third = asyncio.create_task(request(3.0))
        answers = await asyncio.wait_for(asyncio.gather(first, second, third), 5)

        assert inner.calls == [(V1.model_version, 3)]
        for value, answer in zip((1.0, 2.0, 3.0), answers, strict=True):
            np.testing.assert_allclose(answer["y"], rows(value)["x"] @ W)
        assert upstream.expected(V1.model_version) == 3

    async def test_company_that_never_comes_costs_at_most_the_budget(self) -> None:
        """Two requests entered, one gave up before the model (a bad feature, say): the other
        goes when the budget is spent, alone."""
        inner = MatMulRunner()
        runner = CoalescingRunner(inner, budget_s=0.05)
        upstream = runner.upstream
        upstream.enter(V1.model_version)
        upstream.enter(V1.model_version)
        upstream.leave(V1.model_version)
        upstream.done(V1.model_version)  # gave up
        upstream.leave(V1.model_version)

        out = await asyncio.wait_for(runner.run(V1, rows(4.0), ["y"]), 5)

        np.testing.assert_allclose(out["y"], rows(4.0)["x"] @ W)
        assert inner.calls == [(V1.model_version, 1)]

    async def test_an_endpoint_budget_holds_its_own_requests_only(self) -> None:
        """Two endpoints on one version, one with a budget of its own and one without: the
        first's request is held for its endpoint's company, while the other's goes at once,
        neither joining the held call nor counted as company for it."""
        inner = MatMulRunner()
        runner = CoalescingRunner(inner)
        upstream = runner.upstream
        upstream.enter(V1.model_version, 3600.0)
        upstream.enter(V1.model_version, 3600.0)
        upstream.leave(V1.model_version, 3600.0)
        held = _calling(runner, 3600.0, 1.0)
        await until(lambda: bool(runner._lanes))

        upstream.enter(V1.model_version)
        upstream.leave(V1.model_version)
        alone = await asyncio.wait_for(_calling(runner, None, 2.0), 5)
        upstream.done(V1.model_version)
        assert inner.calls == [(V1.model_version, 1)]
        np.testing.assert_allclose(alone["y"], rows(2.0)["x"] @ W)
        assert not held.done()
        assert upstream.expected(V1.model_version, 3600.0) == 2
        assert upstream.expected(V1.model_version) == 1

        upstream.leave(V1.model_version, 3600.0)
        company = await asyncio.wait_for(_calling(runner, 3600.0, 3.0), 5)
        first = await asyncio.wait_for(held, 5)
        assert inner.calls == [(V1.model_version, 1), (V1.model_version, 2)]
        np.testing.assert_allclose(first["y"], rows(1.0)["x"] @ W)
        np.testing.assert_allclose(company["y"], rows(3.0)["x"] @ W)

    async def test_company_joins_the_held_call_even_with_slots_free(self) -> None:
        """With two calls allowed in flight, the request that arrives while the first is held
        joins it rather than starting a call of its own, and nothing is left waiting."""
        inner = MatMulRunner()
        runner = CoalescingRunner(inner, max_batches=2, budget_s=3600.0)
        upstream = runner.upstream
        for _ in range(2):
            upstream.enter(V1.model_version)

        request = _arriving(runner)

        first = asyncio.create_task(request(1.0))
        await until(lambda: bool(runner._lanes))
        second = asyncio.create_task(request(2.0))
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        await until(lambda: not runner._tasks)

        assert inner.calls == [(V1.model_version, 2)]
