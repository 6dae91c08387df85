"""TPM 2.0: measure the verified release into a PCR; a rollback NV counter.

The agent talks to the TPM itself (tpm_wire.py: the nine TPM 2.0 commands it needs,
marshalled in pure Python), so the miniroot carries no TPM library; tpm2-tools, where
installed, are the alternative ``detect`` can be asked for and what the tests check against.
Both address the TPM with the same TCTI string.

Measurement. Before the switch into the new root the agent extends **PCR 15** in the
SHA-256 bank with the SHA-256 of the verified metadata bytes (``Release.meta_digest``):

    PCR15 := SHA256(PCR15 || SHA256(metadata bytes))

PCR 15 is what systemd's PCR conventions call "system-identity": systemd-pcrfs measures the
root (and other) file system identities into it, and nothing of the firmware or boot loader
touches it. The metadata names the index, which names every block, so the PCR pins the
whole image: a booted system can prove (``tpm2_quote``) which image it runs, and secrets
can be sealed to it (``systemd-cryptenroll --tpm2-pcrs=15``...). Each extend is logged as
one JSON line in ``/run/log/seedboot/tpm2-measure.log`` (beside systemd's
``/run/log/systemd/tpm2-measure.log``; ``/run`` moves into the new root)::

    {"pcr": 15, "hash": "sha256", "digest": "<hex>", "description": "seedboot:NAME:VERSION:<hex>",
     "pcr_value": "<hex, after the extend>", "time": 1700000000}

Rollback counter. Per image, two NV indices in the owner range (TCG handle registry:
0x01800000-0x01BFFFFF), at ``COUNTER_BASE + 2*slot`` with ``slot`` from the image name's
SHA-256 (0..127): a counter (``nt=counter``) and a 76-byte ordinary index holding the
image name and a *base*, written once and write-locked (``writedefine``: locked until
the index is deleted). The highest version seen is ``counter - base``. A TPM counter cannot
be set, only incremented, and it cannot be read before its first increment; a fresh counter
then holds a non-zero value: 1 on a new TPM, or the highest count of any counter ever
deleted from this TPM (TPM 2.0 part 1, "NV counters"), possibly millions on a used one. So
at first use the agent increments once, reads ``c`` and stores ``base = c - version``.
A newer version increments the counter ``version - highest`` times (at most ``MAX_STEPS``
a boot; a larger jump leaves the counter behind the state file, which still refuses
older versions exactly). Limit: whoever holds the TPM owner authorization (often empty)
can delete both indices; the agent then starts over at the version it sees, and only the
state file on the cache still refuses older versions.

Where no TPM is present (no ``/dev/tpmrm0``) nothing is measured and the console says so.
The TCTI is ``device:/dev/tpmrm0`` by default (``device:/dev/tpm0`` on a kernel without
the resource manager); ``SEEDBOOT_TPM_TCTI`` or ``TPM2TOOLS_TCTI`` (e.g. ``swtpm:port=2321``)
override it, which is how host tests use swtpm.

The miniroot needs nothing but the agent: with the TPM TIS/CRB drivers built into Debian's
kernel, no module and no library.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from seedboot.agent.errors import SeedError

log = logging.getLogger(__name__)

PCR_SYSTEM_IDENTITY = 15
DEFAULT_DEVICE = "/dev/tpmrm0"
DEFAULT_LOG = Path("/run/log/seedboot/tpm2-measure.log")
COUNTER_BASE = 0x01800A00
SLOTS = 128
MAX_STEPS = 256
_BASE_MAGIC = b"SBV1"
_BASE_SIZE = 4 + 8 + 64
TOOLS = ("tpm2_pcrextend", "tpm2_pcrread", "tpm2_nvdefine", "tpm2_nvincrement", "tpm2_nvread")
TIMEOUT = 20.0


class TpmError(SeedError):
    """A TPM command that failed (the TPM answered with an error, or did not answer)."""

    def __init__(self, message: str, hint: str = "", code: int | None = None) -> None:
        super().__init__(message, hint)
        self.code = code  # the TPM response code (handle/parameter numbers masked), if it answered


# TPM 2.0 response codes the agent expects and handles.
RC_HANDLE = 0x08B  # no such NV index
RC_NV_UNINITIALIZED = 0x14A  # defined, never written
RC_NV_DEFINED = 0x14C  # already defined
# "Esys_NV_Read(0x14A) - tpm:..." (or, with TSS2_LOG on, "ErrorCode (0x0000014a)").
_RC_RE = re.compile(r"\(0x([0-9a-fA-F]+)\)")

# TPMA_NV attributes of the two indices (see tpm_wire for the bits).
NV_COUNTER = "counter"
NV_BASE = "base"


class Tpm(Protocol):
    @property
    def tcti(self) -> str: ...
    @property
    def kind(self) -> str: ...

    def pcr_read(self, pcr: int) -> bytes: ...
    def pcr_extend(self, pcr: int, digest: bytes) -> None: ...
    def nv_read(self, index: int) -> bytes: ...
    def nv_define(self, index: int, size: int, kind: str) -> None: ...
    def nv_increment(self, index: int) -> None: ...
    def nv_write(self, index: int, data: bytes) -> None: ...
    def nv_writelock(self, index: int) -> None: ...


@dataclass(frozen=True)
class WireTpm:
    """Through the agent's own TPM 2.0 client (tpm_wire.py): what the miniroot uses."""

    tcti: str
    kind: str = "tpm-wire"

    def _do(self, what: str, fn: Callable[[Any], Any]) -> Any:
        from seedboot.agent import tpm_wire

        try:
            ctx = tpm_wire.Wire(self.tcti)
        except tpm_wire.WireError as e:
            raise TpmError(f"cannot reach the TPM via {self.tcti} ({e})", "is the TPM working?") from e
        try:
            return fn(ctx)
        except tpm_wire.WireError as e:
            code = e.tpm_rc
            raise TpmError(f"TPM {what} ({self.tcti}) failed: {e}", code=code) from e
        finally:
            ctx.close()

    def pcr_read(self, pcr: int) -> bytes:
        return bytes(self._do(f"PCR_Read {pcr}", lambda t: t.pcr_read(pcr)))

    def pcr_extend(self, pcr: int, digest: bytes) -> None:
        self._do(f"PCR_Extend {pcr}", lambda t: t.pcr_extend(pcr, digest))

    def nv_read(self, index: int) -> bytes:
        return bytes(self._do(f"NV_Read {index:#x}", lambda t: t.nv_read(index)))

    def nv_define(self, index: int, size: int, kind: str) -> None:
        from seedboot.agent import tpm_wire as e

        attrs = e.NV_OWNERREAD | e.NV_OWNERWRITE | e.NV_AUTHREAD | e.NV_AUTHWRITE
        attrs |= e.NV_TPM_NT_COUNTER if kind == NV_COUNTER else e.NV_WRITEDEFINE
        self._do(f"NV_DefineSpace {index:#x}", lambda t: t.nv_define(index, size, attrs))

    def nv_increment(self, index: int) -> None:
        self._do(f"NV_Increment {index:#x}", lambda t: t.nv_increment(index))

    def nv_write(self, index: int, data: bytes) -> None:
        self._do(f"NV_Write {index:#x}", lambda t: t.nv_write(index, data))

    def nv_writelock(self, index: int) -> None:
        self._do(f"NV_WriteLock {index:#x}", lambda t: t.nv_writelock(index))


