"""TPM measurement and the rollback NV counter against a real TPM: swtpm, checked with tpm2-tools.

swtpm is the software TPM that QEMU guests use here too. On the host the agent's own client
(agent/tpm_wire.py) sends its commands over swtpm's TCP data channel, the same bytes it
writes to /dev/tpmrm0 in the guest (the host kernel has no tpm_vtpm_proxy to make swtpm a
character device here); tpm2-tools, through their swtpm TCTI, are the independent check.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from seedboot.agent import tpm, tpm_wire
from seedboot.agent.rollback import RollbackRefused
from tests.helpers import free_port, have, wait_port
from tests.qemu import swtpm_device

pytestmark = pytest.mark.skipif(
    not (have("swtpm") and have("tpm2_pcrextend")), reason="swtpm/tpm2-tools missing"
)


def start_swtpm(state: Path) -> tuple[subprocess.Popen[bytes], int]:
    """swtpm on a free TCP port pair; another try on other ports if it cannot bind (the
    port after the free one is found may be taken by a parallel test)."""
    for _ in range(5):
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
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            wait_port(port)
            return proc, port
        except TimeoutError:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            print(f"swtpm on {port}/{ctrl}: {err.decode(errors='replace').strip()}")
    raise RuntimeError("swtpm did not start on five port pairs")


@pytest.fixture(scope="module")
def swtpm_tcti(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, port = start_swtpm(tmp_path_factory.mktemp("swtpm"))
    try:
        yield f"swtpm:port={port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["tpm-wire", "tpm2-tools"])
def swtpm(request: pytest.FixtureRequest, swtpm_tcti: str) -> tpm.Tpm:
    """The agent's TPM access through each backend: its own client (what the miniroot uses)
    and tpm2-tools; both talk to the same swtpm."""
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
    """tpm2-tools on the same TPM: an implementation independent of the agent's own client."""
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
    dead = tpm.WireTpm(f"swtpm:port={free_port()}")
    m = tpm.measure_release("demo", 1, "ab" * 32, dead, log_path=tmp_path / "log")
    assert m.status == "failed" and "cannot reach the TPM" in m.message and "continuing" in m.message


def test_detect_falls_back_to_tpm0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without the resource manager has only /dev/tpm0 (only existence is checked here)."""
    monkeypatch.delenv("TPM2TOOLS_TCTI", raising=False)
    monkeypatch.delenv("SEEDBOOT_TPM_TCTI", raising=False)
    (tmp_path / "tpm0").touch()
    t, why = tpm.detect(device=str(tmp_path / "tpmrm0"))
    assert t is not None and t.tcti == f"device:{tmp_path / 'tpm0'}" and t.kind == "tpm-wire", why


def test_wire_nv_public_name_and_errors(swtpm_tcti: str) -> None:
    """The client's NV marshalling against tpm2-tools' view of the same index: attributes,
    size and the TPM name (nameAlg || SHA-256 of the public area) agree; the TPM's refusals
    come back as its response codes, named."""
    index = 0x01800F00
    attrs = tpm_wire.NV_OWNERREAD | tpm_wire.NV_OWNERWRITE | tpm_wire.NV_AUTHREAD | tpm_wire.NV_AUTHWRITE
    attrs |= tpm_wire.NV_WRITEDEFINE
    data = b"seedboot".ljust(20, b"\0")
    # swtpm serves one connection at a time: each block closes its own before tpm2-tools runs.
    with closing(tpm_wire.Wire(swtpm_tcti)) as w:
        w.nv_define(index, 20, attrs)
        with pytest.raises(tpm_wire.WireError, match=r"0x14c \(TPM_RC_NV_DEFINED\)") as e:
            w.nv_define(index, 20, attrs)
        assert e.value.tpm_rc == tpm.RC_NV_DEFINED
        with pytest.raises(tpm_wire.WireError, match="TPM_RC_NV_UNINITIALIZED"):
            w.nv_read(index)
        w.nv_write(index, data)
        pub = w.nv_read_public(index)  # the name covers the attributes, so after WRITTEN is set
    text = tpm.CliTpm(swtpm_tcti).run("tpm2_nvreadpublic", hex(index)).decode()
    name = re.search(r"name: ([0-9a-fA-F]+)", text)
    assert name is not None and name.group(1).lower() == pub.name.hex()
    assert "size: 20" in text and pub.data_size == 20 and pub.attributes == attrs | tpm_wire.NV_WRITTEN
    assert tpm.CliTpm(swtpm_tcti).nv_read(index) == data
    with closing(tpm_wire.Wire(swtpm_tcti)) as w:
        assert w.nv_read(index) == data
        w.nv_writelock(index)
        with pytest.raises(tpm_wire.WireError, match="TPM_RC_NV_LOCKED"):
            w.nv_write(index, bytes(20))
        w.nv_undefine(index)
        with pytest.raises(tpm_wire.WireError) as e:
            w.nv_read(index)
        assert e.value.tpm_rc == tpm.RC_HANDLE and "TPM_RC_HANDLE" in str(e.value)
    with pytest.raises(tpm.TpmError):
        tpm.CliTpm(swtpm_tcti).run("tpm2_nvreadpublic", hex(index))


def test_wire_rejects_a_truncated_response(tmp_path: Path) -> None:
    """A TPM that answers half a response (no real one does that on demand, so a socket
    stands in for it): a clear error, and no TPM code that could pass for a known answer."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(bytes.fromhex("8001 00000040 00000000") + b"short")

    th = threading.Thread(target=answer, daemon=True)
    th.start()
    with srv, pytest.raises(tpm.TpmError, match="response says 64 bytes, 15 came") as e:
        tpm.WireTpm(f"swtpm:port={port}").pcr_read(15)
    th.join(5)
    assert e.value.code is None


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
    """The frozen agent in a guest, through the kernel's TPM driver (/dev/tpmrm0) and the
    agent's own TPM client: PCR 15 as sysfs shows it equals the extend computed here; the NV counter
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
