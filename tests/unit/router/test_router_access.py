"""The router's role table covers every RouterService RPC."""

from __future__ import annotations

from modelserve.router.v1 import router_service_pb2 as pb
from modelserve_router.access import ROUTER_POLICY
from modelserve_runtime.auth import Role


class TestRouterPolicy:
    def test_every_rpc_has_roles(self) -> None:
        """Each RouterService method is in the table (a missing one would be refused to every
        key), and every role may predict, `predict` included."""
        service = pb.DESCRIPTOR.services_by_name["RouterService"]
        methods = {f"/{service.full_name}/{m.name}" for m in service.methods}
        assert set(ROUTER_POLICY) == methods
        assert ROUTER_POLICY[f"/{service.full_name}/Predict"] | {Role.ADMIN} == set(Role)
        assert Role.PREDICT in ROUTER_POLICY[f"/{service.full_name}/Predict"]
