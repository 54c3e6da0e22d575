"""API keys with roles: hashed key records, settings, and the server interceptor that checks them.

A key reads `msk_<key id>_<secret>`. The service keeps only a record per key: its id, its
principal, its roles and a salted scrypt hash of the secret, so a leaked config file or
log gives no usable key. The key id finds the record; the secret is checked with scrypt
(in a worker thread), and a key that checked out once is remembered by its sha256 so later
calls cost a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from pydantic import BaseModel, Field, field_validator, model_validator

from modelserve_runtime.errors import PermissionDeniedError, UnauthenticatedError
from modelserve_runtime.interceptors import _metadata, _ScopeInterceptor

#: The principal of every call when auth is off.
ANONYMOUS = "anonymous"
API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
KEY_PREFIX = "msk"
_KEY = re.compile(f"{KEY_PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{20,}})")
_KEY_ID = re.compile("[0-9a-f]{16}")
_SCRYPT = re.compile(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([0-9a-f]{32})\$([0-9a-f]{64})")
#: scrypt cost of new hashes: N=2**14, r=8, p=1 (16 MiB, tens of milliseconds).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_REMEMBERED_KEYS = 1024


class Role(enum.StrEnum):
    """What a key may do; `admin` may do everything.

    `predict` is the data-plane role: it may ask the router for predictions (Predict and the
    Open Inference Protocol) and nothing else, the registry included. `viewer`, `deployer` and
    `approver` are control-plane roles on the registry; they may also predict at the router.
    """

    PREDICT = "predict"
    VIEWER = "viewer"
    DEPLOYER = "deployer"
    APPROVER = "approver"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: its name and its roles."""

    name: str
    roles: frozenset[Role]


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "modelserve_principal", default=None
)


def current_principal() -> str:
    """The name of the caller of the RPC being handled; `anonymous` when auth is off."""
    principal = _principal.get()
    return ANONYMOUS if principal is None else principal.name


def hash_secret(secret: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """`scrypt$N$r$p$salt$digest` of a secret, with a fresh random salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def secret_matches(secret: str, stored: str) -> bool:
    """Whether `secret` hashes to the stored `scrypt$...` value (compared in constant time)."""
    match = _SCRYPT.fullmatch(stored)
    if match is None:
        return False
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    digest = hashlib.scrypt(
        secret.encode(), salt=bytes.fromhex(match.group(4)), n=n, r=r, p=p, dklen=32
    )
    return hmac.compare_digest(digest, bytes.fromhex(match.group(5)))


class ApiKeyRecord(BaseModel):
    """What the service stores for one key: never the key itself."""

    model_config = {"frozen": True, "extra": "forbid"}

    key_id: str
    """The 16 hex digits after `msk_`; names the key in logs and audit, safe to show."""
    principal: str = Field(min_length=1)
    """Who holds the key; recorded as the actor of every change made with it."""
    roles: frozenset[Role] = Field(min_length=1)
    """What the key may do."""
    secret_hash: str
    """`scrypt$N$r$p$salt$digest` of the secret part of the key."""

    @field_validator("key_id")
    @classmethod
    def _key_id_is_hex(cls, value: str) -> str:
        if not _KEY_ID.fullmatch(value):
            raise ValueError("must be 16 lowercase hex digits")
        return value

    @field_validator("secret_hash")
    @classmethod
    def _hash_is_scrypt(cls, value: str) -> str:
        if not _SCRYPT.fullmatch(value):
            raise ValueError("must be scrypt$N$r$p$salt$digest (see `modelserve keys create`)")
        return value


def new_api_key(
    principal: str, roles: Iterable[Role], *, n: int = SCRYPT_N
) -> tuple[str, ApiKeyRecord]:
    """A fresh key (shown once to its holder) and the record the service keeps of it."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = ApiKeyRecord(
        key_id=key_id,
        principal=principal,
        roles=frozenset(roles),
        secret_hash=hash_secret(secret, n=n),
    )
    return f"{KEY_PREFIX}_{key_id}_{secret}", record


def read_key_file(path: Path) -> list[ApiKeyRecord]:
    """Key records from a JSON file holding a list of them."""
    data: Any = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: must hold a list of key records")
    return [ApiKeyRecord.model_validate(item) for item in data]


class AuthSettings(BaseModel):
    """API-key authentication of incoming calls."""

    model_config = {"frozen": True, "extra": "forbid"}

    enabled: bool = False
    """Require an API key on every call (health and reflection aside); off: every caller
    is `anonymous` with every role."""
    keys: list[ApiKeyRecord] = Field(default_factory=list)
    """Key records (hashes, never keys), e.g. as JSON in `<P>AUTH__KEYS`."""
    keys_file: Path | None = None
    """A JSON file with more key records (a list, as `modelserve keys create` prints them)."""

    @model_validator(mode="after")
    def _keys_when_enabled(self) -> AuthSettings:
        records = self.all_keys()
        if self.enabled and not records:
            raise ValueError("auth is enabled but no keys are configured (keys or keys_file)")
        ids = [r.key_id for r in records]
        if len(ids) != len(set(ids)):
            raise ValueError("two key records have the same key_id")
        return self

    def all_keys(self) -> list[ApiKeyRecord]:
        """The records from `keys` and `keys_file` together."""
        records = list(self.keys)
        if self.keys_file is not None:
            records += read_key_file(self.keys_file)
        return records


