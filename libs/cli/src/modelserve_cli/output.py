"""How the commands report failure: one `error:` line on stderr, exit code 1."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

errors = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Prints `error: <message>` on one line, however narrow the terminal, and exits 1."""
    errors.print(
        f"error: {' '.join(message.split())}", highlight=False, markup=False, soft_wrap=True
    )
    raise typer.Exit(1)
