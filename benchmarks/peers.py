"""The systems a user would pick instead of seedboot, serving the same raw image over HTTP.

- QEMU's curl block driver: QEMU itself fetches byte ranges of ``disk.img`` over HTTP
  (``file.driver=http``), with its default readahead (256 KiB) or a larger one.
- nbdkit's curl plugin behind its readahead and cache filters, exposed to QEMU over NBD.
Both see the mirror through the latency proxy; writes go to QEMU's temporary snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from benchmarks import vm
from tests.helpers import free_port, wait_port

log = logging.getLogger(__name__)


def qemu_curl_drive(url: str, readahead: int | None = None) -> list[str]:
    opts = [f"file.driver=http,file.url={url},file.timeout=60", "format=raw,if=virtio,snapshot=on"]
    if readahead is not None:
        opts.insert(1, f"file.readahead={readahead}")
    return ["-drive", ",".join(opts), *vm.NIC]


@contextlib.contextmanager
def nbdkit_curl(url: str, workdir: Path, cache_on_read: bool = True) -> Iterator[list[str]]:
    """nbdkit serving URL read-only over NBD on loopback; yields QEMU's drive arguments."""
    if shutil.which("nbdkit") is None:
        raise SystemExit("nbdkit is missing: run scripts/setup")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = ["nbdkit", "-f", "-r", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port)]
    # readahead above cache: its prefetches land in the cache that later reads hit.
    cmd += ["--filter=readahead", "--filter=cache", "curl", f"url={url}", "timeout=60"]
    if cache_on_read:
        cmd.append("cache-on-read=true")
    log.info("$ %s", " ".join(cmd))
    env_tmp = workdir / "tmp"
    env_tmp.mkdir(exist_ok=True)
    with open(workdir / "nbdkit.log", "ab") as err:
        proc = subprocess.Popen(
            cmd, stdout=err, stderr=err, env={"TMPDIR": str(env_tmp), "PATH": "/usr/bin:/bin"}
        )
    try:
        wait_port(port, timeout=30)
        yield ["-drive", f"file=nbd://127.0.0.1:{port},format=raw,if=virtio,snapshot=on", *vm.NIC]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
