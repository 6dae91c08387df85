"""Read files of a mirror tree from a local directory or an HTTP(S) base URL.

One ``get(path)`` per file; batch and background fetching with many transfers in flight
live elsewhere (this is for the few small files of a release and for tools).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from seedboot.agent.errors import SeedError

log = logging.getLogger(__name__)


class NotFound(SeedError):
    """The mirror does not have this file (HTTP 404, or no such file)."""


class Reader(Protocol):
    location: str

    def get(self, path: str) -> bytes: ...


def get_all(reader: Reader, paths: Sequence[str]) -> list[bytes | SeedError]:
    """Each file's bytes, or the error ``get`` raised for it, in order: all in flight together
    where the reader can (``HttpReader.get_many``: one round trip for all instead of one each),
    else one after the other."""
    many = getattr(reader, "get_many", None)
    if many is not None:
        got: list[bytes | SeedError] = many(paths)
        return got
    out: list[bytes | SeedError] = []
    for path in paths:
        try:
            out.append(reader.get(path))
        except SeedError as e:
            out.append(e)
    return out


def first_error(got: Sequence[bytes | SeedError]) -> SeedError | None:
    return next((g for g in got if isinstance(g, SeedError)), None)


@dataclass
class DirReader:
    root: Path
    location: str = ""

    def __post_init__(self) -> None:
        self.location = self.location or str(self.root)
        if not self.root.is_dir():
            raise SeedError(f"mirror directory {self.root} does not exist", "check --mirror")

    def get(self, path: str) -> bytes:
        try:
            return (self.root / path).read_bytes()
        except FileNotFoundError as e:
            raise NotFound(f"{self.location}: no {path}") from e
        except OSError as e:
            raise SeedError(f"{self.location}: cannot read {path}: {e.strerror}") from e


@dataclass
class HttpReader:
    """pycurl, one reused handle (keep-alive). Remembers the server's Date header, which a
    machine with no trustworthy clock can use as a lower bound for the time."""

    base_url: str
    timeout: float = 20.0
    connect_timeout: float = 5.0
    location: str = ""
    server_date: float | None = None
    _curl: Any = field(default=None, repr=False)
    _multi: Any = field(default=None, repr=False)  # get_many's: its connections stay open between calls
    _handles: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.location = self.location or self.base_url

    def _setup(self, c: Any, path: str) -> tuple[str, io.BytesIO, list[bytes]]:
        import pycurl

        body = io.BytesIO()
        headers: list[bytes] = []
        url = f"{self.base_url}/{path}"
        c.setopt(pycurl.URL, url)
        c.setopt(pycurl.WRITEDATA, body)
        c.setopt(pycurl.HEADERFUNCTION, headers.append)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(self.connect_timeout * 1000))
        c.setopt(pycurl.TIMEOUT_MS, int(self.timeout * 1000))
        c.setopt(pycurl.FOLLOWLOCATION, True)
        c.setopt(pycurl.NOSIGNAL, 1)
        return url, body, headers

    def _result(self, c: Any, url: str, body: io.BytesIO, headers: list[bytes]) -> bytes:
        import pycurl

        status = int(c.getinfo(pycurl.RESPONSE_CODE))
        self._note_date(headers)
        if status == 404:
            raise NotFound(f"{url}: 404 not found")
        if status != 200:
            raise SeedError(f"{url}: HTTP {status}", "the mirror answered with an error")
        return body.getvalue()

    def get(self, path: str) -> bytes:
        import pycurl

        if self._curl is None:
            self._curl = pycurl.Curl()
        c = self._curl
        url, body, headers = self._setup(c, path)
        try:
            c.perform()
        except pycurl.error as e:
            raise SeedError(f"{url}: {e.args[-1]}", "is the mirror up and reachable?") from e
        return self._result(c, url, body, headers)

    def get_many(self, paths: Sequence[str]) -> list[bytes | SeedError]:
        """``get`` of each path, all transfers in flight at once (one round trip for all, on
        as many connections); each item the bytes or the error ``get`` would have raised."""
        import pycurl

        if self._multi is None:
            self._multi = pycurl.CurlMulti()
        while len(self._handles) < len(paths):
            self._handles.append(pycurl.Curl())
        handles = self._handles[: len(paths)]
        jobs = [(c, *self._setup(c, path)) for c, path in zip(handles, paths, strict=True)]
        failed: dict[int, str] = {}
        for c, *_ in jobs:
            self._multi.add_handle(c)
        try:
            active = len(jobs)
            while active:
                ret, active = self._multi.perform()
                if ret == pycurl.E_CALL_MULTI_PERFORM:
                    continue
                if active:
                    self._multi.select(1.0)  # each transfer has its own time limits
            while True:
                queued, _ok, errors = self._multi.info_read()
                for c, _errno, msg in errors:
                    failed[id(c)] = msg or f"curl error {_errno}"
                if not queued:
                    break
        finally:
            for c, *_ in jobs:
                self._multi.remove_handle(c)
        out: list[bytes | SeedError] = []
        for c, url, body, headers in jobs:
            try:
                if id(c) in failed:
                    raise SeedError(f"{url}: {failed[id(c)]}", "is the mirror up and reachable?")
                out.append(self._result(c, url, body, headers))
            except SeedError as e:
                out.append(e)
        return out

    def _note_date(self, headers: list[bytes]) -> None:
        for h in headers:
            name, _, value = h.decode("latin-1").partition(":")
            if name.strip().lower() == "date":
                when = http_date(value)
                if when is None:
                    log.debug("unparseable Date header %r", value)
                else:
                    self.server_date = when


MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(value: str) -> float | None:
    """Seconds since the epoch of an HTTP Date (RFC 9110's IMF-fixdate, as every server sends:
    ``Sun, 06 Nov 1994 08:49:37 GMT``), or None. Not email.utils: under emulation importing the
    email package cost the block daemon ~0.2 s at every boot."""
    parts = value.replace(",", " ").split()
    if len(parts) == 5:  # no weekday
        parts.insert(0, "")
    if len(parts) != 6 or parts[5] not in ("GMT", "UTC", "+0000") or parts[2] not in MONTHS:
        return None
    try:
        day, year = int(parts[1]), int(parts[3])
        hh, mm, ss = (int(x) for x in parts[4].split(":"))
        month = MONTHS.index(parts[2]) + 1
    except ValueError:
        return None
    # Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return float(days * 86400 + hh * 3600 + mm * 60 + ss)


def open_reader(location: str) -> Reader:
    if location.startswith(("http://", "https://")):
        return HttpReader(location)
    return DirReader(Path(location))
