"""Stage 3: the network. DHCP on every NIC with carrier (first lease wins), or the kernel's ``ip=``.

DHCP is the agent's own client (agent/dhcp.py), on all the interfaces at once; the agent
configures the winner itself (agent/netlink.py), so a second answer on another NIC changes
nothing. The lease is not renewed by the agent: the booted OS runs its own network
configuration (the address stays until it does).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from seedboot.agent import netlink
from seedboot.agent.cmdline import StaticIP
from seedboot.agent.dhcp import Lease, NoAnswer, acquire
from seedboot.agent.errors import SeedError
from seedboot.agent.stages import Context, NetInfo

log = logging.getLogger(__name__)

CARRIER_WAIT = 5.0
DHCP_WAIT = 20.0
RESOLV_CONF = "/etc/resolv.conf"


def from_lease(lease: Lease) -> NetInfo:
    return NetInfo(
        iface=lease.iface,
        address=f"{lease.address}/{lease.prefix}",
        gateway=lease.routers[0] if lease.routers else None,
        dns=lease.dns,
        how="DHCP",
        lease=lease.seconds,
        hostname=lease.hostname,
        domain=lease.domain,
    )


def resolv_conf(net: NetInfo) -> str:
    lines = [f"# written by seedboot from {net.how} on {net.iface}"]
    if net.domain:
        lines.append(f"search {net.domain}")
    lines += [f"nameserver {d}" for d in net.dns]
    return "\n".join(lines) + "\n"


def carrier(iface: str) -> bool:
    try:
        return Path(f"/sys/class/net/{iface}/carrier").read_text().strip() == "1"
    except OSError:
        return False  # EINVAL while the link is down


def _failed(what: str, e: OSError) -> SeedError:
    return SeedError(f"configuring the network: {what} failed: {e.strerror or e}")


def link_up(ifaces: list[str]) -> None:
    for i in ["lo", *ifaces]:
        try:
            netlink.link_up(i)
        except OSError as e:
            raise _failed(f"setting {i} up", e) from e


def configure(net: NetInfo) -> None:
    try:
        netlink.add_address(net.iface, net.address)
    except OSError as e:
        raise _failed(f"address {net.address} on {net.iface}", e) from e
    if net.gateway:
        try:
            netlink.add_default_route(net.iface, net.gateway)
        except OSError as e:
            raise _failed(f"default route via {net.gateway} dev {net.iface}", e) from e
    with contextlib.suppress(OSError):
        Path(RESOLV_CONF).parent.mkdir(parents=True, exist_ok=True)
        Path(RESOLV_CONF).write_text(resolv_conf(net))


def dhcp(ctx: Context, ifaces: list[str]) -> NetInfo:
    ctx.console.waiting(f"a DHCP answer on {' '.join(ifaces)}", DHCP_WAIT)
    start = time.monotonic()
    try:
        return from_lease(acquire(ifaces, DHCP_WAIT))
    except NoAnswer as e:
        raise SeedError(
            f"no DHCP answer on {' '.join(ifaces)} after {DHCP_WAIT:.0f}s",
            "is the cable in / the virtual NIC attached to a network with DHCP? "
            "Or set a static address: ip=CLIENT::GATEWAY:NETMASK::DEVICE:off",
        ) from e
    except ValueError as e:
        raise SeedError(
            f"DHCP: unusable lease ({e})", "a DHCP server bug? try ip= on the command line"
        ) from e
    except OSError as e:
        raise SeedError(
            f"DHCP on {' '.join(ifaces)}: {e.strerror or e}",
            "set a static address instead: ip=CLIENT::GATEWAY:NETMASK::DEVICE:off",
        ) from e
    finally:
        ctx.timings["wait:dhcp"] = time.monotonic() - start


def static(ctx: Context, s: StaticIP) -> NetInfo:
    dev = s.device or next((n for n in ctx.nics if carrier(n)), ctx.nics[0] if ctx.nics else None)
    if dev is None or dev not in ctx.nics:
        raise SeedError(
            f"ip= names device {dev or '(none)'}, but the NICs are: {' '.join(ctx.nics) or 'none'}",
            "fix the device field of ip=",
        )
    return NetInfo(dev, s.cidr(), s.gateway, list(s.dns), "static", hostname=s.hostname)


def wait_carrier(ctx: Context, ifaces: list[str]) -> list[str]:
    deadline = time.monotonic() + CARRIER_WAIT
    up = [i for i in ifaces if carrier(i)]
    if not up:
        ctx.console.waiting(f"a link (carrier) on {' '.join(ifaces)}", CARRIER_WAIT)
    while not up and time.monotonic() < deadline:
        time.sleep(0.05)
        up = [i for i in ifaces if carrier(i)]
    ctx.timings["wait:carrier"] = CARRIER_WAIT - max(0.0, deadline - time.monotonic())
    return up


def run(ctx: Context) -> str:
    cfg = ctx.cmdline.ip
    if ctx.cmdline.offline and cfg.mode != "static":
        return "skipped: seed.offline"
    if cfg.mode == "off":
        return "skipped: ip=off"
    wanted = [cfg.device] if cfg.device else list(ctx.nics)
    missing = [i for i in wanted if i not in ctx.nics]
    if missing:
        raise SeedError(
            f"ip= names {' '.join(missing)}, but the NICs are: {' '.join(ctx.nics) or 'none'}",
            "fix the device field of ip=",
        )
    link_up(wanted)
    if cfg.mode == "static" and cfg.static is not None:
        net = static(ctx, cfg.static)
    else:
        up = wait_carrier(ctx, wanted)
        # No carrier anywhere: some virtual NICs never report it; ask on all of them.
        net = dhcp(ctx, up or wanted)
    configure(net)
    ctx.net = net
    detail = f"{net.iface} {net.address} via {net.how}"
    if net.gateway:
        detail += f", gateway {net.gateway}"
    if net.lease:
        detail += f" (lease {net.lease}s)"
    return detail
