"""TPM measurement and the rollback NV counter against a real TPM stack: swtpm + tpm2-tools.

swtpm is the software TPM that QEMU guests use here too; it speaks the TPM 2.0 protocol and
tpm2-tools reach it through the swtpm TCTI, exactly as they reach /dev/tpmrm0 in the guest.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from seedboot.agent import tpm
from seedboot.agent.rollback import RollbackRefused
from tests.helpers import free_port, have, wait_port
from tests.qemu import swtpm_device

pytestmark = pytest.mark.skipif(
    not (have("swtpm") and have("tpm2_pcrextend")), reason="swtpm/tpm2-tools missing"
)


@pytest.fixture(scope="module")
def swtpm_tcti(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    state = tmp_path_factory.mktemp("swtpm")
    port = free_port()
    ctrl = port + 1  # the swtpm TCTI finds the control channel at port + 1
    proc = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2",
            "--server", f"type=tcp,port={port}",
            "--ctrl", f"type=tcp,port={ctrl}",
            "--tpmstate", f"dir={state}",
            "--flags", "not-need-init,startup-clear",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
        yield f"swtpm:port={port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["tss2-esys", "tpm2-tools"])
def swtpm(request: pytest.FixtureRequest, swtpm_tcti: str) -> tpm.Tpm:
    """The agent's TPM access through each backend: Debian's libtss2-esys (what the miniroot
    uses) and tpm2-tools; both talk to the same swtpm."""
    t, why = tpm.detect(tcti=swtpm_tcti, prefer=request.param)
    assert t is not None and t.kind == request.param, why
    return t


def img_a(t: tpm.Tpm) -> str:
    return f"img-a-{t.kind}"


def img_b(t: tpm.Tpm) -> str:
    return f"img-b-{t.kind}"


def img_d(t: tpm.Tpm) -> str:
    return f"img-d-{t.kind}"


def cli(t: tpm.Tpm) -> tpm.CliTpm:
    """tpm2-tools on the same TPM: an implementation independent of the agent's ESAPI calls."""
    return tpm.CliTpm(t.tcti)


def test_measure_extends_pcr15_and_logs(swtpm: tpm.Tpm, tmp_path: Path) -> None:
    meta_bytes = b'{"name": "demo", "version": 3}\n'
    digest = hashlib.sha256(meta_bytes).hexdigest()
    before = tpm.pcr_read(swtpm, 15)
    log_path = tmp_path / "run" / "log" / "seedboot" / "tpm2-measure.log"
    m = tpm.measure_release("demo", 3, digest, swtpm, log_path=log_path)
    assert m.status == "measured" and "PCR 15" in m.message
    # Computed independently: PCR_new = SHA256(PCR_old || SHA256(metadata)).
    want = hashlib.sha256(before + hashlib.sha256(meta_bytes).digest()).hexdigest()
    assert tpm.pcr_read(swtpm, 15).hex() == want == m.pcr_value
    # tpm2-tools' own text output agrees (not just our -o file reading).
    text = cli(swtpm).run("tpm2_pcrread", "sha256:15").decode()
    assert want.upper() in text
    events = [json.loads(ln) for ln in log_path.read_text().splitlines()]
    assert events[-1]["pcr"] == 15 and events[-1]["digest"] == digest
    assert events[-1]["description"] == f"seedboot:demo:3:{digest}"
    # Replaying the log from the value before reproduces the PCR.
    assert tpm.expected_extend(before, events[-1]["digest"]).hex() == want


def test_no_tpm_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TPM2TOOLS_TCTI", raising=False)
    monkeypatch.delenv("SEEDBOOT_TPM_TCTI", raising=False)
    t, why = tpm.detect(device=str(tmp_path / "tpmrm0"))
    assert t is None and why.startswith("no TPM")
    m = tpm.measure_release("demo", 1, "ab" * 32, t, why, log_path=tmp_path / "log")
    assert m.status == "no-tpm" and "not measured, continuing" in m.message
    assert not (tmp_path / "log").exists()


def test_dead_tpm_reports_failure(tmp_path: Path) -> None:
    dead = tpm.EsysTpm(f"swtpm:port={free_port()}")
    m = tpm.measure_release("demo", 1, "ab" * 32, dead, log_path=tmp_path / "log")
    assert m.status == "failed" and "continuing" in m.message


def test_nv_counter_refuses_older(swtpm: tpm.Tpm) -> None:
    assert tpm.read_counter(swtpm, img_a(swtpm)) is None
    msg = tpm.check_and_advance(swtpm, img_a(swtpm), 5)
    assert "started" in msg
    st = tpm.read_counter(swtpm, img_a(swtpm))
    assert st is not None and st.highest == 5
    start = st.counter
    with pytest.raises(RollbackRefused, match="version 3 is older than version 5 recorded in the TPM"):
        tpm.check_and_advance(swtpm, img_a(swtpm), 3)
    assert "booting older v3 as requested" in tpm.check_and_advance(swtpm, img_a(swtpm), 3, allow_older=True)
    assert tpm.check_and_advance(swtpm, img_a(swtpm), 7) == f"TPM counter at v7 for {img_a(swtpm)}"
    st = tpm.read_counter(swtpm, img_a(swtpm))
    assert st is not None and (st.highest, st.counter) == (7, start + 2)
    # The base is write-locked: it cannot be rewritten to wind the version back.
    cidx, bidx = tpm.counter_indices(img_a(swtpm))
    with pytest.raises(tpm.TpmError):
        cli(swtpm).run("tpm2_nvwrite", "-C", "o", "-i", "-", hex(bidx), input=b"\0" * 76)
    # A counter cannot be decremented or written either.
    with pytest.raises(tpm.TpmError):
        cli(swtpm).run("tpm2_nvwrite", "-C", "o", "-i", "-", hex(cidx), input=b"\0" * 8)


