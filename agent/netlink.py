"""A link up, an IPv4 address and a default route, set through rtnetlink rather than ip(8).

The network stage used to run busybox ``ip`` four times per boot (lo up, the NIC up, the
address, the route): an exec each, 0.07, 0.05, 0.03 and 0.02 s apart on a seed.debug console,
on the path to the first HTTP request. The three requests it needs are fixed-layout messages
(rtnetlink(7)), so they are built here with ``struct``; pyroute2 would do the same at the
price of its import.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFF_UP = 0x1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _request(kind: int, flags: int, body: bytes) -> None:
    """Send one request and wait for the kernel's acknowledgement; an error is an OSError."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as s:
        s.settimeout(5)
        s.bind((0, 0))
        msg = _HEADER.pack(_HEADER.size + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
        s.sendto(msg, (0, 0))
        reply = s.recv(65536)
    _, rtype, _, _, _ = _HEADER.unpack_from(reply)
    if rtype != NLMSG_ERROR:
        raise OSError(errno.EPROTO, f"unexpected netlink reply type {rtype}")
    (code,) = struct.unpack_from("=i", reply, _HEADER.size)
    if code:
        raise OSError(-code, os.strerror(-code))


def _create(kind: int, body: bytes, what: str) -> bool:
    """A new address or route; False (and a log line) if the kernel already had that one."""
    try:
        _request(kind, NLM_F_CREATE | NLM_F_EXCL, body)
    except FileExistsError:
        log.info("%s: already there, kept", what)
        return False
    log.debug("%s", what)
    return True


def ip4(text: str) -> bytes:
    """A dotted-quad IPv4 address, packed; ValueError if it is not one. (Not ``ipaddress``:
    its import is ~20 ms of PID 1's time under emulation, for what this does.)"""
    try:
        return socket.inet_pton(socket.AF_INET, text)
    except OSError:
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def prefix_len(netmask: str) -> int:
    """255.255.255.0 -> 24; ValueError if the mask's ones are not contiguous."""
    n = int.from_bytes(ip4(netmask), "big")
    ones = n.bit_count()
    if n != (0xFFFFFFFF << (32 - ones)) & 0xFFFFFFFF:
        raise ValueError(f"{netmask!r} is not a netmask")
    return ones


def _cidr(cidr: str) -> tuple[bytes, int]:
    address, _, plen = cidr.partition("/")
    if not plen.isdigit() or int(plen) > 32:
        raise ValueError(f"{cidr!r} is not ADDRESS/PREFIX")
    return ip4(address), int(plen)


def _index(iface: str) -> int:
    try:
        return socket.if_nametoindex(iface)
    except OSError as e:
        raise OSError(errno.ENODEV, f"no network interface {iface}") from e


def link_up(iface: str) -> None:
    """``ip link set IFACE up``."""
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, _index(iface), IFF_UP, IFF_UP)  # ifinfomsg
    _request(RTM_NEWLINK, 0, body)
    log.debug("%s up", iface)


def add_address(iface: str, cidr: str) -> bool:
    """``ip addr add CIDR brd + dev IFACE``; False if the interface already had it."""
    addr, plen = _cidr(cidr)
    body = struct.pack("=BBBBI", socket.AF_INET, plen, 0, RT_SCOPE_UNIVERSE, _index(iface))
    body += _attr(IFA_LOCAL, addr) + _attr(IFA_ADDRESS, addr)
    if plen < 31:
        host_bits = (1 << (32 - plen)) - 1
        body += _attr(IFA_BROADCAST, (int.from_bytes(addr, "big") | host_bits).to_bytes(4, "big"))
    return _create(RTM_NEWADDR, body, f"{iface}: address {cidr}")


def add_default_route(iface: str, gateway: str) -> bool:
    """``ip route add default via GATEWAY dev IFACE``; False if a default route was there
    already (it is kept)."""
    gw = ip4(gateway)
    # struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    body = struct.pack(
        "=BBBBBBBBI", socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body += _attr(RTA_GATEWAY, gw) + _attr(RTA_OIF, struct.pack("=I", _index(iface)))
    return _create(RTM_NEWROUTE, body, f"default route via {gateway} dev {iface}")
