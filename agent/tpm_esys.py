"""The TPM through Debian's TSS libraries (tpm2-tss ESAPI, ``libtss2-esys``) via ctypes.

The same stack tpm2-tools is built on, without tpm2-tools: the multi-call ``tpm2`` binary
links libcurl-gnutls and with it ~13 MB of libraries (4.3 MB zstd) the miniroot would carry
for five commands; ESAPI, ``libtss2-tctildr`` and one TCTI are 1.1 MB (0.24 MB zstd). Commands are
marshalled by libtss2-mu, sessions and responses checked by ESAPI; only the handful of
structures the calls take are declared here, with the TSS ABI sizes (TPM2_NUM_PCR_BANKS 16,
TPMU_HA 64 bytes, TPM2_MAX_NV_BUFFER_SIZE 2048).

Owner-hierarchy commands use a password session with the owner's (usually empty) auth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

ESYS_TR_NONE = 0xFFF
ESYS_TR_PASSWORD = 0x0FF
ESYS_TR_RH_OWNER = 0x101
TPM2_ALG_SHA256 = 0x000B

# TPMA_NV bits (TPM 2.0 part 2, table 204).
NV_OWNERWRITE = 0x2
NV_AUTHWRITE = 0x4
NV_TPM_NT_COUNTER = 0x1 << 4
NV_WRITEDEFINE = 0x2000
NV_OWNERREAD = 0x20000
NV_AUTHREAD = 0x40000
NV_WRITTEN = 0x20000000

u8, u16, u32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32


class TPM2B_DIGEST(ctypes.Structure):
    _fields_ = [("size", u16), ("buffer", u8 * 64)]


class TPMS_PCR_SELECTION(ctypes.Structure):
    _fields_ = [("hash", u16), ("sizeofSelect", u8), ("pcrSelect", u8 * 4)]


class TPML_PCR_SELECTION(ctypes.Structure):
    _fields_ = [("count", u32), ("pcrSelections", TPMS_PCR_SELECTION * 16)]


class TPML_DIGEST(ctypes.Structure):
    _fields_ = [("count", u32), ("digests", TPM2B_DIGEST * 8)]


class TPMT_HA(ctypes.Structure):
    _fields_ = [("hashAlg", u16), ("digest", u8 * 64)]


class TPML_DIGEST_VALUES(ctypes.Structure):
    _fields_ = [("count", u32), ("digests", TPMT_HA * 16)]


class TPMS_NV_PUBLIC(ctypes.Structure):
    _fields_ = [
        ("nvIndex", u32),
        ("nameAlg", u16),
        ("attributes", u32),
        ("authPolicy", TPM2B_DIGEST),
        ("dataSize", u16),
    ]


class TPM2B_NV_PUBLIC(ctypes.Structure):
    _fields_ = [("size", u16), ("nvPublic", TPMS_NV_PUBLIC)]


class TPM2B_MAX_NV_BUFFER(ctypes.Structure):
    _fields_ = [("size", u16), ("buffer", u8 * 2048)]


class EsysError(Exception):
    def __init__(self, call: str, rc: int) -> None:
        super().__init__(f"{call} failed: TSS2 rc {rc:#x}")
        self.call = call
        self.rc = rc

    @property
    def tpm_rc(self) -> int | None:
        """The TPM's own response code (TSS layer 0), else None; parameter/handle numbers masked."""
        if self.rc >> 16:
            return None
        return self.rc & 0xBF if self.rc & 0x80 else self.rc


