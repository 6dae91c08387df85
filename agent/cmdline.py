"""The kernel command line, parsed into what the boot agent was asked to do.

Pure: ``parse(text)`` takes the contents of ``/proc/cmdline`` and either returns a
``Cmdline`` or raises ``SeedError`` naming the bad option and what it accepts. Options the
agent does not know are left to the kernel and the booted OS, except unknown ``seed.*`` and
``rd.seed.*`` options, which are errors: a typo such as ``seed.ofline`` must not silently
boot online.

    seed.mirrors=URL[,URL...]     mirror base URLs (http:// or https://)
    seed.name=NAME                image name
    seed.version=N|latest         a version (also allows booting an older one: rollback)
    seed.cache=DEV|LABEL=L|UUID=U cache partition (default LABEL=KNXBLOCK)
    seed.overlay=tmpfs|persist    where writes to the root go
    seed.offline                  use only what the cache holds
    seed.prefetch=profile|all|off download-ahead
    seed.conns=N                  parallel HTTP transfers (1..256)
    seed.copy=on|off              keep the blocks read, decompressed, on the cache partition and
                                  read them from there next boot, under dm-verity (default on)
    seed.record                   save the block access trace of this boot on the cache
    seed.rescue=shell|reboot      what a failed boot ends in
    seed.debug                    log every decision on the console
    rd.seed.break=STAGE           a shell before STAGE
    ip=dhcp|IFACE:dhcp|off|CLIENT:SERVER:GW:NETMASK:HOST:DEV:AUTOCONF[:DNS0[:DNS1]]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from seedboot.agent.errors import SeedError

STAGE_NAMES: tuple[str, ...] = (
    "early",
    "hardware",
    "network",
    "cache",
    "mirror",
    "trust",
    "blockdev",
    "root",
    "switch",
)
DEFAULT_CACHE = "LABEL=KNXBLOCK"
OVERLAYS = ("tmpfs", "persist")
PREFETCHES = ("profile", "all", "off")
RESCUES = ("shell", "reboot")
COPIES = ("on", "off")
MAX_CONNS = 256
# Flags take no value; "seed.offline=1" is accepted too (GRUB menus often write it so).
_FLAGS = ("seed.offline", "seed.record", "seed.debug")
_VALUED = (
    "seed.mirrors",
    "seed.name",
    "seed.version",
    "seed.cache",
    "seed.overlay",
    "seed.prefetch",
    "seed.conns",
    "seed.rescue",
    "seed.copy",
    "rd.seed.break",
)


@dataclass(frozen=True)
class StaticIP:
    """The kernel's static ``ip=`` form (Documentation/admin-guide/nfs/nfsroot.rst)."""

    address: str
    prefix: int
    gateway: str | None = None
    device: str | None = None
    hostname: str | None = None
    dns: tuple[str, ...] = ()

    def cidr(self) -> str:
        return f"{self.address}/{self.prefix}"


@dataclass(frozen=True)
class IpConfig:
    """How to configure the network: DHCP (on one device or on all), static, or not at all."""

    mode: str  # "dhcp", "static" or "off"
    device: str | None = None
    static: StaticIP | None = None


@dataclass(frozen=True)
class Cmdline:
    mirrors: tuple[str, ...] = ()
    name: str | None = None
    version: int | None = None
    cache: str = DEFAULT_CACHE
    overlay: str = "tmpfs"
    offline: bool = False
    prefetch: str = "profile"
    conns: int | None = None
    record: bool = False
    rescue: str = "shell"
    copy: bool = True
    debug: bool = False
    break_before: str | None = None
    ip: IpConfig = field(default_factory=lambda: IpConfig("dhcp"))
    init: str | None = None
    raw: str = ""


