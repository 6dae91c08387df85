"""The agent's DHCP client against a real server: dnsmasq in one network namespace, the client
in another, a veth pair between them (QEMU's slirp server answers it in the boot tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from seedboot.agent import dhcp

pytestmark = pytest.mark.root


@dataclass
class Net:
    client: str  # the client's namespace
    server: str
    leases: Path


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def ns(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True, text=True, check=False)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    tag = uuid.uuid4().hex[:6]
    cli, srv = f"sbc{tag}", f"sbs{tag}"
    run("ip", "netns", "add", cli)
    run("ip", "netns", "add", srv)
    dns: subprocess.Popen[bytes] | None = None
    try:
        # eth0 answered by dnsmasq; eth1 on a wire with nobody at the other end
        run("ip", "link", "add", "eth0", "netns", cli, "type", "veth", "peer", "name", "srv0", "netns", srv)
        run("ip", "link", "add", "eth1", "netns", cli, "type", "veth", "peer", "name", "dead1", "netns", srv)
        for name, link in ((cli, "eth0"), (cli, "eth1"), (cli, "lo"), (srv, "srv0"), (srv, "dead1")):
            run("ip", "-n", name, "link", "set", link, "up")
        run("ip", "-n", srv, "addr", "add", "192.0.2.1/24", "dev", "srv0")
        leases = tmp_path / "dnsmasq.leases"
        server = [
            *("dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--no-ping"),
            *("--interface=srv0", "--bind-interfaces", f"--dhcp-leasefile={leases}", "--pid-file="),
            *("--dhcp-range=192.0.2.50,192.0.2.60,255.255.255.0,1h", "--dhcp-authoritative"),
            *("--dhcp-option=option:router,192.0.2.1", "--dhcp-option=option:dns-server,192.0.2.53"),
            "--domain=seed.test",
        ]
        dns = subprocess.Popen(
            ["ip", "netns", "exec", srv, *server],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.3)
        assert dns.poll() is None, dns.stderr.read() if dns.stderr else ""
        yield Net(cli, srv, leases)
    finally:
        if dns is not None:
            dns.terminate()
            dns.wait()
        for name in (cli, srv):
            subprocess.run(["ip", "netns", "del", name], check=False)


CLIENT = textwrap.dedent(
    """
    import dataclasses, json, sys, time
    from seedboot.agent import dhcp
    ifaces, wait = sys.argv[1].split(","), float(sys.argv[2])
    t0 = time.monotonic()
    try:
        out = dataclasses.asdict(dhcp.acquire(ifaces, wait))
    except dhcp.NoAnswer as e:
        out = {"error": str(e)}
    out["took"] = time.monotonic() - t0
    print(json.dumps(out))
    """
)


def acquire(net: Net, ifaces: str, wait: float) -> dict[str, object]:
    p = ns(net.client, sys.executable, "-c", CLIENT, ifaces, str(wait))
    assert p.returncode == 0, p.stderr
    out: dict[str, object] = json.loads(p.stdout)
    return out


def test_lease_from_dnsmasq_on_the_nic_that_answers(net: Net) -> None:
    lease = acquire(net, "eth1,eth0", 10)
    assert lease["iface"] == "eth0"
    assert isinstance(lease["address"], str) and lease["address"].startswith("192.0.2.")
    assert 50 <= int(lease["address"].rsplit(".", 1)[1]) <= 60
    assert (lease["prefix"], lease["routers"], lease["dns"]) == (24, ["192.0.2.1"], ["192.0.2.53"])
    assert (lease["domain"], lease["seconds"], lease["server"]) == ("seed.test", 3600, "192.0.2.1")
    # the server recorded the same lease for this client's MAC
    mac = ns(net.client, "cat", "/sys/class/net/eth0/address").stdout.strip()
    assert f"{mac} {lease['address']}" in net.leases.read_text()


def test_no_server_is_a_bounded_wait_with_the_interfaces_named(net: Net) -> None:
    out = acquire(net, "eth1", 3)
    assert out["error"] == "no DHCP answer on eth1 after 3s"
    assert 3 <= float(str(out["took"])) < 3 + 10  # the whole wait, and then an end


def test_a_link_down_at_first_is_asked_again_once_it_is_up(net: Net) -> None:
    run("ip", "-n", net.client, "link", "set", "eth0", "down")
    client = subprocess.Popen(
        ["ip", "netns", "exec", net.client, sys.executable, "-c", CLIENT, "eth0", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)  # its first DISCOVER cannot leave (ENETDOWN)
    run("ip", "-n", net.client, "link", "set", "eth0", "up")
    out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err
    lease = json.loads(out)
    assert lease["iface"] == "eth0" and str(lease["address"]).startswith("192.0.2.")
    assert "DHCP send failed" in err  # the failed send was said, and retried


def test_packets_round_trip_through_the_parser() -> None:
    mac = bytes.fromhex("525400123456")
    msg = dhcp.message(dhcp.DISCOVER, 0x1234ABCD, mac, {dhcp.OPT_PARAMS: dhcp.PARAMS})
    assert len(msg) == 300
    packet = dhcp.udp_packet(msg)
    assert dhcp._checksum(packet[:20]) == 0  # a valid IPv4 header checksums to zero
    assert dhcp.udp_payload(packet, port=dhcp.SERVER_PORT) == msg
    assert dhcp.udp_payload(packet) is None  # not for the client's port
    # a server's answer is the same layout with op 2
    reply = dhcp.parse(b"\x02" + msg[1:])
    assert reply is not None and (reply.kind, reply.xid, reply.chaddr) == (dhcp.DISCOVER, 0x1234ABCD, mac)
    assert dhcp.parse(msg) is None  # a request is not a reply
    assert dhcp.parse(b"\x02" + msg[1:100]) is None  # truncated
    xids = {dhcp.transaction_id(mac) for _ in range(4)}
    assert len(xids) == 4 and all(0 <= x < 2**32 for x in xids)
