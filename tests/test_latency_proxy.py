"""The latency proxy against real nginx: bytes unchanged, latency really added, and requests in
flight (parallel connections, HTTP pipelining) overlap instead of paying one RTT each."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from seedboot.agent.errors import SeedError
from seedboot.tools.latency_proxy import LatencyProxy
from seedboot.tools.proxy_cmd import parse_duration, parse_hostport, parse_rate
from tests.helpers import Nginx, free_port, wait_port

RTT = 0.2


@pytest.fixture
def served(tmp_path: Path, nginx: Callable[..., Nginx]) -> tuple[Nginx, dict[str, bytes]]:
    root = tmp_path / "www"
    root.mkdir()
    files = {"big.bin": os.urandom(3 * 1024 * 1024 + 17), "empty": b""}
    for i in range(8):
        files[f"small-{i}"] = os.urandom(1000 + i)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return nginx(root), files


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        body: bytes = r.read()
        return body


def test_content_identical_and_latency_injected(served: tuple[Nginx, dict[str, bytes]]) -> None:
    n, files = served
    with LatencyProxy(upstream=("127.0.0.1", n.port), rtt=RTT) as p:
        for name in ("big.bin", "empty", "small-3"):
            t = time.monotonic()
            assert get(f"{p.url}/{name}") == files[name]
            # A fresh connection: one RTT for the request, one for the emulated handshake.
            assert time.monotonic() - t >= 2 * RTT
        assert p.bytes_down > len(files["big.bin"])
        assert p.bytes_up > 0
        assert p.connections == 3


def test_parallel_connections_overlap(served: tuple[Nginx, dict[str, bytes]]) -> None:
    n, files = served
    names = [f"small-{i % 8}" for i in range(32)]
    with LatencyProxy(upstream=("127.0.0.1", n.port), rtt=RTT) as p:

        def worker(part: list[str]) -> list[bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
            out = []
            for name in part:
                conn.request("GET", f"/{name}")
                out.append(conn.getresponse().read())
            conn.close()
            return out

        parts = [names[i::8] for i in range(8)]
        t = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(worker, parts))
        elapsed = time.monotonic() - t
        for part, bodies in zip(parts, results, strict=True):
            assert bodies == [files[name] for name in part]
        # 4 requests in a row on each of 8 connections: about 5 RTT, never one RTT per request.
        assert elapsed >= 4 * RTT
        assert elapsed < len(names) * RTT / 3
        assert p.connections == 8


def test_pipelined_requests_keep_flowing(served: tuple[Nginx, dict[str, bytes]]) -> None:
    n, files = served
    names = [f"small-{i % 8}" for i in range(24)] + ["big.bin"]
    request = b"".join(f"GET /{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for name in names)
    with LatencyProxy(upstream=("127.0.0.1", n.port), rtt=RTT) as p:
        t = time.monotonic()
        with socket.create_connection(("127.0.0.1", p.port), timeout=30) as s:
            s.sendall(request)
            # No half-close here: nginx takes a client's FIN as the end of the connection and
            # cut the last response short in about one run of fifteen. Read up to its last byte.
            received = bytearray()
            while not received.endswith(files["big.bin"]) and (chunk := s.recv(1 << 16)):
                received += chunk
        elapsed = time.monotonic() - t
    for name in names:
        assert files[name] in received
    assert received.count(b"HTTP/1.1 200 OK") == len(names)
    assert elapsed < len(names) * RTT / 3


def test_rate_cap_paces_the_download(served: tuple[Nginx, dict[str, bytes]]) -> None:
    n, files = served
    size = len(files["big.bin"])
    with LatencyProxy(upstream=("127.0.0.1", n.port), rate=6e6, handshake=False) as p:
        t = time.monotonic()
        assert get(f"{p.url}/big.bin") == files["big.bin"]
        assert time.monotonic() - t >= size / 6e6 * 0.95


def test_upstream_down_closes_the_client() -> None:
    with LatencyProxy(upstream=("127.0.0.1", free_port()), rtt=0.01) as p:
        with pytest.raises((OSError, http.client.HTTPException)):
            get(f"{p.url}/x")
        # The proxy still serves later connections.
        with pytest.raises((OSError, http.client.HTTPException)):
            get(f"{p.url}/y")
        assert p.connections == 2


def test_command_line_proxy(served: tuple[Nginx, dict[str, bytes]]) -> None:
    n, files = served
    port = free_port()
    cmd = [sys.executable, "-m", "seedboot.tools.cli", "proxy", "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen([*cmd, "--upstream", f"127.0.0.1:{n.port}", "--rtt", "50ms", "--rate", "100M"])
    try:
        wait_port(port)
        assert get(f"http://127.0.0.1:{port}/small-1") == files["small-1"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_command_line_rejects_bad_values() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "seedboot.tools.cli", "proxy", "--upstream", "nowhere", "--rtt", "1ms"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "not HOST:PORT: 'nowhere'" in bad.stderr
    assert "hint:" in bad.stderr


@pytest.mark.parametrize(
    ("text", "seconds"), [("100ms", 0.1), ("0.1s", 0.1), ("250", 0.25), ("0", 0.0), (" 5 ms", 0.005)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "rate"),
    [("10M", 10e6), ("512K", 512e3), ("8Mi", 8 * 1024**2), ("80Mbit", 10e6), ("1G/s", 1e9), ("100", 100)],
)
def test_parse_rate(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["fast", "-1M", "0", "10X", ""])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(SeedError):
        parse_rate(text)


def test_parse_hostport() -> None:
    assert parse_hostport("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_hostport(":8080") == ("127.0.0.1", 8080)
    with pytest.raises(SeedError):
        parse_hostport("host:99999")
    with pytest.raises(SeedError):
        parse_duration("1h")
