"""A minimal QEMU guest that runs pieces of the frozen agent against a real kernel.

Before the whole boot works, the chain-of-trust parts that need a kernel the host lacks
(device-mapper) or a TPM device (``/dev/tpmrm0``) are checked here: a busybox initramfs
with Debian's kernel modules, and the agent frozen exactly as the miniroot carries it
(tools/freeze.py), but with a test entry point (``TEST_MAIN``) that calls the agent's
dm-verity and TPM code and prints ``SEEDTEST-KEY=value`` lines on the serial console.
The frozen runtime is cached under ``build/`` by the hash of the agent's sources.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from seedboot.tools import freeze, kernel

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "build" / "test-artifacts" / "kernel"
CACHE = REPO / "build" / "trust-guest"

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs run /run
for m in $(cat /modules.order); do insmod /mods/$m || echo "SEEDTEST insmod $m failed"; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vdb ] || [ ! -e /mods/virtio_blk.ko ] && break; sleep 0.2; done
[ -f /before.sh ] && sh /before.sh
# Where the miniroot's /init puts the runtime (its launcher may name the loader there).
cp -a /opt/seedboot /run/seedboot
/run/seedboot/seedboot-agent
echo SEEDTEST-DONE=1
poweroff -f
"""

# The frozen test agent's entry point; what it does is chosen on the kernel command line.
TEST_MAIN = """
def main() -> int:
    import hashlib
    import json
    from pathlib import Path

    args = dict(a.split("=", 1) for a in open("/proc/cmdline").read().split() if "=" in a)
    what = args.get("seedtest", "")
    if what == "verity":
        from seedboot.agent import metadata, verity

        v = metadata.Verity(**json.load(open("/verity.json")))
        dev = verity.setup(v, "/dev/vda", "/dev/vdb")
        print(f"SEEDTEST-AGENT-DEV={dev}")
        h = hashlib.sha256()
        try:
            with open(dev, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            print(f"SEEDTEST-AGENT-SHA={h.hexdigest()}")
        except OSError as e:
            print(f"SEEDTEST-AGENT-READ-ERRNO={e.errno}")
        print(f"SEEDTEST-AGENT-STATUS={verity.status()}")
    elif what == "tpm":
        from seedboot.agent import tpm
        from seedboot.agent.rollback import RollbackRefused

        version = int(args["seedtest.version"])
        digest = hashlib.sha256(f"metadata v{version}".encode()).hexdigest()
        log_path = Path("/run/log/seedboot/tpm2-measure.log")
        try:
            notes = tpm.trust_boot("demo", version, digest, args.get("seedtest.older") == "1", log_path)
            print("SEEDTEST-NOTES=" + " | ".join(notes))
        except RollbackRefused as e:
            print(f"SEEDTEST-REFUSED={e.message}")
        pcr = Path("/sys/class/tpm/tpm0/pcr-sha256/15")
        print("SEEDTEST-PCR15=" + (pcr.read_text().strip().lower() if pcr.exists() else "none"))
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        print("SEEDTEST-LOG=" + (lines[-1] if lines else "none"))
    return 0
"""


