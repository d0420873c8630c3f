"""Fixtures shared by every test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillguard import store

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The public prompt corpora (../shared/data); tests that need them skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "test.duckdb"


@pytest.fixture
def con(db_path: Path):
    connection = store.connect(db_path)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def upstream():
    """The small OpenAI-compatible upstream (tests/upstream_stub.py) on a loopback port."""
    from upstream_stub import ThreadedServer
    from upstream_stub import app as stub_app

    with ThreadedServer(stub_app) as server:
        yield server
