"""README.md stays true about configuration: every setting of every service is documented
(in README.md or the service's own README), and every variable the configuration tables name
is a setting some service reads."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import AliasChoices, BaseModel

from modelserve_feature.config import FeatureSettings
from modelserve_inference.config import InferenceSettings
from modelserve_monitor.config import MonitorSettings
from modelserve_registry.config import RegistrySettings
from modelserve_router.config import RouterSettings
from modelserve_runtime.config import ServiceSettings

ROOT = Path(__file__).resolve().parents[3]
SERVICES: dict[str, type[ServiceSettings]] = {
    "router": RouterSettings,
    "feature": FeatureSettings,
    "inference": InferenceSettings,
    "registry": RegistrySettings,
    "monitor": MonitorSettings,
}


def leaves(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """The environment names of a settings class's values, without the service's prefix:
    nested settings joined with `__` (`SERVER__TLS__CERT_FILE`)."""
    for name, field in model.model_fields.items():
        full = prefix + name.upper()
        if isinstance(field.validation_alias, AliasChoices):  # a standard name, unprefixed
            full = str(field.validation_alias.choices[0]).upper()
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from leaves(kind, full + "__")
        else:
            yield full


def documented(text: str) -> list[re.Pattern[str]]:
    """What the backticked names of a text document, as patterns of environment names.

    `<P>` and `MODELSERVE_<SERVICE>_` prefixes are dropped; `A__B|C` names `A__B` and `A__C`;
    `<RULE>` and a final `*` stand for any name; a name written from `__` or `..._` on
    (`__CONSUL_PORT`, `..._WEBHOOK__TIMEOUT_S`) names every setting that ends so.
    """
    patterns = []
    for token in re.findall(r"`([^`\n]+)`", text):
        token = re.sub(r"^(<P>|MODELSERVE_[A-Z]+_)", "", token.strip())
        suffix = token.startswith(("__", "..._"))
        token = token.removeprefix("...")
        if not re.fullmatch(r"[A-Z][A-Z0-9_<>|]*\*?|__[A-Z0-9_<>|]+", token):
            continue
        first, *others = token.split("|")
        head = first.rsplit("__", 1)[0] + "__" if "__" in first else ""
        for name in (first, *(head + other for other in others)):
            body = re.escape(name).replace(re.escape("<RULE>"), "[A-Z_]+")
            body = body.replace(re.escape("*"), ".*")
            patterns.append(re.compile(("(.*)" if suffix else "") + body))
    return patterns


def _text(service: str) -> str:
    return (ROOT / "README.md").read_text() + (
        ROOT / "services" / service / "README.md"
    ).read_text()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_setting_is_documented(service: str) -> None:
    patterns = documented(_text(service))
    undocumented = [
        name
        for name in leaves(SERVICES[service])
        if not any(pattern.fullmatch(name) for pattern in patterns)
    ]
    assert undocumented == [], f"document these {service} settings in README.md: {undocumented}"


def _first_cell(row: str) -> str:
    """A table row's first cell: up to the first `|` outside backticks."""
    in_code = False
    for at, char in enumerate(row[1:], start=1):
        if char == "`":
            in_code = not in_code
        elif char == "|" and not in_code:
            return row[1:at]
    return row[1:]


def test_every_variable_in_the_tables_is_a_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configuration") : readme.index("### Sizing Redis")]
    cells = [_first_cell(line) for line in section.splitlines() if line.startswith("| `")]
    names = {name for settings in SERVICES.values() for name in leaves(settings)}
    unknown = [
        pattern.pattern
        for cell in cells
        for pattern in documented(cell)
        if not any(pattern.fullmatch(name) for name in names)
    ]
    assert len(cells) > 60
    assert unknown == [], f"README.md's tables name variables no service reads: {unknown}"
