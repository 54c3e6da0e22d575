"""API keys: scrypt hashing, key records and files, auth settings, reading the key from metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from modelserve_runtime.auth import (
    ApiKeyAuthenticator,
    ApiKeyRecord,
    AuthSettings,
    Role,
    hash_secret,
    new_api_key,
    presented_key,
    secret_matches,
)

N = 16


class TestHashing:
    def test_secret_matches_only_its_hash(self) -> None:
        """A hash accepts its secret and refuses any other; two hashes of one secret differ (salt)."""
        stored = hash_secret("s3cret", n=N)
        assert secret_matches("s3cret", stored)
        assert not secret_matches("s3cret ", stored)
        assert hash_secret("s3cret", n=N) != stored
        assert not secret_matches("s3cret", "sha256$whatever")

    def test_new_key_record_holds_no_key(self) -> None:
        """A new key's record carries its id, principal and roles, and no part of the secret."""
        key, record = new_api_key("alice", {Role.DEPLOYER}, n=N)
        prefix, key_id, secret = key.split("_", 2)
        assert (prefix, key_id) == ("msk", record.key_id)
        assert secret not in record.model_dump_json()
        assert record.roles == frozenset({Role.DEPLOYER})


class TestAuthenticator:
    async def test_finds_the_principal_of_a_good_key_only(self) -> None:
        """The right key yields its principal; a wrong secret, unknown id or garbage yields None."""
        key, record = new_api_key("alice", {Role.VIEWER}, n=N)
        other, _ = new_api_key("bob", {Role.VIEWER}, n=N)
        authenticator = ApiKeyAuthenticator([record])
        principal = await authenticator.authenticate(key)
        assert principal is not None and principal.name == "alice"
        assert await authenticator.authenticate(key) == principal
        assert await authenticator.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert await authenticator.authenticate(other) is None
        assert await authenticator.authenticate("garbage") is None


class TestPresentedKey:
    @pytest.mark.parametrize(
        ("metadata", "expected"),
        [
            ({"authorization": "Bearer k1"}, "k1"),
            ({"authorization": "bearer  k1 "}, "k1"),
            ({"x-api-key": "k2"}, "k2"),
            ({"authorization": "Basic abc", "x-api-key": "k2"}, "k2"),
            ({"authorization": "Bearer "}, None),
            ({}, None),
        ],
    )
    def test_reads_bearer_or_api_key_header(
        self, metadata: dict[str, str], expected: str | None
    ) -> None:
        """`authorization: Bearer` wins, `x-api-key` is the alternative, anything else is no key."""
        assert presented_key(metadata) == expected


class TestAuthSettings:
    def test_enabled_without_keys_is_refused(self) -> None:
        """Turning auth on with no key records stops the service at start."""
        with pytest.raises(ValidationError, match="no keys"):
            AuthSettings(enabled=True)

    def test_keys_file_adds_records(self, tmp_path: Path) -> None:
        """Records in the JSON keys file join those given inline."""
        _, inline = new_api_key("alice", {Role.ADMIN}, n=N)
        _, in_file = new_api_key("bob", {Role.VIEWER}, n=N)
        path = tmp_path / "keys.json"
        path.write_text(json.dumps([in_file.model_dump(mode="json")]))
        settings = AuthSettings(enabled=True, keys=[inline], keys_file=path)
        assert [r.principal for r in settings.all_keys()] == ["alice", "bob"]

    def test_duplicate_key_ids_are_refused(self) -> None:
        """Two records with one key id are a configuration error."""
        _, record = new_api_key("alice", {Role.ADMIN}, n=N)
        with pytest.raises(ValidationError, match="same key_id"):
            AuthSettings(enabled=True, keys=[record, record.model_copy(update={"principal": "b"})])

    @pytest.mark.parametrize(
        ("field", "value"),
        [("secret_hash", "plaintext-key"), ("key_id", "XYZ"), ("roles", ["wizard"]), ("roles", [])],
    )
    def test_bad_record_is_refused(self, field: str, value: object) -> None:
        """A record with a hash that is not scrypt, a bad id, or no known role is refused."""
        _, record = new_api_key("alice", {Role.ADMIN}, n=N)
        data = record.model_dump(mode="json")
        data[field] = value
        with pytest.raises(ValidationError, match=field):
            ApiKeyRecord.model_validate(data)
