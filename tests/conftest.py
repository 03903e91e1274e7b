"""Shared fixtures: temporary config files and backends that clean up after themselves."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Backend


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "config.json"


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    """Factory: backends(name, handler=None) -> a running Backend, closed after the test."""
    made: list[Backend] = []

    def make(name: str, handler: Callable | None = None, **kw: object) -> Backend:
        backend = Backend(name, handler, **kw)  # type: ignore[arg-type]
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
