"""The kernel command line parser: what each option means, and clear errors for bad values."""

from __future__ import annotations

import pytest

from seedboot.agent.cmdline import Cmdline, IpConfig, StaticIP, parse, split
from seedboot.agent.errors import SeedError

DEBIAN = "BOOT_IMAGE=/vmlinuz root=/dev/ram0 console=ttyS0 quiet"


def test_defaults_when_nothing_is_given() -> None:
    c = parse(DEBIAN)
    assert c == Cmdline(raw=DEBIAN)
    assert c.cache == "LABEL=KNXBLOCK"
    assert (c.overlay, c.prefetch, c.rescue) == ("tmpfs", "profile", "shell")
    assert c.ip == IpConfig("dhcp")
    assert not c.offline and not c.record and c.version is None


@pytest.mark.parametrize(
    ("text", "field", "want"),
    [
        ("seed.mirrors=http://a/m,https://b:8080/x/", "mirrors", ("http://a/m", "https://b:8080/x")),
        ("seed.mirrors=http://a,,http://a/", "mirrors", ("http://a",)),
        ("seed.name=demo", "name", "demo"),
        ("seed.version=7", "version", 7),
        ("seed.version=latest", "version", None),
        ("seed.cache=/dev/vdb1", "cache", "/dev/vdb1"),
        ("seed.cache=UUID=0a1b-2c", "cache", "UUID=0a1b-2c"),
        ("seed.cache=LABEL=MYCACHE", "cache", "LABEL=MYCACHE"),
        ("seed.overlay=persist", "overlay", "persist"),
        ("seed.offline", "offline", True),
        ("seed.offline=0", "offline", False),
        ("seed.prefetch=all", "prefetch", "all"),
        ("seed.prefetch=off", "prefetch", "off"),
        ("seed.conns=16", "conns", 16),
        ("seed.record", "record", True),
        ("seed.rescue=reboot", "rescue", "reboot"),
        ("seed.copy=off", "copy", False),
        ("seed.copy=on", "copy", True),
        ("seed.debug", "debug", True),
        ("rd.seed.break=trust", "break_before", "trust"),
        ("init=/bin/sh", "init", "/bin/sh"),
        ("ip=off", "ip", IpConfig("off")),
        ("ip=on", "ip", IpConfig("dhcp")),
        ("ip=eth1:dhcp", "ip", IpConfig("dhcp", device="eth1")),
        ("ip=:::::eth2:dhcp", "ip", IpConfig("dhcp", device="eth2")),
        (
            "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off",
            "ip",
            IpConfig("static", "eth0", StaticIP("10.0.2.15", 24, "10.0.2.2", "eth0")),
        ),
        (
            "ip=192.168.1.9/16::192.168.0.1::box:eth0:none:1.1.1.1:8.8.8.8",
            "ip",
            IpConfig(
                "static",
                "eth0",
                StaticIP("192.168.1.9", 16, "192.168.0.1", "eth0", "box", ("1.1.1.1", "8.8.8.8")),
            ),
        ),
        ('"seed.mirrors=http://a/x" quiet', "mirrors", ("http://a/x",)),
        ('seed.name="demo"', "name", "demo"),
    ],
)
def test_option(text: str, field: str, want: object) -> None:
    assert getattr(parse(f"{DEBIAN} {text}"), field) == want


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("seed.mirrors=ftp://a", "http:// or https://"),
        ("seed.mirrors=,", "at least one"),
        ("seed.mirrors=", "needs a value"),
        ("seed.version=0", "version number"),
        ("seed.version=v2", "version number"),
        ("seed.cache=vdb1", "LABEL=NAME"),
        ("seed.cache=LABEL=", "LABEL=NAME"),
        ("seed.overlay=disk", "tmpfs or persist"),
        ("seed.prefetch=some", "profile or all or off"),
        ("seed.conns=0", "1 to 256"),
        ("seed.conns=1000", "1 to 256"),
        ("seed.rescue=halt", "shell or reboot"),
        ("seed.copy=no", "on or off"),
        ("rd.seed.break=pivot", "early, hardware"),
        ("seed.ofline", "unknown kernel option 'seed.ofline'"),
        ("seed.offline=maybe", "a flag"),
        ("seed.name=../etc", "invalid image name"),
        ("ip=10.0.2.15", "expected dhcp"),
        ("ip=10.0.2.300::::::off", "not an IPv4 address"),
        ("ip=10.0.2.15::10.0.2.2:255.0.255.0::eth0:off", "not a netmask"),
        ("ip=10.0.2.15::::::carrier", "autoconf"),
        ('seed.name="demo', "unclosed double quote"),
    ],
)
def test_bad_value_names_the_option(text: str, says: str) -> None:
    with pytest.raises(SeedError) as e:
        parse(f"{DEBIAN} {text}")
    assert says in str(e.value)
    assert e.value.hint


def test_split_keeps_quoted_spaces() -> None:
    assert split('a "b c" d="e f"  ') == ["a", "b c", "d=e f"]
