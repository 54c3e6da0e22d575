"""Which services a local stack runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelserve_cli.stack import SERVICES, Stack, StackError, StackOptions


def test_a_subset_runs_in_the_start_order_whatever_order_it_is_named_in(tmp_path: Path) -> None:
    stack = Stack(StackOptions(run_dir=tmp_path, services=("router", "registry", "inference")))
    assert stack.services == ("registry", "inference", "router")
    # Every service keeps an address, so the others' discovery is the same either way.
    assert set(stack.targets) == set(SERVICES)


def test_an_unknown_service_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"unknown services \['rooter'\]"):
        Stack(StackOptions(run_dir=tmp_path, services=("registry", "rooter")))


def test_by_default_every_service_runs(tmp_path: Path) -> None:
    assert Stack(StackOptions(run_dir=tmp_path)).services == SERVICES