def split(text: str) -> list[str]:
    """Split like the kernel: on whitespace, with double quotes grouping (and removed)."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    started = False
    for ch in text.strip():
        if ch == '"':
            quoted = not quoted
            started = True
        elif ch.isspace() and not quoted:
            if started:
                out.append("".join(cur))
            cur, started = [], False
        else:
            cur.append(ch)
            started = True
    if quoted:
        raise SeedError("kernel command line has an unclosed double quote", "fix the boot entry")
    if started:
        out.append("".join(cur))
    return out


def _bad(key: str, value: str, accepted: str) -> SeedError:
    return SeedError(f"bad kernel option {key}={value!r}: {accepted}", "fix the boot entry (GRUB: press e)")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _bad(key, value, "expected " + " or ".join(choices))
    return value


def _mirrors(value: str) -> tuple[str, ...]:
    out: list[str] = []
    for url in value.split(","):
        url = url.strip()
        if not url:
            continue
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or rest.startswith("/"):
            raise _bad("seed.mirrors", url, "each mirror must be an http:// or https:// URL")
        url = url.rstrip("/")
        if url not in out:
            out.append(url)
    if not out:
        raise _bad("seed.mirrors", value, "give at least one http:// or https:// URL")
    return tuple(out)


def _version(value: str) -> int | None:
    if value == "latest":
        return None
    if not value.isdigit() or int(value) < 1:
        raise _bad("seed.version", value, "expected a version number (1, 2, ...) or 'latest'")
    return int(value)


def _conns(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_CONNS:
        raise _bad("seed.conns", value, f"expected a number of connections from 1 to {MAX_CONNS}")
    return int(value)


def _cache(value: str) -> str:
    kind, sep, rest = value.partition("=")
    if sep and kind in ("LABEL", "UUID") and rest:
        return value
    if value.startswith("/dev/") and len(value) > 5:
        return value
    raise _bad("seed.cache", value, "expected a device (/dev/vda2), LABEL=NAME or UUID=UUID")


def _ip4(key: str, value: str, what: str) -> str:
    import ipaddress  # only for a static ip=: ~20 ms of every boot's start under emulation otherwise

    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise _bad(key, value, f"{what} is not an IPv4 address") from None


def _ip(value: str) -> IpConfig:
    if value in ("dhcp", "on", "any", "both", "bootp", "dhcp6", "auto6"):
        return IpConfig("dhcp")
    if value in ("off", "none"):
        return IpConfig("off")
    parts = value.split(":")
    if len(parts) == 2 and parts[1] in ("dhcp", "on", "any"):
        return IpConfig("dhcp", device=parts[0] or None)
    if len(parts) < 4:
        raise _bad(
            "ip",
            value,
            "expected dhcp, off, IFACE:dhcp or CLIENT:SERVER:GATEWAY:NETMASK:HOSTNAME:DEVICE:off[:DNS0:DNS1]",
        )
    parts += [""] * (9 - len(parts))
    client, _server, gw, mask, host, dev, autoconf, dns0, dns1 = parts[:9]
    if autoconf in ("dhcp", "on", "any", "both", "bootp"):
        return IpConfig("dhcp", device=dev or None)
    if autoconf not in ("", "off", "none", "static"):
        raise _bad("ip", value, f"autoconf field {autoconf!r} must be off, none or dhcp")
    if not client:
        raise _bad("ip", value, "the static form needs the client address first")
    address, slash, plen = client.partition("/")
    address = _ip4("ip", address, "client")
    if slash:
        if not plen.isdigit() or not 0 <= int(plen) <= 32:
            raise _bad("ip", value, f"prefix /{plen} is not 0..32")
        prefix = int(plen)
    elif mask:
        import ipaddress

        try:
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
        except ValueError:
            raise _bad("ip", value, f"netmask {mask!r} is not a netmask") from None
    else:
        prefix = 24  # the kernel guesses by address class; a /24 is what users mean today
    dns = tuple(_ip4("ip", d, "DNS server") for d in (dns0, dns1) if d)
    return IpConfig(
        "static",
        device=dev or None,
        static=StaticIP(
            address=address,
            prefix=prefix,
            gateway=_ip4("ip", gw, "gateway") if gw else None,
            device=dev or None,
            hostname=host or None,
            dns=dns,
        ),
    )


def parse(text: str) -> Cmdline:
    values: dict[str, object] = {}
    for word in split(text):
        key, sep, value = word.partition("=")
        if key in _FLAGS:
            if sep and value not in ("1", "yes", "true", "on", "0", "no", "false", "off"):
                raise _bad(key, value, "a flag: give it alone (or =1 / =0)")
            values[key] = not sep or value in ("1", "yes", "true", "on")
        elif key in _VALUED:
            if not sep or not value:
                raise _bad(key, value, "needs a value")
            values[key] = value
        elif key == "ip":
            values["ip"] = _ip(value)
        elif key == "init" and sep:
            values["init"] = value
        elif key.startswith(("seed.", "rd.seed.")):
            raise SeedError(
                f"unknown kernel option {key!r}",
                "known: " + ", ".join((*_VALUED, *_FLAGS)),
            )
    name = values.get("seed.name")
    if isinstance(name, str):
        from seedboot.agent.layout import check_name

        check_name(name)
    brk = values.get("rd.seed.break")
    if isinstance(brk, str) and brk not in STAGE_NAMES:
        raise _bad("rd.seed.break", brk, "a stage: " + ", ".join(STAGE_NAMES))

    ip = values.get("ip")

    def s(key: str, default: str | None = None) -> str | None:
        v = values.get(key, default)
        return v if isinstance(v, str) else default

    return Cmdline(
        mirrors=_mirrors(s("seed.mirrors") or "") if "seed.mirrors" in values else (),
        name=s("seed.name"),
        version=_version(s("seed.version") or "latest"),
        cache=_cache(s("seed.cache") or DEFAULT_CACHE),
        overlay=_choice("seed.overlay", s("seed.overlay") or "tmpfs", OVERLAYS),
        offline=bool(values.get("seed.offline", False)),
        prefetch=_choice("seed.prefetch", s("seed.prefetch") or "profile", PREFETCHES),
        conns=_conns(s("seed.conns") or "") if "seed.conns" in values else None,
        record=bool(values.get("seed.record", False)),
        rescue=_choice("seed.rescue", s("seed.rescue") or "shell", RESCUES),
        copy=_choice("seed.copy", s("seed.copy") or "on", COPIES) == "on",
        debug=bool(values.get("seed.debug", False)),
        break_before=s("rd.seed.break"),
        ip=ip if isinstance(ip, IpConfig) else IpConfig("dhcp"),
        init=s("init"),
        raw=text.strip(),
    )
