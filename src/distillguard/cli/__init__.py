"""The `distillguard` command. Each stage's subcommands live in their own module and call
the same library functions a Python user would."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="distillguard",
    help="Detect, attribute and stop distillation attacks on LLM APIs.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

# Importing a command module registers its commands on `app`.
from distillguard.cli import demo, eval, gateway, ingest, lab, scan, signals  # noqa: E402,F401


def main() -> None:
    app()
