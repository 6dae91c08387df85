"""A TPM 2.0 command client in pure Python: the few commands the agent sends, marshalled here.

The miniroot used to carry Debian's tpm2-tss (ESAPI, marshalling, TCTI loader and device
TCTI: 0.26 MB zstd) for nine commands. Their layouts are short and fixed (TPM 2.0 Library,
Part 3), big-endian, so ``struct`` does it: a 10-byte header (tag, size, command code),
the handles, for authorized commands a password session (``TPM_RS_PW`` with the owner's
empty auth, so no HMAC, nonce or object names are needed), then the parameters. The
response has the same header; a non-zero response code becomes ``WireError`` carrying it.

Transports: the kernel's character device (``device:/dev/tpmrm0``; one ``write`` is one
command, one ``read`` one response) and swtpm's TCP data channel (``swtpm:port=2321``),
which carries the same bytes, and is how the host tests reach a software TPM. The
``tcti`` strings are tpm2-tools', so ``TPM2TOOLS_TCTI`` means the same TPM to both.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

TIMEOUT = 20.0
MAX_RESPONSE = 4096  # the kernel's TPM_BUFSIZE: no response is longer

TPM_ST_NO_SESSIONS = 0x8001
TPM_ST_SESSIONS = 0x8002
TPM_RS_PW = 0x40000009
TPM_RH_OWNER = 0x40000001
TPM_ALG_SHA256 = 0x000B

CC_NV_UNDEFINE_SPACE = 0x122
CC_NV_DEFINE_SPACE = 0x12A
CC_NV_INCREMENT = 0x134
CC_NV_WRITE = 0x137
CC_NV_WRITE_LOCK = 0x138
CC_NV_READ = 0x14E
CC_NV_READ_PUBLIC = 0x169
CC_PCR_READ = 0x17E
CC_PCR_EXTEND = 0x182

# TPMA_NV bits (TPM 2.0 part 2, table 204).
NV_OWNERWRITE = 0x2
NV_AUTHWRITE = 0x4
NV_TPM_NT_COUNTER = 0x1 << 4
NV_WRITEDEFINE = 0x2000
NV_OWNERREAD = 0x20000
NV_AUTHREAD = 0x40000
NV_WRITTEN = 0x20000000

# Warnings after which the same command succeeds later (part 2, table 16); ESAPI resubmits too.
RC_RETRY = 0x922
RC_YIELDED = 0x908
RC_TESTING = 0x90A
_RETRIES = 5

# Names of the codes a user may meet here (masked as ``WireError.tpm_rc``), for the console line.
RC_NAMES = {
    0x08B: "TPM_RC_HANDLE",
    0x08E: "TPM_RC_AUTH_FAIL",
    0x100: "TPM_RC_INITIALIZE",
    0x101: "TPM_RC_FAILURE",
    0x146: "TPM_RC_NV_RANGE",
    0x147: "TPM_RC_NV_SIZE",
    0x148: "TPM_RC_NV_LOCKED",
    0x149: "TPM_RC_NV_AUTHORIZATION",
    0x14A: "TPM_RC_NV_UNINITIALIZED",
    0x14B: "TPM_RC_NV_SPACE",
    0x14C: "TPM_RC_NV_DEFINED",
    0x921: "TPM_RC_LOCKOUT",
    0x922: "TPM_RC_RETRY",
}

# The password session with an empty auth: handle, nonce (empty), attributes
# (continueSession, which a password session ignores), hmac = the auth value (empty).
_PW_SESSION = struct.pack(">IHBH", TPM_RS_PW, 0, 1, 0)


def mask_rc(rc: int) -> int:
    """A format-1 response code without its handle/parameter/session number (part 2, 6.6)."""
    return rc & 0xBF if rc & 0x80 else rc


class WireError(Exception):
    """A command the TPM refused (``rc`` is its response code) or did not answer (``rc`` None)."""

    def __init__(self, call: str, rc: int | None, detail: str = "") -> None:
        self.call = call
        self.rc = rc
        if not detail and rc is not None:
            name = RC_NAMES.get(self.tpm_rc or -1)
            detail = f"TPM rc {rc:#x}" + (f" ({name})" if name else "")
        super().__init__(f"{call}: {detail or 'no answer'}")

    @property
    def tpm_rc(self) -> int | None:
        """The response code with handle/parameter/session numbers masked (format 1), else as sent."""
        if self.rc is None or self.rc >> 16:
            return None
        return mask_rc(self.rc)


class Transport(Protocol):
    def transact(self, command: bytes) -> bytes: ...
    def close(self) -> None: ...


class DeviceTransport:
    """The kernel's TPM character device: /dev/tpmrm0 (the kernel's resource manager) or /dev/tpm0."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def transact(self, command: bytes) -> bytes:
        os.write(self.fd, command)
        return os.read(self.fd, MAX_RESPONSE)

    def close(self) -> None:
        os.close(self.fd)


