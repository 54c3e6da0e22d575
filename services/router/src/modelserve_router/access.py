"""Which roles may call each RouterService RPC when auth is on (`admin` may call all of them)."""

from __future__ import annotations

from modelserve_runtime.auth import Role

_SERVICE = "/modelserve.router.v1.RouterService/"

#: Method -> the roles that may call it; a method missing here is refused to every key.
#: There is no `predict` role yet (auth.Role is shared), so every role may predict.
ROUTER_POLICY: dict[str, frozenset[Role]] = {
    _SERVICE + "Predict": frozenset({Role.VIEWER, Role.DEPLOYER, Role.APPROVER}),
}