@dataclass(frozen=True)
class CliTpm:
    """Through tpm2-tools (where asked for, and the independent implementation the tests
    check against)."""

    tcti: str
    kind: str = "tpm2-tools"

    def run(self, *args: str, input: bytes | None = None) -> bytes:
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        try:
            r = subprocess.run(args, input=input, capture_output=True, env=env, timeout=TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TpmError(f"{args[0]} ({self.tcti}): {e}", "is the TPM working?") from e
        if r.returncode != 0:
            from seedboot.agent.tpm_wire import mask_rc

            err = r.stderr.decode(errors="replace")
            m = _RC_RE.search(err)
            lines = err.strip().splitlines()
            why = next(
                (ln for ln in lines if " - tpm:" in ln or "tcti" in ln.lower()), lines[-1] if lines else ""
            )
            raise TpmError(
                f"{args[0]} ({self.tcti}) failed: {why.removeprefix('ERROR: ') or r.returncode}",
                code=mask_rc(int(m.group(1), 16)) if m else None,
            )
        return r.stdout

    def pcr_read(self, pcr: int) -> bytes:
        import tempfile  # here: with random, ~45 ms of PID 1's start under emulation otherwise

        with tempfile.TemporaryDirectory(prefix="seedboot-tpm-") as d:
            out = Path(d) / "pcr"
            self.run("tpm2_pcrread", f"sha256:{pcr}", "-o", str(out))
            return out.read_bytes()

    def pcr_extend(self, pcr: int, digest: bytes) -> None:
        self.run("tpm2_pcrextend", f"{pcr}:sha256={digest.hex()}")

    def nv_read(self, index: int) -> bytes:
        return self.run("tpm2_nvread", "-C", "o", hex(index))

    def nv_define(self, index: int, size: int, kind: str) -> None:
        attrs = "ownerread|ownerwrite|authread|authwrite|" + (
            "nt=counter" if kind == NV_COUNTER else "writedefine"
        )
        self.run("tpm2_nvdefine", hex(index), "-C", "o", "-s", str(size), "-a", attrs)

    def nv_increment(self, index: int) -> None:
        self.run("tpm2_nvincrement", "-C", "o", hex(index))

    def nv_write(self, index: int, data: bytes) -> None:
        self.run("tpm2_nvwrite", "-C", "o", "-i", "-", hex(index), input=data)

    def nv_writelock(self, index: int) -> None:
        self.run("tpm2_nvwritelock", "-C", "o", hex(index))


def detect(
    tcti: str | None = None, device: str = DEFAULT_DEVICE, prefer: str = "tpm-wire"
) -> tuple[Tpm | None, str]:
    """The TPM to use, or None and the reason (for the console line)."""
    tcti = tcti or os.environ.get("SEEDBOOT_TPM_TCTI") or os.environ.get("TPM2TOOLS_TCTI")
    if not tcti:
        # /dev/tpm0 without the kernel's resource manager: one user at a time, which the
        # agent is (it opens the device per command).
        found = next((d for d in (device, str(Path(device).with_name("tpm0"))) if os.path.exists(d)), None)
        if found is None:
            return None, f"no TPM ({device} absent)"
        tcti = f"device:{found}"
    if prefer == "tpm2-tools" and all(shutil.which(t) for t in TOOLS):
        return CliTpm(tcti), f"TPM via {tcti} (tpm2-tools)"
    log.info("TPM via %s", tcti)
    return WireTpm(tcti), f"TPM via {tcti}"


def pcr_read(tpm: Tpm, pcr: int = PCR_SYSTEM_IDENTITY) -> bytes:
    value = tpm.pcr_read(pcr)
    if len(value) != 32:
        raise TpmError(f"PCR {pcr} read back {len(value)} bytes", "does the TPM have a SHA-256 bank?")
    return value


def pcr_extend(tpm: Tpm, digest_hex: str, pcr: int = PCR_SYSTEM_IDENTITY) -> None:
    tpm.pcr_extend(pcr, bytes.fromhex(digest_hex))


def expected_extend(old: bytes, digest_hex: str) -> bytes:
    return hashlib.sha256(old + bytes.fromhex(digest_hex)).digest()


@dataclass
class Measurement:
    status: str  # "measured", "no-tpm" or "failed"
    message: str  # one console line
    pcr: int = PCR_SYSTEM_IDENTITY
    digest: str = ""
    pcr_value: str = ""


def measure_release(
    name: str,
    version: int,
    digest_hex: str,
    tpm: Tpm | None,
    reason: str = "no TPM",
    log_path: Path = DEFAULT_LOG,
    pcr: int = PCR_SYSTEM_IDENTITY,
) -> Measurement:
    """Extend ``pcr`` with the metadata digest and log the event; never stops the boot.

    A failed measurement cannot be abused: the PCR then differs from the expected value, so
    sealed secrets stay sealed and a quote shows it."""
    if tpm is None:
        log.info("not measured: %s", reason)
        return Measurement("no-tpm", f"{reason}: image not measured, continuing", pcr, digest_hex)
    description = f"seedboot:{name}:{version}:{digest_hex}"
    try:
        pcr_extend(tpm, digest_hex, pcr)
        value = pcr_read(tpm, pcr).hex()
    except TpmError as e:
        log.warning("measurement failed: %s", e)
        return Measurement("failed", f"TPM measurement failed ({e.message}), continuing", pcr, digest_hex)
    event = {
        "pcr": pcr,
        "hash": "sha256",
        "digest": digest_hex,
        "description": description,
        "pcr_value": value,
        "time": int(time.time()),
    }
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(event, sort_keys=True) + "\n")
    except OSError as e:
        log.warning("cannot write measurement log %s: %s", log_path, e.strerror)
    log.info("measured %s into PCR %d (now %s)", description, pcr, value)
    return Measurement(
        "measured",
        f"measured {name} v{version} into PCR {pcr} (sha256 {digest_hex[:16]}…)",
        pcr,
        digest_hex,
        value,
    )