class SocketTransport:
    """swtpm's data channel (``--server type=tcp``): the plain command and response bytes."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    def transact(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        head = self._recv(10)
        if len(head) < 10:
            return head
        (size,) = struct.unpack_from(">I", head, 2)
        return head + self._recv(min(size, MAX_RESPONSE) - 10)

    def close(self) -> None:
        self.sock.close()


def open_transport(tcti: str) -> Transport:
    """``device[:PATH]`` (default /dev/tpmrm0, else /dev/tpm0) or ``swtpm[:host=H,port=P]``."""
    kind, _, conf = tcti.partition(":")
    if kind == "device":
        if conf:
            return DeviceTransport(conf)
        try:
            return DeviceTransport("/dev/tpmrm0")
        except FileNotFoundError:
            return DeviceTransport("/dev/tpm0")
    if kind == "swtpm":
        opts = dict(kv.partition("=")[::2] for kv in conf.split(",") if kv)
        return SocketTransport(opts.get("host", "127.0.0.1"), int(opts.get("port", "2321")))
    raise ValueError(f"unsupported TPM transport {tcti!r} (device:PATH or swtpm:port=N)")


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


@dataclass(frozen=True)
class NvPublic:
    index: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    data_size: int

    def marshal(self) -> bytes:
        """TPMS_NV_PUBLIC as the TPM marshals it."""
        return (
            struct.pack(">IHI", self.index, self.name_alg, self.attributes)
            + tpm2b(self.auth_policy)
            + struct.pack(">H", self.data_size)
        )

    @property
    def name(self) -> bytes:
        """The index's TPM name: nameAlg || H(TPMS_NV_PUBLIC) (part 1, "Names")."""
        if self.name_alg != TPM_ALG_SHA256:
            raise WireError("NV name", None, f"index {self.index:#x} uses name algorithm {self.name_alg:#x}")
        return struct.pack(">H", self.name_alg) + hashlib.sha256(self.marshal()).digest()


