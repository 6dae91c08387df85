"""Ed25519 verification through OpenSSL's libcrypto (EVP_DigestVerify), loaded with ctypes.

The miniroot already carries libcrypto for curl and hashlib; the ``cryptography`` wheel would
add 3.5 MB (compressed) to the initramfs for this one check. This is OpenSSL's audited
implementation, not hand-written arithmetic. The publisher side signs with ``cryptography``.
"""

from __future__ import annotations

import ctypes
import hashlib
from functools import cache

from seedboot.agent.errors import SeedError

_NID_ED25519 = 1087  # EVP_PKEY_ED25519 in OpenSSL >= 1.1.1


@cache
def _libcrypto() -> ctypes.CDLL:
    # hashlib's OpenSSL backend has usually loaded libcrypto already, so this finds that copy.
    hashlib.sha256()
    # By soname, not ctypes.util.find_library: that imports tempfile, shutil and platform
    # (30-50 ms under emulation, in PID 1 and again in the block daemon).
    for name in ("libcrypto.so.3", "libcrypto.so.1.1"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.EVP_PKEY_new_raw_public_key.restype = ctypes.c_void_p
        lib.EVP_PKEY_new_raw_public_key.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.EVP_PKEY_free.argtypes = [ctypes.c_void_p]
        lib.EVP_MD_CTX_new.restype = ctypes.c_void_p
        lib.EVP_MD_CTX_free.argtypes = [ctypes.c_void_p]
        lib.EVP_DigestVerifyInit.argtypes = [ctypes.c_void_p] * 5
        lib.EVP_DigestVerify.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        return lib
    raise SeedError("OpenSSL's libcrypto was not found", "the agent needs libcrypto.so.3 to check signatures")


def verify(public_key: bytes, sig: bytes, message: bytes) -> bool:
    """True if ``sig`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    if len(public_key) != 32 or len(sig) != 64:
        return False
    lib = _libcrypto()
    pkey = lib.EVP_PKEY_new_raw_public_key(_NID_ED25519, None, public_key, 32)
    if not pkey:
        return False
    ctx = lib.EVP_MD_CTX_new()
    try:
        if lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) != 1:
            return False
        return bool(lib.EVP_DigestVerify(ctx, sig, 64, message, len(message)) == 1)
    finally:
        lib.EVP_MD_CTX_free(ctx)
        lib.EVP_PKEY_free(pkey)