def _load(soname: str, short: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(soname)
    except OSError:
        found = ctypes.util.find_library(short)
        if found is None:
            raise
        return ctypes.CDLL(found)


_libs: tuple[ctypes.CDLL, ctypes.CDLL] | None = None


def libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(esys, tctildr); raises OSError if Debian's libtss2-esys / libtss2-tctildr are missing."""
    global _libs
    if _libs is None:
        # The TSS logs every TPM error to stderr; "no such NV index" is an expected answer
        # here, and the agent reports what matters itself.
        os.environ.setdefault("TSS2_LOG", "all+none")
        _libs = (_load("libtss2-esys.so.0", "tss2-esys"), _load("libtss2-tctildr.so.0", "tss2-tctildr"))
    return _libs


class Esys:
    """One ESAPI context on a TCTI (``device:/dev/tpmrm0``, ``swtpm:port=2321``, ...)."""

    def __init__(self, tcti: str) -> None:
        self.esys, self.ldr = libraries()
        self.tcti = ctypes.c_void_p()
        self.ctx = ctypes.c_void_p()
        self._check(
            "Tss2_TctiLdr_Initialize",
            self.ldr.Tss2_TctiLdr_Initialize(tcti.encode(), ctypes.byref(self.tcti)),
        )
        try:
            self._check("Esys_Initialize", self.esys.Esys_Initialize(ctypes.byref(self.ctx), self.tcti, None))
        except EsysError:
            self.ldr.Tss2_TctiLdr_Finalize(ctypes.byref(self.tcti))
            raise

    def close(self) -> None:
        if self.ctx:
            self.esys.Esys_Finalize(ctypes.byref(self.ctx))
        if self.tcti:
            self.ldr.Tss2_TctiLdr_Finalize(ctypes.byref(self.tcti))

    @staticmethod
    def _check(call: str, rc: int) -> None:
        if rc & 0xFFFFFFFF:
            raise EsysError(call, rc & 0xFFFFFFFF)

    def call(self, name: str, *args: Any) -> None:
        fn: Callable[..., int] = getattr(self.esys, name)
        self._check(name, fn(self.ctx, *args))

    def pcr_read(self, pcr: int) -> bytes:
        sel = TPML_PCR_SELECTION(count=1)
        sel.pcrSelections[0].hash = TPM2_ALG_SHA256
        sel.pcrSelections[0].sizeofSelect = 3
        sel.pcrSelections[0].pcrSelect[pcr // 8] = 1 << (pcr % 8)
        counter = u32()
        sel_out = ctypes.POINTER(TPML_PCR_SELECTION)()
        values = ctypes.POINTER(TPML_DIGEST)()
        self.call(
            "Esys_PCR_Read",
            u32(ESYS_TR_NONE),
            u32(ESYS_TR_NONE),
            u32(ESYS_TR_NONE),
            ctypes.byref(sel),
            ctypes.byref(counter),
            ctypes.byref(sel_out),
            ctypes.byref(values),
        )
        try:
            if values.contents.count != 1:
                raise EsysError("Esys_PCR_Read (no SHA-256 bank?)", 0)
            d = values.contents.digests[0]
            return bytes(d.buffer[: d.size])
        finally:
            self.esys.Esys_Free(sel_out)
            self.esys.Esys_Free(values)

    def pcr_extend(self, pcr: int, digest: bytes) -> None:
        vals = TPML_DIGEST_VALUES(count=1)
        vals.digests[0].hashAlg = TPM2_ALG_SHA256
        ctypes.memmove(vals.digests[0].digest, digest, len(digest))
        self.call(
            "Esys_PCR_Extend",
            u32(pcr),
            u32(ESYS_TR_PASSWORD),
            u32(ESYS_TR_NONE),
            u32(ESYS_TR_NONE),
            ctypes.byref(vals),
        )

    @contextmanager
    def nv(self, index: int) -> Iterator[ctypes.c_uint32]:
        tr = u32()
        self.call(
            "Esys_TR_FromTPMPublic",
            u32(index),
            u32(ESYS_TR_NONE),
            u32(ESYS_TR_NONE),
            u32(ESYS_TR_NONE),
            ctypes.byref(tr),
        )
        try:
            yield tr
        finally:
            self.esys.Esys_TR_Close(self.ctx, ctypes.byref(tr))

    def _owner(self, name: str, tr: ctypes.c_uint32, *extra: Any) -> None:
        self.call(
            name,
            u32(ESYS_TR_RH_OWNER),
            tr,
            u32(ESYS_TR_PASSWORD),
            u32(ESYS_TR_NONE),
            u32(ESYS_TR_NONE),
            *extra,
        )

    def nv_define(self, index: int, size: int, attributes: int) -> None:
        pub = TPM2B_NV_PUBLIC()
        pub.nvPublic.nvIndex = index
        pub.nvPublic.nameAlg = TPM2_ALG_SHA256
        pub.nvPublic.attributes = attributes
        pub.nvPublic.dataSize = size
        pub.size = 4 + 2 + 4 + 2 + 2  # as marshalled, with an empty policy
        auth = TPM2B_DIGEST()
        tr = u32()
        self.call(
            "Esys_NV_DefineSpace",
            u32(ESYS_TR_RH_OWNER),
            u32(ESYS_TR_PASSWORD),
            u32(ESYS_TR_NONE),
            u32(ESYS_TR_NONE),
            ctypes.byref(auth),
            ctypes.byref(pub),
            ctypes.byref(tr),
        )
        self.esys.Esys_TR_Close(self.ctx, ctypes.byref(tr))

    def nv_read(self, index: int) -> bytes:
        with self.nv(index) as tr:
            pub = ctypes.POINTER(TPM2B_NV_PUBLIC)()
            name = ctypes.c_void_p()
            self.call(
                "Esys_NV_ReadPublic",
                tr,
                u32(ESYS_TR_NONE),
                u32(ESYS_TR_NONE),
                u32(ESYS_TR_NONE),
                ctypes.byref(pub),
                ctypes.byref(name),
            )
            size = pub.contents.nvPublic.dataSize
            self.esys.Esys_Free(pub)
            self.esys.Esys_Free(name)
            data = ctypes.POINTER(TPM2B_MAX_NV_BUFFER)()
            self._owner("Esys_NV_Read", tr, u16(size), u16(0), ctypes.byref(data))
            try:
                return bytes(data.contents.buffer[: data.contents.size])
            finally:
                self.esys.Esys_Free(data)

    def nv_increment(self, index: int) -> None:
        with self.nv(index) as tr:
            self._owner("Esys_NV_Increment", tr)

    def nv_write(self, index: int, data: bytes) -> None:
        buf = TPM2B_MAX_NV_BUFFER(size=len(data))
        ctypes.memmove(buf.buffer, data, len(data))
        with self.nv(index) as tr:
            self._owner("Esys_NV_Write", tr, ctypes.byref(buf), u16(0))

    def nv_writelock(self, index: int) -> None:
        with self.nv(index) as tr:
            self._owner("Esys_NV_WriteLock", tr)

    def nv_undefine(self, index: int) -> None:
        with self.nv(index) as tr:
            self.call(
                "Esys_NV_UndefineSpace",
                u32(ESYS_TR_RH_OWNER),
                tr,
                u32(ESYS_TR_PASSWORD),
                u32(ESYS_TR_NONE),
                u32(ESYS_TR_NONE),
            )
            tr.value = ESYS_TR_NONE  # undefining closed it
