"""Which roles may call each RouterService RPC when auth is on (`admin` may call all of them)."""

from __future__ import annotations

from modelserve_runtime.auth import Role

_SERVICE = "/modelserve.router.v1.RouterService/"

#: The roles that may ask for predictions: `predict`, the data-plane role, and the registry's
#: roles, whose holders predicted before `predict` existed and may still (predicting changes
#: nothing). Nothing on the router is administrative: what changes traffic is in the registry,
#: where `predict` may call nothing.
PREDICT_ROLES = frozenset({Role.PREDICT, Role.VIEWER, Role.DEPLOYER, Role.APPROVER})

#: Method -> the roles that may call it; a method missing here is refused to every key.
ROUTER_POLICY: dict[str, frozenset[Role]] = {
    _SERVICE + "Predict": PREDICT_ROLES,
    _SERVICE + "PredictStream": PREDICT_ROLES,
}
