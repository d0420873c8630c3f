"""Options and helpers shared by every subcommand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from distillguard.store import DEFAULT_DB

console = Console()
err_console = Console(stderr=True)

DbOption = Annotated[
    Path, typer.Option("--db", help="DuckDB store file.", envvar="DISTILLGUARD_DB")
]
DEFAULT_DB_PATH = DEFAULT_DB


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error (no traceback) and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)