class ApiKeyAuthenticator:
    """Finds the principal of a presented key."""

    def __init__(self, records: Iterable[ApiKeyRecord]) -> None:
        self._records = {r.key_id: r for r in records}
        self._known: dict[str, Principal] = {}

    async def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None when the key is malformed, unknown or wrong."""
        fingerprint = hashlib.sha256(key.encode()).hexdigest()
        known = self._known.get(fingerprint)
        if known is not None:
            return known
        match = _KEY.fullmatch(key)
        if match is None:
            return None
        record = self._records.get(match.group(1))
        if record is None:
            return None
        if not await asyncio.to_thread(secret_matches, match.group(2), record.secret_hash):
            return None
        principal = Principal(record.principal, record.roles)
        if len(self._known) >= _REMEMBERED_KEYS:
            self._known.clear()
        self._known[fingerprint] = principal
        return principal


def presented_key(metadata: Mapping[str, str]) -> str | None:
    """The key from `authorization: Bearer <key>` or `x-api-key: <key>`."""
    authorization = metadata.get(AUTHORIZATION_HEADER, "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return metadata.get(API_KEY_HEADER) or None


#: Calls that need no key: health checks (orchestrators, Consul) and reflection.
PUBLIC_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)


#: The auth-context property that gRPC sets to the subject CN of a client certificate it
#: verified (only servers that require client certificates verify, and so set it).
_CERTIFICATE_CN = "x509_common_name"


def certificate_name(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The subject CN of the caller's verified client certificate, or None without one."""
    names = context.auth_context().get(_CERTIFICATE_CN) or []
    return next((bytes(n).decode() for n in names), None)


class AuthInterceptor(_ScopeInterceptor):
    """Authenticates each call by API key (or, without one, by its verified client
    certificate) and checks its role against a per-method table.

    It runs innermost, after tracing, request context, logging and error status: a refused
    call is traced, logged with its code and turned into UNAUTHENTICATED or
    PERMISSION_DENIED by the one error interceptor like every other error. A method missing
    from the table is refused (PERMISSION_DENIED), so a new RPC is never open by accident.
    The key is never logged; the principal is bound to the call's log context.

    `certificate_roles` (subject CN -> roles) names the principal of a call that sends no key
    over a connection whose client certificate the server verified (mTLS): a service calling
    another needs no key. A key, when sent, decides; an unlisted CN is no principal.
    """

    def __init__(
        self,
        authenticator: ApiKeyAuthenticator,
        policy: Mapping[str, frozenset[Role]],
        *,
        public: frozenset[str] = PUBLIC_METHODS,
        certificate_roles: Mapping[str, frozenset[Role]] | None = None,
    ) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._policy = policy
        self._public = public
        self._certificate_roles = dict(certificate_roles or {})

    def _certificate_principal(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Principal | None:
        name = certificate_name(context) if self._certificate_roles else None
        if name is None or name not in self._certificate_roles:
            return None
        return Principal(name, self._certificate_roles[name])

    @asynccontextmanager
    async def scope(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        if method in self._public:
            yield
            return
        key = presented_key(_metadata(context))
        principal: Principal | None
        if key is None:
            principal = self._certificate_principal(context)
            if principal is None:
                raise UnauthenticatedError(
                    "an API key is required: send `authorization: Bearer <key>` or `x-api-key`",
                    reason="API_KEY_MISSING",
                )
        else:
            principal = await self._authenticator.authenticate(key)
            if principal is None:
                raise UnauthenticatedError("the API key is not valid", reason="API_KEY_INVALID")
        allowed = self._policy.get(method)
        if allowed is None:
            raise PermissionDeniedError(
                f"{method} is not open to any role", reason="METHOD_NOT_ALLOWED"
            )
        if Role.ADMIN not in principal.roles and not principal.roles & allowed:
            needed = ", ".join(sorted({*allowed, Role.ADMIN}))
            raise PermissionDeniedError(
                f"{principal.name} may not call {method}: it needs one of the roles {needed}",
                reason="ROLE_REQUIRED",
                metadata={"principal": principal.name, "required_roles": needed},
            )
        token = _principal.set(principal)
        try:
            with structlog.contextvars.bound_contextvars(principal=principal.name):
                yield
        finally:
            _principal.reset(token)
