"""Which roles may call each RegistryService RPC (`admin` may call all of them)."""

from __future__ import annotations

from modelserve_runtime.auth import Role

_SERVICE = "/modelserve.registry.v1.RegistryService/"
_READ = frozenset({Role.VIEWER, Role.DEPLOYER, Role.APPROVER})
_DEPLOY = frozenset({Role.DEPLOYER})
_APPROVE = frozenset({Role.APPROVER})

#: Method -> the roles that may call it; a method missing here is refused to every key,
#: admin included, so a new RPC is closed until it is given its roles.
REGISTRY_POLICY: dict[str, frozenset[Role]] = {
    _SERVICE + method: roles
    for method, roles in {
        "GetModel": _READ,
        "ListModels": _READ,
        "GetModelVersion": _READ,
        "ListModelVersions": _READ,
        "ReadModelVersionArtifact": _READ,
        "GetDeployment": _READ,
        "ListDeploymentRevisions": _READ,
        "WatchDeployments": _READ,
        "ListAuditEvents": _READ,
        "CreateModel": _DEPLOY,
        "CreateModelVersion": _DEPLOY,
        "UpdateDeployment": _DEPLOY,
        "RollbackDeployment": _DEPLOY,
        "TransitionModelVersionStage": _DEPLOY,
        "SetModelVersionAlias": _DEPLOY,
        "ApproveModelVersion": _APPROVE,
        "GetRollout": _READ,
        "ListRollouts": _READ,
        "UpdateModel": _DEPLOY,
        "UpdateModelVersion": _DEPLOY,
        "ValidateModelVersion": _DEPLOY,
        "StartRollout": _DEPLOY,
        "PauseRollout": _DEPLOY,
        "ResumeRollout": _DEPLOY,
        "AbortRollout": _DEPLOY,
        # Deleting a model and its artifacts is for admins only (admin may call everything).
        "DeleteModel": frozenset(),
    }.items()
}
