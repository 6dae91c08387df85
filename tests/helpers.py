"""Real parts for tests: nginx on loopback, ext4 images made with mke2fs -d, key pairs."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from seedboot.tools import keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Nginx:
    """nginx serving ``root`` on a loopback port; ``extra`` is raw config inside the server block
    (e.g. ``location /blocks/ab/ { return 500; }``) for failure injection."""

    root: Path
    workdir: Path
    extra: str = ""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _conf(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            f"""
daemon off;
master_process on;
worker_processes 2;
user root;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {self.workdir}/access.log;
    client_body_temp_path {self.workdir}/body;
    proxy_temp_path {self.workdir}/proxy;
    fastcgi_temp_path {self.workdir}/fastcgi;
    uwsgi_temp_path {self.workdir}/uwsgi;
    scgi_temp_path {self.workdir}/scgi;
    sendfile on;
    keepalive_requests 100000;
    keepalive_timeout 120s;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port} reuseport;
        root {self.root};
        {self.extra}
    }}
}}
"""
        )
        return conf

    def start(self) -> Nginx:
        conf = self._conf()
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-e", str(self.workdir / "error.log")])
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def requests(self) -> list[str]:
        """Request lines from the access log (e.g. 'GET /blocks/ab/... HTTP/1.1')."""
        log = self.workdir / "access.log"
        if not log.exists():
            return []
        return [ln.split('"')[1] for ln in log.read_text().splitlines() if '"' in ln]


def make_tree(root: Path, seed: int = 1, big_mb: int = 8) -> None:
    """A source tree with random, duplicate and compressible files (zero regions come from the
    filesystem's free space and from a sparse file)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "hostname").write_text("seedboot-test\n")
    data = rng.randbytes(big_mb * 1024 * 1024)
    (root / "random.bin").write_bytes(data)
    (root / "random-copy.bin").write_bytes(data)  # identical blocks: stored once
    text = "".join(f"line {i} of a compressible text file\n" for i in range(200_000))
    (root / "text.txt").write_text(text)
    with open(root / "sparse.bin", "wb") as f:
        f.truncate(4 * 1024 * 1024)
    sub = root / "dir" / "nested"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(50):
        (sub / f"small-{i}.dat").write_bytes(rng.randbytes(rng.randint(1, 40000)))


def make_ext4(src: Path, image: Path, size_mb: int = 64) -> Path:
    image.parent.mkdir(parents=True, exist_ok=True)
    if image.exists():
        image.unlink()
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "seedtest", "-d", str(src), str(image), f"{size_mb}M"],
        check=True,
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )
    return image


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def keypair(dirpath: Path, name: str = "pub") -> tuple[Path, Path]:
    key, pub, _ = keys.write_keypair(dirpath / name)
    return key, pub


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None
