"""Strict parsing of the registry's resource names."""

from __future__ import annotations

import pytest

from modelserve_registry.domain import (
    parse_deployment_name,
    parse_model_name,
    parse_version_name,
)
from modelserve_runtime.errors import InvalidArgumentError


class TestResourceNames:
    def test_good_names_parse(self) -> None:
        """Well-formed names give their ids and version number."""
        assert parse_model_name("models/fraud-v2", "parent") == "fraud-v2"
        assert parse_version_name("models/fraud/versions/12", "name") == ("fraud", 12)
        assert parse_deployment_name("deployments/checkout", "name") == "checkout"

    @pytest.mark.parametrize(
        "name",
        [
            "",
            "models/",
            "models/Fraud",
            "models/fraud/",
            "model/fraud",
            "models/fraud\n",
            "models/-fraud",
            "models/" + "a" * 64,
            " models/fraud",
        ],
    )
    def test_bad_model_names_name_the_field(self, name: str) -> None:
        """Anything but exactly models/{id} is refused, naming the field it came in."""
        with pytest.raises(InvalidArgumentError) as info:
            parse_model_name(name, "upload.parent")
        assert [v.field for v in info.value.violations] == ["upload.parent"]

    @pytest.mark.parametrize(
        "name",
        [
            "models/fraud/versions/0",
            "models/fraud/versions/-1",
            "models/fraud/versions/01",
            "models/fraud/versions/1.0",
            "models/fraud/versions/",
            "models/fraud/versions/\u0661",
            "models/fraud/versions/9999999999999999999",
            "models/fraud/versions/1/artifact",
        ],
    )
    def test_bad_version_names_are_refused(self, name: str) -> None:
        """Version numbers are positive decimal integers without leading zeros that fit in int64."""
        with pytest.raises(InvalidArgumentError):
            parse_version_name(name, "name")

    @pytest.mark.parametrize(
        "name", ["deployments/", "deployment/x", "deployments/x/y", "models/x"]
    )
    def test_bad_deployment_names_are_refused(self, name: str) -> None:
        """Anything but exactly deployments/{id} is refused."""
        with pytest.raises(InvalidArgumentError):
            parse_deployment_name(name, "name")
