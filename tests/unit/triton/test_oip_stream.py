"""`stream_infer`: a stream's requests answered concurrently, within a bound, each once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tritonclient.grpc import service_pb2

from modelserve_runtime.errors import NotFoundError
from modelserve_triton.oip_stream import stream_infer


def _request(i: int) -> Any:
    return service_pb2.ModelInferRequest(model_name="m", model_version="1", id=str(i))


async def _requests(n: int) -> AsyncIterator[Any]:
    for i in range(n):
        yield _request(i)


async def test_every_request_is_answered_once_within_the_bound() -> None:
    """Forty requests whose answers are released four at a time, newest first: each id comes
    back once, at most four ran at once, and an answer did not wait for an older one."""
    running = peak = 0
    started: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()

    async def answer(request: Any) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        released = asyncio.get_running_loop().create_future()
        started.put_nowait(released)
        await released
        running -= 1
        return service_pb2.ModelInferResponse(id=request.id)

    async def release_newest_first() -> None:
        for _ in range(10):
            batch = [await started.get() for _ in range(4)]
            for released in reversed(batch):
                released.set_result(None)

    releasing = asyncio.create_task(release_newest_first())
    ids = [r.infer_response.id async for r in stream_infer(_requests(40), answer, max_in_flight=4)]
    await releasing

    assert sorted(ids, key=int) == [str(i) for i in range(40)]
    assert ids[:4] == ["3", "2", "1", "0"]
    assert peak == 4


async def test_a_failed_request_is_answered_with_its_error_and_the_stream_goes_on() -> None:
    """A domain error becomes that request's error message with its id and status; an
    unexpected one a fixed INTERNAL message; the other requests are answered."""

    async def answer(request: Any) -> Any:
        if request.id == "1":
            raise NotFoundError("models/m/versions/9 is not held")
        if request.id == "2":
            raise RuntimeError("a bug's details")
        return service_pb2.ModelInferResponse(id=request.id)

    responses = [r async for r in stream_infer(_requests(4), answer)]

    by_id = {r.infer_response.id: r.error_message for r in responses}
    assert by_id == {
        "0": "",
        "1": "[request id: 1] NOT_FOUND: models/m/versions/9 is not held",
        "2": "[request id: 2] INTERNAL: internal error",
        "3": "",
    }


async def test_a_failing_caller_side_ends_the_stream_and_cancels_what_runs() -> None:
    """When the caller's side of the stream fails, the stream raises its error and the
    answers still running are cancelled, not left behind."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def answer(request: Any) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def requests() -> AsyncIterator[Any]:
        yield _request(0)
        await started.wait()
        raise ConnectionResetError("the caller went away")

    with pytest.raises(ConnectionResetError):
        async for _ in stream_infer(requests(), answer):
            pass
    assert cancelled.is_set()
