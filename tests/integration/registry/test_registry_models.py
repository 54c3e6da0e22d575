"""GetModel and ListModels through a real server."""

from __future__ import annotations

import grpc
from registry_testing import RunningRegistry, create_model, failure

from modelserve.registry.v1 import registry_service_pb2 as pb


class TestModels:
    async def test_get_model(self, registry: RunningRegistry) -> None:
        """A created model reads back equal; an unknown one is NOT_FOUND, a bad name INVALID_ARGUMENT."""
        created = await create_model(registry.stub)
        got = await registry.stub.GetModel(pb.GetModelRequest(name="models/fraud"))
        assert got.model == created
        error = await failure(registry.stub.GetModel(pb.GetModelRequest(name="models/churn")))
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
        error = await failure(registry.stub.GetModel(pb.GetModelRequest(name="fraud")))
        assert [v.field for v in error.violations] == ["name"]

    async def test_list_models_pages_by_id(self, registry: RunningRegistry) -> None:
        """Models are listed by id, page by page, each once."""
        for model_id in ("c", "a", "d", "b", "e"):
            await create_model(registry.stub, model_id)
        names: list[str] = []
        token = ""
        while True:
            page = await registry.stub.ListModels(
                pb.ListModelsRequest(page_size=2, page_token=token)
            )
            names += [m.name for m in page.models]
            token = page.next_page_token
            if not token:
                break
        assert names == [f"models/{x}" for x in "abcde"]
        error = await failure(registry.stub.ListModels(pb.ListModelsRequest(page_token="zz")))
        assert [v.field for v in error.violations] == ["page_token"]
        error = await failure(registry.stub.ListModels(pb.ListModelsRequest(page_size=-1)))
        assert [v.field for v in error.violations] == ["page_size"]