def test_fresh_counter_starts_non_zero(swtpm: tpm.Tpm) -> None:
    tpm.check_and_advance(swtpm, img_b(swtpm), 1)
    tpm.check_and_advance(swtpm, img_b(swtpm), 9)
    old = tpm.read_counter(swtpm, img_b(swtpm))
    assert old is not None and old.highest == 9
    # Deleting a counter (needs owner auth) does not reset counting: a counter defined later
    # starts at the highest count the TPM has seen, not at 0. The base absorbs that, and
    # the version still reads right.
    for index in tpm.counter_indices(img_b(swtpm)):
        cli(swtpm).run("tpm2_nvundefine", "-C", "o", hex(index))
    assert tpm.read_counter(swtpm, img_b(swtpm)) is None
    tpm.check_and_advance(swtpm, img_b(swtpm), 2)
    st = tpm.read_counter(swtpm, img_b(swtpm))
    assert st is not None and st.highest == 2 and st.counter > old.counter and st.base == st.counter - 2


def test_trust_boot_counter_then_measure(
    swtpm: tpm.Tpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trust stage's one call: the counter refuses a replay before anything is measured."""
    monkeypatch.setenv("SEEDBOOT_TPM_TCTI", swtpm.tcti)
    log_path = tmp_path / "measure.log"
    digest = hashlib.sha256(b"meta v4").hexdigest()
    before = tpm.pcr_read(swtpm)
    notes = tpm.trust_boot(img_d(swtpm), 4, digest, log_path=log_path)
    assert f"started for {img_d(swtpm)} at v4" in notes[0] and "into PCR 15" in notes[1]
    assert tpm.pcr_read(swtpm) == hashlib.sha256(before + bytes.fromhex(digest)).digest()
    after = tpm.pcr_read(swtpm)
    with pytest.raises(RollbackRefused):
        tpm.trust_boot(img_d(swtpm), 2, hashlib.sha256(b"meta v2").hexdigest(), log_path=log_path)
    assert tpm.pcr_read(swtpm) == after and len(log_path.read_text().splitlines()) == 1
    notes = tpm.trust_boot(
        img_d(swtpm), 2, hashlib.sha256(b"meta v2").hexdigest(), allow_older=True, log_path=log_path
    )
    assert "booting older v2 as requested" in notes[0]
    monkeypatch.delenv("SEEDBOOT_TPM_TCTI")
    monkeypatch.delenv("TPM2TOOLS_TCTI", raising=False)
    if not Path(tpm.DEFAULT_DEVICE).exists():
        assert tpm.trust_boot(img_d(swtpm), 5, digest, log_path=log_path) == [
            f"no TPM ({tpm.DEFAULT_DEVICE} absent): image not measured, continuing"
        ]


# --- in a QEMU guest: /dev/tpmrm0 backed by swtpm, the agent frozen as the miniroot carries it


@pytest.mark.qemu
@pytest.mark.skipif(not (have("qemu-system-x86_64") and have("cpio")), reason="qemu/cpio missing")
def test_guest_measures_and_refuses_replay(tmp_path: Path) -> None:
    """The frozen agent in a guest, through the kernel's TPM driver and Debian's TSS libraries
    (device TCTI): PCR 15 as sysfs shows it equals the extend computed here; the NV counter
    survives a reboot and refuses an older version (in a whole boot the state file on the
    cache refuses it first, so the counter's own refusal is checked here)."""
    from tests import guest

    image = guest.initrd(tmp_path / "initrd.img")
    state = tmp_path / "tpmstate"
    state.mkdir()

    def boot_with_tpm(append: str) -> dict[str, str]:
        with swtpm_device(state, tmp_path / "swtpm.sock") as qemu_args:
            return guest.boot(image, append, qemu_args=tuple(qemu_args))

    d3 = hashlib.sha256(b"metadata v3").hexdigest()
    first = boot_with_tpm("seedtest=tpm seedtest.version=3")
    assert "TPM counter 0x" in first["SEEDTEST-NOTES"] and "started for demo at v3" in first["SEEDTEST-NOTES"]
    assert "measured demo v3 into PCR 15" in first["SEEDTEST-NOTES"]
    assert first["SEEDTEST-PCR15"] == hashlib.sha256(bytes(32) + bytes.fromhex(d3)).hexdigest()
    event = json.loads(first["SEEDTEST-LOG"])
    assert event["pcr"] == 15 and event["description"] == f"seedboot:demo:3:{d3}"

    # A reboot (fresh PCRs, same NV): an older signed version is refused before any measurement.
    second = boot_with_tpm("seedtest=tpm seedtest.version=2")
    assert "version 2 is older than version 3 recorded in the TPM" in second["SEEDTEST-REFUSED"]
    assert second["SEEDTEST-PCR15"] == "0" * 64
    # (A guest without a TPM is one of the whole boots in test_trust_boot.py.)
