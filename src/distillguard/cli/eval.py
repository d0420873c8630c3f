"""`distillguard eval` commands."""

from __future__ import annotations

from distillguard.cli import app  # noqa: F401
