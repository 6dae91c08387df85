"""agent.fetch.fetch_many against real nginx: many in flight, failover, per-transfer errors."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

from seedboot.agent.errors import SeedError
from seedboot.agent.fetch import FetchError, fetch_many
from seedboot.agent.reader import NotFound
from tests.helpers import Nginx, free_port


def make_files(root: Path, n: int, size: int) -> dict[str, bytes]:
    out = {}
    for i in range(n):
        p = f"f/{i:04d}"
        out[p] = os.urandom(size)
        (root / "f").mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(out[p])
    return out


def test_many_transfers_each_with_its_own_result(tmp_path: Path, nginx: Callable[..., Nginx]) -> None:
    files = make_files(tmp_path / "www", 300, 20000)
    srv = nginx(
        tmp_path / "www", extra="location /f/0007 { return 500; } location = /status { stub_status; }"
    )
    paths = [*files, "f/missing"]
    got: dict[str, bytes | SeedError] = dict(fetch_many([srv.url], paths, conns=8, retries=0))
    assert set(got) == set(paths)
    assert all(got[p] == files[p] for p in files if p != "f/0007")
    assert isinstance(got["f/missing"], NotFound) and "404" in got["f/missing"].message
    assert isinstance(got["f/0007"], FetchError) and "HTTP 500" in got["f/0007"].message
    # Keep-alive: 301 requests over at most 8 connections, counted by the server
    # (stub_status "accepts"; plus the fixture's port probe, the status request itself, and
    # one reconnect: nginx closes the connection after a 500).
    with urllib.request.urlopen(f"{srv.url}/status") as resp:
        accepts, _handled, requests = map(int, resp.read().decode().splitlines()[2].split())
    assert requests == 302 and accepts <= 8 + 3


def test_failover_to_the_next_mirror_and_size_limit(tmp_path: Path, nginx: Callable[..., Nginx]) -> None:
    files = make_files(tmp_path / "www", 20, 5000)
    (tmp_path / "www" / "big").write_bytes(b"x" * 100000)
    srv = nginx(tmp_path / "www")
    dead = f"http://127.0.0.1:{free_port()}"
    got = dict(fetch_many([dead, srv.url], [*files, "big"], conns=4, max_bytes=50000))
    assert all(got[p] == files[p] for p in files)
    assert isinstance(got["big"], FetchError) and "more than 50000 bytes" in got["big"].message