def counter_indices(name: str) -> tuple[int, int]:
    slot = int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big") % SLOTS
    counter = COUNTER_BASE + 2 * slot
    return counter, counter + 1


def _nv_read(tpm: Tpm, index: int) -> bytes | None:
    """The index's content, or None if it is not defined or never written."""
    try:
        return tpm.nv_read(index)
    except TpmError as e:
        if e.code in (RC_HANDLE, RC_NV_UNINITIALIZED):
            return None
        raise


def _counter(tpm: Tpm, index: int) -> int | None:
    raw = _nv_read(tpm, index)
    return None if raw is None else int.from_bytes(raw[:8], "big")


def _define(tpm: Tpm, index: int, size: int, kind: str) -> None:
    try:
        tpm.nv_define(index, size, kind)
    except TpmError as e:
        if e.code != RC_NV_DEFINED:  # defined already: an earlier boot stopped half-way
            raise


@dataclass
class CounterState:
    name: str
    highest: int  # the highest version the counter vouches for
    counter: int
    base: int


def read_counter(tpm: Tpm, name: str) -> CounterState | None:
    """The counter state of ``name``, or None if it has none yet. Raises if the slot is another image's."""
    cidx, bidx = counter_indices(name)
    raw = _nv_read(tpm, bidx)
    if raw is None:
        return None
    if len(raw) < _BASE_SIZE or raw[:4] != _BASE_MAGIC:
        raise TpmError(f"TPM NV index {bidx:#x} holds something else", "another tool uses it")
    owner = raw[12:76].rstrip(b"\0").decode(errors="replace")
    if owner != name:
        raise TpmError(
            f"TPM NV index {bidx:#x} belongs to image {owner!r}", "the state file still protects this image"
        )
    base = int.from_bytes(raw[4:12], "big", signed=True)
    count = _counter(tpm, cidx)
    if count is None:
        raise TpmError(f"TPM NV counter {cidx:#x} is missing while its base exists", "was it deleted?")
    return CounterState(name, count - base, count, base)


