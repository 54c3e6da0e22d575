"""How the first process starts its workers again: as it was started itself (its script, or
`python -m` its module), or, for `python -c`, the service module's `main()`; where none of
these is known it refuses, saying how to start the service instead."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from modelserve_runtime.config import ConfigError
from modelserve_runtime.server import _start_again


def _started_as(monkeypatch: pytest.MonkeyPatch, argv: list[str], module: str | None) -> None:
    main = types.ModuleType("__main__")
    main.__spec__ = None if module is None else types.SimpleNamespace(name=module)  # type: ignore[assignment]
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", argv)


def test_a_script_is_run_again_with_its_arguments(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / "modelserve-feature"
    script.write_text("")
    _started_as(monkeypatch, [str(script), "--config", "x.yaml"], None)
    assert _start_again(None, "modelserve_feature.server") == [
        sys.executable,
        str(script),
        "--config",
        "x.yaml",
    ]


def test_a_module_is_run_again_as_a_module(monkeypatch: pytest.MonkeyPatch) -> None:
    _started_as(monkeypatch, ["/somewhere/server.py"], "modelserve_feature.server")
    assert _start_again(["--config", "x.yaml"], "__main__") == [
        sys.executable,
        "-m",
        "modelserve_feature.server",
        "--config",
        "x.yaml",
    ]


def test_python_c_runs_the_service_modules_main(monkeypatch: pytest.MonkeyPatch) -> None:
    _started_as(monkeypatch, ["-c"], None)
    assert _start_again(None, "modelserve_router.server") == [
        sys.executable,
        "-c",
        "from modelserve_router.server import main; main()",
    ]


@pytest.mark.parametrize("main_module", [None, "__main__"])
def test_nothing_known_to_run_is_refused_saying_what_to_do(
    monkeypatch: pytest.MonkeyPatch, main_module: str | None
) -> None:
    _started_as(monkeypatch, ["-c"], None)
    with pytest.raises(ConfigError, match=r"server\.workers: .*console script"):
        _start_again(None, main_module)