class Reader:
    """Unmarshals a response's parameters; running past the end is a malformed response."""

    def __init__(self, call: str, data: bytes) -> None:
        self.call = call
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise WireError(self.call, None, f"response truncated ({len(self.data)} bytes)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def tpm2b(self) -> bytes:
        return self.take(self.u16())


class Wire:
    """One connection to the TPM (``device:/dev/tpmrm0``, ``swtpm:port=2321``); the method
    set of the ESAPI wrapper it replaces."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        try:
            self.transport = open_transport(tcti)
        except OSError as e:
            raise WireError("open", None, f"{e.strerror or e}") from e
        except ValueError as e:
            raise WireError("open", None, str(e)) from e

    def close(self) -> None:
        self.transport.close()

    def command(
        self, call: str, code: int, handles: tuple[int, ...] = (), params: bytes = b"", auth: bool = False
    ) -> Reader:
        """Send one command and return a reader on the response parameters."""
        body = struct.pack(f">{len(handles)}I", *handles)
        if auth:
            body += struct.pack(">I", len(_PW_SESSION)) + _PW_SESSION
        body += params
        tag = TPM_ST_SESSIONS if auth else TPM_ST_NO_SESSIONS
        cmd = struct.pack(">HII", tag, 10 + len(body), code) + body
        for attempt in range(_RETRIES):
            try:
                resp = self.transport.transact(cmd)
            except OSError as e:
                raise WireError(call, None, f"{e.strerror or e}") from e
            if len(resp) < 10:
                raise WireError(call, None, f"response of {len(resp)} bytes")
            rtag, size, rc = struct.unpack_from(">HII", resp)
            if size != len(resp):
                raise WireError(call, None, f"response says {size} bytes, {len(resp)} came")
            if rc not in (RC_RETRY, RC_YIELDED, RC_TESTING):
                break
            log.info("%s: TPM answered %#x, retrying", call, rc)
            time.sleep(0.05 * (attempt + 1))
        if rc:
            raise WireError(call, rc)
        r = Reader(call, resp[10:])
        if rtag == TPM_ST_SESSIONS:
            # None of these commands returns a handle; the parameters are sized, the
            # session area after them (nonce, attributes, empty hmac) is not needed.
            r = Reader(call, r.take(r.u32()))
        return r

    def pcr_read(self, pcr: int) -> bytes:
        select = bytearray(3)
        select[pcr // 8] = 1 << (pcr % 8)
        params = struct.pack(">IHB", 1, TPM_ALG_SHA256, 3) + select
        r = self.command("TPM2_PCR_Read", CC_PCR_READ, params=params)
        r.u32()  # pcrUpdateCounter
        for _ in range(r.u32()):  # the selection the TPM honoured
            r.u16()
            r.take(r.u8())
        count = r.u32()
        if count != 1:
            raise WireError("TPM2_PCR_Read", None, f"{count} digests (no SHA-256 bank?)")
        return r.tpm2b()

    def pcr_extend(self, pcr: int, digest: bytes) -> None:
        params = struct.pack(">IH", 1, TPM_ALG_SHA256) + digest
        self.command("TPM2_PCR_Extend", CC_PCR_EXTEND, (pcr,), params, auth=True)

    def nv_read_public(self, index: int) -> NvPublic:
        r = self.command("TPM2_NV_ReadPublic", CC_NV_READ_PUBLIC, (index,))
        p = Reader("TPM2_NV_ReadPublic", r.tpm2b())
        pub = NvPublic(p.u32(), p.u16(), p.u32(), p.tpm2b(), p.u16())
        name = r.tpm2b()
        if pub.index != index or name != pub.name:
            raise WireError("TPM2_NV_ReadPublic", None, f"index {index:#x}: public area and name disagree")
        return pub

    def nv_define(self, index: int, size: int, attributes: int) -> None:
        pub = NvPublic(index, TPM_ALG_SHA256, attributes, b"", size)
        params = tpm2b(b"") + tpm2b(pub.marshal())
        self.command("TPM2_NV_DefineSpace", CC_NV_DEFINE_SPACE, (TPM_RH_OWNER,), params, auth=True)

    def nv_read(self, index: int) -> bytes:
        size = self.nv_read_public(index).data_size
        params = struct.pack(">HH", size, 0)
        r = self.command("TPM2_NV_Read", CC_NV_READ, (TPM_RH_OWNER, index), params, auth=True)
        return r.tpm2b()

    def nv_increment(self, index: int) -> None:
        self.command("TPM2_NV_Increment", CC_NV_INCREMENT, (TPM_RH_OWNER, index), auth=True)

    def nv_write(self, index: int, data: bytes) -> None:
        params = tpm2b(data) + struct.pack(">H", 0)
        self.command("TPM2_NV_Write", CC_NV_WRITE, (TPM_RH_OWNER, index), params, auth=True)

    def nv_writelock(self, index: int) -> None:
        self.command("TPM2_NV_WriteLock", CC_NV_WRITE_LOCK, (TPM_RH_OWNER, index), auth=True)

    def nv_undefine(self, index: int) -> None:
        self.command("TPM2_NV_UndefineSpace", CC_NV_UNDEFINE_SPACE, (TPM_RH_OWNER, index), auth=True)