def _first_use(tpm: Tpm, name: str, version: int) -> CounterState:
    cidx, bidx = counter_indices(name)
    _define(tpm, cidx, 8, NV_COUNTER)
    tpm.nv_increment(cidx)
    count = _counter(tpm, cidx)
    assert count is not None
    base = count - version
    blob = _BASE_MAGIC + base.to_bytes(8, "big", signed=True) + name.encode().ljust(64, b"\0")
    _define(tpm, bidx, _BASE_SIZE, NV_BASE)
    tpm.nv_write(bidx, blob)
    tpm.nv_writelock(bidx)
    log.info("TPM counter %#x for %s: started at %d, base %d", cidx, name, count, base)
    return CounterState(name, version, count, base)


def check_and_advance(tpm: Tpm, name: str, version: int, allow_older: bool = False) -> str:
    """Refuse a version below the TPM counter's (unless asked for), then move the counter up to it.

    Returns a console line. TPM trouble (owner auth set, NV full, index taken) is reported
    and the boot goes on: the state file on the cache still refuses older versions."""
    from seedboot.agent.rollback import RollbackRefused

    try:
        st = read_counter(tpm, name)
        if st is None:
            st = _first_use(tpm, name, version)
            return f"TPM counter {counter_indices(name)[0]:#x} started for {name} at v{version}"
        if version < st.highest:
            if not allow_older:
                raise RollbackRefused(
                    f"{name} version {version} is older than version {st.highest} recorded in the TPM",
                    "a mirror may be replaying an old release; to boot it anyway, choose the version "
                    "from the boot menu (seed.version=)",
                )
            return f"TPM counter says v{st.highest}; booting older v{version} as requested"
        steps = min(version - st.highest, MAX_STEPS)
        for _ in range(steps):
            tpm.nv_increment(counter_indices(name)[0])
        now = st.highest + steps
        if now < version:
            log.warning("TPM counter advanced only to v%d (at most %d steps a boot)", now, MAX_STEPS)
        return f"TPM counter at v{now} for {name}"
    except TpmError as e:
        log.warning("TPM rollback counter not used: %s", e)
        return f"TPM rollback counter not used ({e.message})"


def trust_boot(
    name: str, version: int, digest_hex: str, allow_older: bool = False, log_path: Path = DEFAULT_LOG
) -> list[str]:
    """What the trust stage calls once the release is verified: the TPM rollback counter
    (raises ``RollbackRefused`` for a replayed older version), then the PCR 15 measurement.
    Returns the console notes; without a TPM, one note that says so."""
    t, why = detect()
    if t is None:
        return [measure_release(name, version, digest_hex, None, why, log_path).message]
    notes = [check_and_advance(t, name, version, allow_older)]
    notes.append(measure_release(name, version, digest_hex, t, why, log_path).message)
    return notes