def kernel_dir() -> Path:
    # The same lock as tests/artifacts.py: parallel test processes fetch the kernel once.
    KERNEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    with (KERNEL_DIR.parent / ".kernel.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        return kernel.fetch(KERNEL_DIR).root


def frozen_agent() -> Path:
    """The agent frozen with TEST_MAIN as its entry point (cached by source hash)."""
    h = hashlib.sha256(TEST_MAIN.encode())
    for p in sorted(freeze.AGENT_SRC.rglob("*.py")):
        h.update(str(p.relative_to(freeze.AGENT_SRC)).encode() + p.read_bytes())
    for p in (REPO / "tools" / "freeze.py",):
        h.update(p.read_bytes())
    out = CACHE / f"runtime-{h.hexdigest()[:16]}"
    if (out / "seedboot-agent").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob("runtime-*"):
        shutil.rmtree(old, ignore_errors=True)
    src = CACHE / "agent-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(freeze.AGENT_SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "main.py").write_text(TEST_MAIN)
    tmp = CACHE / "runtime.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    freeze.freeze(tmp, src)
    tmp.rename(out)
    return out


def module_closure(kdir: Path, names: tuple[str, ...]) -> list[Path]:
    """Module files for NAMES and their dependencies, dependencies first (from modules.dep)."""
    version = (kdir / "kernel-version").read_text().strip()
    mods = kdir / "lib" / "modules" / version
    deps: dict[str, list[str]] = {}
    for line in (mods / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("_", "-"): m for m in deps}
    order: list[str] = []

    def add(rel: str) -> None:
        for d in deps[rel]:
            add(d)
        if rel not in order:
            order.append(rel)

    for n in names:
        add(by_name[n.replace("_", "-")])
    return [mods / r for r in order]


def _copy_with_libs(exe: Path, stage: Path, dest: str) -> None:
    shutil.copy(exe, stage / dest)
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, check=True).stdout
    for lib in [w for w in ldd.split() if w.startswith("/")]:
        target = stage / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(lib).resolve(), target)


def initrd(
    out: Path,
    modules: tuple[str, ...] = (),
    files: dict[str, str] | None = None,
    before: str = "",
    dmsetup: bool = False,
) -> Path:
    """A zstd cpio: busybox, MODULES (+ deps), the frozen test agent, FILES; the shell
    script BEFORE runs before the agent."""
    kdir = kernel_dir()
    stage = out.parent / f"{out.name}.stage"
    shutil.rmtree(stage, ignore_errors=True)
    for sub in ("bin", "mods", "lib64", "usr/sbin", "opt"):
        (stage / sub).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
    shutil.copy(busybox, stage / "bin" / "busybox")
    mods = module_closure(kdir, modules)
    for m in mods:
        shutil.copy(m, stage / "mods" / m.name)
    (stage / "modules.order").write_text("".join(f"{m.name}\n" for m in mods))
    if dmsetup:
        _copy_with_libs(Path(shutil.which("dmsetup") or "/usr/sbin/dmsetup"), stage, "usr/sbin/dmsetup")
    runtime = frozen_agent()
    shutil.copytree(runtime, stage / "opt" / "seedboot", symlinks=True)
    # The runtime's libraries are the build host's, so is its loader.
    shutil.copy(Path("/lib64/ld-linux-x86-64.so.2").resolve(), stage / "lib64" / "ld-linux-x86-64.so.2")
    (stage / "init").write_text(INIT)
    (stage / "init").chmod(0o755)
    if before:
        (stage / "before.sh").write_text(before)
    for name, text in (files or {}).items():
        (stage / name).write_text(text)
    names = subprocess.run(["find", "."], cwd=stage, capture_output=True, text=True, check=True).stdout
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        cwd=stage,
        input=names.encode(),
        capture_output=True,
        check=True,
    ).stdout
    out.write_bytes(
        subprocess.run(["zstd", "-3", "-T0"], input=archive, capture_output=True, check=True).stdout
    )
    shutil.rmtree(stage)
    return out


def boot(
    image: Path, append: str = "", drives: tuple[Path, ...] = (), qemu_args: tuple[str, ...] = ()
) -> dict[str, str]:
    """Boot the guest until it powers off; the SEEDTEST-KEY=value lines of its console."""
    cmd = [
        "qemu-system-x86_64", "-m", "384", "-smp", "1", "-cpu", "qemu64,+rdrand", "-nographic", "-no-reboot",
        "-kernel", str(kernel_dir() / "vmlinuz"), "-initrd", str(image),
        "-append", f"console=ttyS0 panic=-1 quiet {append}", "-nic", "none",
    ]  # fmt: skip
    for d in drives:
        cmd += ["-drive", f"file={d},if=virtio,format=raw,snapshot=on"]
    r = subprocess.run(
        [*cmd, *qemu_args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    out = {m.group(1): m.group(2).strip() for m in re.finditer(r"(SEEDTEST-[A-Z0-9-]+)=([^\r\n]*)", r.stdout)}
    assert "SEEDTEST-DONE" in out, r.stdout[-3000:] + r.stderr[-1000:]
    return out
