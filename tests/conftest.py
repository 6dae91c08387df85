from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Nginx


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """Start real nginx servers: ``nginx(root, extra="")``; all are stopped after the test."""
    started: list[Nginx] = []

    def start(root: Path, extra: str = "") -> Nginx:
        n = Nginx(root=root, workdir=tmp_path / f"nginx-{len(started)}", extra=extra).start()
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root for loop devices, FUSE and mounts")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip)
