"""The file that keeps LoadModelVersion's pins across restarts: written whole, read back, and
a damaged one never stops the service."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from modelserve_inference.reconcile import PinFile

V1, V2 = "models/fraud/versions/1", "models/fraud/versions/2"


def test_written_pins_read_back_and_no_file_is_no_pins(tmp_path: Path) -> None:
    pins = PinFile(tmp_path / "work" / "pins.json")
    assert pins.read() == set()
    pins.write({V2, V1})
    assert pins.read() == {V1, V2}
    assert pins.path.read_text() == f'["{V1}", "{V2}"]'
    pins.write(set())
    assert pins.read() == set()
    # Written through a scratch file renamed over the old one: nothing else is left behind.
    assert [p.name for p in pins.path.parent.iterdir()] == ["pins.json"]


@pytest.mark.parametrize(
    ("content", "kept", "logged"),
    [
        ("{not json", set(), "pins_unreadable"),
        (f'["{V1}", "fraud-2", 7]', {V1}, "pin_ignored"),
        (f'"{V2}"', {V2}, None),
    ],
)
def test_a_damaged_file_is_logged_and_what_is_whole_kept(
    tmp_path: Path, content: str, kept: set[str], logged: str | None
) -> None:
    path = tmp_path / "pins.json"
    path.write_text(content)
    with capture_logs() as logs:
        assert PinFile(path).read() == kept
    events = [entry["event"] for entry in logs]
    if logged is None:
        assert events == []
    else:
        assert logged in events
