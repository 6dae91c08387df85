"""The network stage's link, address and route, set through rtnetlink in a real network
namespace (a veth pair), and read back with ip(8) as a user would check them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from seedboot.agent import netlink

# Runs in a fresh network namespace (unshare -n), so the host's network is never touched.
SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    from seedboot.agent.errors import SeedError
    from seedboot.agent.stages import NetInfo, network

    # only the network is this process's own (unshare -n): /etc is the host's
    network.RESOLV_CONF = sys.argv[1]

    def ip(*args):
        p = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
        return json.loads(p.stdout)

    subprocess.run(["ip", "link", "add", "eth7", "type", "veth", "peer", "name", "peer7"], check=True)
    subprocess.run(["ip", "link", "set", "peer7", "up"], check=True)
    out = {}
    network.link_up(["eth7"])
    net = NetInfo("eth7", "192.0.2.15/24", "192.0.2.1", ["192.0.2.53"], "DHCP")
    network.configure(net)
    out["links"] = {l["ifname"]: l["flags"] for l in ip("link", "show")}
    out["addr"] = ip("-4", "addr", "show", "eth7")[0]["addr_info"]
    out["routes"] = ip("-4", "route", "show", "default")
    network.configure(net)  # again: what is there already stays, no error
    out["addr_again"] = ip("-4", "addr", "show", "eth7")[0]["addr_info"]
    errors = []
    for call in (
        lambda: network.link_up(["eth9"]),
        lambda: network.configure(NetInfo("eth9", "192.0.2.15/24", None, [], "static")),
        lambda: network.configure(NetInfo("eth7", "198.51.100.7/24", "203.0.113.1", [], "static")),
    ):
        try:
            call()
            errors.append("")
        except SeedError as e:
            errors.append(e.message)
    out["errors"] = errors
    print(json.dumps(out))
    """
)


def test_masks_and_addresses_as_a_lease_gives_them() -> None:
    masks = ("255.255.255.0", "255.255.252.0", "255.255.255.255", "0.0.0.0")
    assert [netlink.prefix_len(m) for m in masks] == [24, 22, 32, 0]
    assert netlink.ip4("10.0.2.15") == bytes([10, 0, 2, 15])
    for bad in ("255.0.255.0", "255.255.255", "0.0.0.256"):
        with pytest.raises(ValueError):
            netlink.prefix_len(bad)
    for bad in ("10.0.2", "10.0.2.15/24", "", "::1"):
        with pytest.raises(ValueError):
            netlink.ip4(bad)


@pytest.mark.root
def test_link_address_and_default_route_as_ip_shows_them(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    host_resolv = Path("/etc/resolv.conf").read_bytes()
    argv = ["unshare", "-n", sys.executable, "-c", SCRIPT, str(resolv)]
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert Path("/etc/resolv.conf").read_bytes() == host_resolv
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert "UP" in out["links"]["lo"] and "UP" in out["links"]["eth7"]
    (addr,) = out["addr"]
    assert (addr["local"], addr["prefixlen"], addr["broadcast"]) == ("192.0.2.15", 24, "192.0.2.255")
    (route,) = out["routes"]
    assert (route["gateway"], route["dev"]) == ("192.0.2.1", "eth7")
    assert out["addr_again"] == out["addr"]
    assert resolv.read_text().splitlines()[1:] == ["nameserver 192.0.2.53"]
    link, addr_err, route_err = out["errors"]
    assert link == "configuring the network: setting eth9 up failed: no network interface eth9"
    assert addr_err == (
        "configuring the network: address 192.0.2.15/24 on eth9 failed: no network interface eth9"
    )
    assert route_err == (
        "configuring the network: default route via 203.0.113.1 dev eth7 failed: Network is unreachable"
    )
