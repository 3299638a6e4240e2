"""SSRF-safe URL checks and fetching.

Three layers, each usable alone (the web processor uses ``fetch``; the webhook sender
uses ``post``; both are built on ``validate_url`` and ``safe_client``):

* ``validate_url`` — syntax only, no DNS: scheme, host, no credentials, literal addresses.
  Host names are checked in their ASCII form: Unicode names IDNA-encoded (by httpx, with
  the ``idna`` package), ``xn--`` labels validated as IDNA 2008.
* ``check_address`` — is one IP address a global unicast address (or allowed by policy)?
  An allow-list in effect: ``NOT_GLOBAL`` covers every address that is not global unicast.
* ``SafeBackend`` — an ``httpcore`` network backend. httpcore hands ``connect_tcp`` the
  host name; the backend resolves it once through an injectable resolver, checks EVERY
  answer, and connects to one of the addresses it checked. Nothing downstream resolves the
  name again, so a DNS record that moves between check and connect (rebinding) moves
  nothing. The request URL is untouched, so the Host header, the connection pool key, TLS
  SNI and certificate verification all still use the host name.

Written here rather than taken from safehttpx (sends names to a third-party resolver) or
ssrfguard (a 0.x release with another policy model); revisit when ssrfguard reaches 1.0.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import httpcore
import httpx
import idna

from morag.core.errors import (
    ForbiddenTargetError,
    InvalidInputError,
    LimitExceededError,
    TransientError,
    UnsupportedFormatError,
)
from morag.core.redaction import redact_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``socket.getaddrinfo``-compatible: ``resolver(host, port, family, type)``.
Resolver = Callable[..., list[tuple[Any, ...]]]
#: ``connector(ip, port, timeout) -> httpcore.NetworkStream``; only ever given an IP.
Connector = Callable[[str, int, float | None], httpcore.NetworkStream]

USER_AGENT = "morag/0.1 (ingestion service)"
MAX_URL_LENGTH = 8192
MAX_CONNECT_ATTEMPTS = 4  # bounds the cost of a name with many silent addresses


def _net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


# Every destination that is not global unicast, one (network, reason) row each: the guard
# refuses an address when the LONGEST prefix containing it is a row here, so a specific row
# (cloud metadata) names the refusal inside a broad one (link-local). Sources:
# * IANA IPv4 Special-Purpose Address Registry and IANA IPv6 Special-Purpose Address
#   Registry (RFC 6890 format), as revised up to RFC 9637 (3fff::/20, 2024), RFC 9602
#   (5f00::/16, 2024) and RFC 9780 (100:0:0:1::/64, 2025): every row that is not globally
#   reachable. Rows marked globally reachable are left out when they sit in global space
#   (AS112 192.31.196.0/24, 192.175.48.0/24, 2620:4f:8000::/48; AMT 192.52.193.0/24) and
#   refused with their parent block otherwise (the anycast hosts of 192.0.0.0/24 and
#   2001::/23): no web page or webhook lives there.
# * IANA IPv4 Address Space (224.0.0.0/4 multicast) and IANA IPv6 Address Space (2024-09-10):
#   only 2000::/3 is global unicast, so every other block of that registry is a row.
# * Cloud metadata endpoints, which sit inside rows already, for a clearer refusal.
# The four rows named in _EMBEDDINGS carry an IPv4 address: for them the verdict is that of
# the embedded address(es), looked up in this same table (see _refusal_reason).
NOT_GLOBAL: tuple[tuple[IPNetwork, str], ...] = (
    # --- IPv4 ---------------------------------------------------------------------------
    (_net("0.0.0.0/8"), "this network (RFC 791)"),
    (_net("0.0.0.0/32"), "unspecified"),
    (_net("10.0.0.0/8"), "private-use (RFC 1918)"),
    (_net("100.64.0.0/10"), "shared address space (carrier-grade NAT, RFC 6598)"),
    (_net("100.100.100.200/32"), "cloud metadata"),  # Alibaba Cloud
    (_net("127.0.0.0/8"), "loopback"),
    (_net("169.254.0.0/16"), "link-local"),
    (_net("169.254.169.254/32"), "cloud metadata"),  # AWS, GCP, Azure, OpenStack, Oracle
    (_net("172.16.0.0/12"), "private-use (RFC 1918)"),
    (_net("192.0.0.0/24"), "IETF protocol assignments (RFC 6890)"),
    (_net("192.0.0.0/29"), "IPv4 service continuity (DS-Lite, RFC 7335)"),
    (_net("192.0.0.8/32"), "IPv4 dummy address (RFC 7600)"),
    (_net("192.0.0.170/31"), "NAT64/DNS64 discovery (RFC 8880)"),
    (_net("192.0.2.0/24"), "documentation (TEST-NET-1, RFC 5737)"),
    (_net("192.88.99.0/24"), "deprecated 6to4 relay anycast (RFC 7526)"),
    (_net("192.168.0.0/16"), "private-use (RFC 1918)"),
    (_net("198.18.0.0/15"), "benchmarking (RFC 2544)"),
    (_net("198.51.100.0/24"), "documentation (TEST-NET-2, RFC 5737)"),
    (_net("203.0.113.0/24"), "documentation (TEST-NET-3, RFC 5737)"),
    (_net("224.0.0.0/4"), "multicast"),
    (_net("240.0.0.0/4"), "reserved (RFC 1112)"),
    (_net("255.255.255.255/32"), "limited broadcast"),
    # --- IPv6: the IPv6 Address Space outside 2000::/3 -----------------------------------
    (_net("::/8"), "reserved by IETF"),
    (_net("100::/8"), "reserved by IETF"),
    (_net("200::/7"), "reserved by IETF"),
    (_net("400::/6"), "reserved by IETF"),
    (_net("800::/5"), "reserved by IETF"),
    (_net("1000::/4"), "reserved by IETF"),
    (_net("4000::/3"), "reserved by IETF"),
    (_net("6000::/3"), "reserved by IETF"),
    (_net("8000::/3"), "reserved by IETF"),
    (_net("a000::/3"), "reserved by IETF"),
    (_net("c000::/3"), "reserved by IETF"),
    (_net("e000::/4"), "reserved by IETF"),
    (_net("f000::/5"), "reserved by IETF"),
    (_net("f800::/6"), "reserved by IETF"),
    (_net("fc00::/7"), "unique-local"),
    (_net("fd00:ec2::254/128"), "cloud metadata"),  # AWS
    (_net("fe00::/9"), "reserved by IETF"),
    (_net("fe80::/10"), "link-local"),
    (_net("fec0::/10"), "site-local (deprecated, RFC 3879)"),
    (_net("ff00::/8"), "multicast"),
    # --- IPv6: Special-Purpose rows ------------------------------------------------------
    (_net("::/128"), "unspecified"),
    (_net("::1/128"), "loopback"),
    (_net("::/96"), "IPv4-compatible (deprecated, RFC 4291)"),  # refused whatever it holds
    (_net("::ffff:0:0/96"), "IPv4-mapped"),  # embedding
    (_net("64:ff9b::/96"), "NAT64 (RFC 6052)"),  # embedding
    (_net("64:ff9b:1::/48"), "local-use NAT64 (RFC 8215)"),  # its embedding is site-chosen
    (_net("100::/64"), "discard-only (RFC 6666)"),
    (_net("100:0:0:1::/64"), "dummy IPv6 prefix (RFC 9780)"),
    (_net("2001::/23"), "IETF protocol assignments (RFC 2928)"),
    (_net("2001::/32"), "Teredo (RFC 4380)"),  # embedding
    (_net("2001:2::/48"), "benchmarking (RFC 5180)"),
    (_net("2001:10::/28"), "deprecated ORCHID (RFC 4843)"),
    (_net("2001:db8::/32"), "documentation (RFC 3849)"),
    (_net("2002::/16"), "6to4 (RFC 3056)"),  # embedding
    (_net("3fff::/20"), "documentation (RFC 9637)"),
    (_net("5f00::/16"), "SRv6 segment identifiers (RFC 9602)"),
)


def _mapped(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    return (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF),)


def _teredo(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    return ip.teredo or ()  # (server, client): either may be the one a packet reaches


def _sixtofour(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    return (ip.sixtofour,) if ip.sixtofour is not None else ()


# IPv6 blocks whose addresses carry an IPv4 address that a translator, tunnel or the local
# dual stack delivers to: mapped and NAT64 stand for that IPv4 address; a 6to4 or Teredo
# address is a global IPv6 address as long as the IPv4 addresses it relays through are.
_EMBEDDINGS: dict[IPNetwork, Callable[[ipaddress.IPv6Address], tuple[IPAddress, ...]]] = {
    _net("::ffff:0:0/96"): _mapped,
    _net("64:ff9b::/96"): _mapped,
    _net("2001::/32"): _teredo,
    _net("2002::/16"): _sixtofour,
}
# per IP version, longest prefix first: the first row containing an address judges it
_ROWS_BY_SPECIFICITY = {
    version: sorted(
        (row for row in NOT_GLOBAL if row[0].version == version),
        key=lambda row: row[0].prefixlen,
        reverse=True,
    )
    for version in (4, 6)
}

_LOCAL_NAMES = re.compile(r"^(localhost|localhost\.localdomain|.*\.localhost)\.?$")
_HOST_CHARS = re.compile(r"^[a-z0-9_.-]+$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


@dataclass(frozen=True)
class UrlPolicy:
    """Which targets the guard lets through.

    ``allow`` holds host names and/or addresses/CIDR networks exempt from the address
    check (settings ``ssrf_allow``), e.g. ``("127.0.0.1", "localhost", "10.0.0.0/8")``.
    """

    allow: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ("http", "https")
    allowed_hosts: frozenset[str] = field(init=False, repr=False)
    allowed_networks: tuple[IPNetwork, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        hosts, networks = set(), []
        for entry in self.allow:
            text = entry.strip().lower().strip("[]")
            if not text:
                continue
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                hosts.add(_allow_entry_name(text.rstrip(".")))
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "schemes", tuple(s.lower() for s in self.schemes))
        object.__setattr__(self, "allowed_hosts", frozenset(hosts))
        object.__setattr__(self, "allowed_networks", tuple(networks))

    @classmethod
    def from_settings(cls, settings: Any) -> UrlPolicy:
        return cls(allow=tuple(settings.ssrf_allow))

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allowed_hosts

    def address_allowed(self, ip: IPAddress) -> bool:
        if self._in_allowed(ip):
            return True
        inner = _embedded_ipv4(ip)  # 127.0.0.1 allowed also allows ::ffff:127.0.0.1
        return bool(inner) and all(self._in_allowed(v4) for v4 in inner)

    def _in_allowed(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.allowed_networks if ip.version == net.version)


@dataclass(frozen=True)
class FetchResult:
    final_url: str
    status: int
    headers: dict[str, str]
    content: bytes
    content_type: str  # media type only, lower case ("" when the server sent none)
    encoding: str | None  # charset from Content-Type, if any


# --- checks without I/O -------------------------------------------------------------------


def _row(ip: IPAddress) -> tuple[IPNetwork, str] | None:
    """The most specific ``NOT_GLOBAL`` row containing ``ip``, if any."""
    return next((row for row in _ROWS_BY_SPECIFICITY[ip.version] if ip in row[0]), None)


def _embedded_ipv4(ip: IPAddress) -> tuple[IPAddress, ...]:
    """The IPv4 addresses an IPv6 address carries (mapped, NAT64, 6to4, Teredo), if any."""
    row = _row(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    extract = _EMBEDDINGS.get(row[0]) if row else None
    return extract(ip) if extract and isinstance(ip, ipaddress.IPv6Address) else ()


def _refusal_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a global unicast address, or None when it is."""
    row = _row(ip)
    if row is None:
        return None
    network, reason = row
    inner = _embedded_ipv4(ip)
    if network not in _EMBEDDINGS or not inner:
        return reason
    # the embedded IPv4 is judged by the same table: deny when any of it is not global
    inner_reasons = [r for r in map(_refusal_reason, inner) if r]
    return f"{inner_reasons[0]} (embedded in {reason})" if inner_reasons else None


def _same_address(host: str, address: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]").rstrip(".")) == address
    except ValueError:
        return False


def check_address(ip: str | IPAddress, policy: UrlPolicy, host: str = "") -> IPAddress:
    """Refuse an address that is not global unicast unless the policy allows its host or network."""
    address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if (host and policy.host_allowed(host)) or policy.address_allowed(address):
        return address
    reason = _refusal_reason(address)
    if reason:
        shown = str(address) if not host or _same_address(host, address) else f"{host} ({address})"
        raise ForbiddenTargetError(
            f"refusing to connect to {shown}: {reason}, not a global unicast address "
            "(add the host or network to ssrf_allow to permit it)",
            details={"host": host or str(address), "address": str(address), "reason": reason},
        )
    return address


def validate_url(url: str, policy: UrlPolicy) -> str:
    """Check a URL's syntax against the policy without DNS; return it normalised."""
    text = (url or "").strip()
    if not text:
        raise InvalidInputError("URL is empty")
    if len(text) > MAX_URL_LENGTH:
        raise InvalidInputError(f"URL is longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x20 or c == "\\" for c in text):
        raise InvalidInputError("URL contains control characters or backslashes")
    try:
        parsed = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as exc:
        raise InvalidInputError(f"invalid URL {text!r}: {exc}") from None
    scheme = parsed.scheme.lower()
    if scheme not in policy.schemes:
        raise ForbiddenTargetError(
            f"URL scheme {scheme or '(none)'!r} is not allowed; use {' or '.join(policy.schemes)}",
            details={"url": text, "scheme": scheme},
        )
    if parsed.userinfo:
        raise ForbiddenTargetError(
            "URLs with credentials (user@host) are not allowed", details={"url": text}
        )
    # raw_host is what goes on the wire: lower case, a Unicode name already IDNA-encoded
    # (``host`` would decode xn-- labels back to Unicode, and raise on invalid ones)
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise InvalidInputError(f"URL has no host: {text!r}")
    _check_host(host, policy)
    return str(parsed.copy_with(fragment=None))


def _ascii_host(host: str) -> str:
    """``host`` in the ASCII form DNS sees: Unicode labels IDNA-encoded, ``xn--`` labels
    checked to be valid IDNA 2008 (as httpx encodes them), all lower case."""
    name = host.lower()
    try:
        if not name.isascii():
            return idna.encode(name).decode("ascii")
        for label in name.split("."):
            if label.startswith("xn--"):
                idna.decode(label)
    except idna.IDNAError as exc:
        raise InvalidInputError(
            f"invalid internationalised host name {host!r}: {exc} (IDNA 2008)",
            details={"host": host, "reason": str(exc)},
        ) from None
    return name


def _allow_entry_name(name: str) -> str:
    try:
        return _ascii_host(name)
    except InvalidInputError:
        return name  # can never match a valid host; kept rather than failing start-up


def _check_host(host: str, policy: UrlPolicy) -> str:
    """Refuse literal addresses, local names and ambiguous numeric hosts (no DNS); return
    the host in the form to resolve (ASCII)."""
    try:
        address = ipaddress.ip_address(host.rstrip("."))
    except ValueError:
        address = None
    if address is not None:
        check_address(address, policy, host)
        return host
    name = _ascii_host(host)
    bare = name.rstrip(".")
    if len(bare) > 253 or not _HOST_CHARS.match(bare):
        raise InvalidInputError(f"invalid host name {host!r}")
    # 2130706433, 0x7f.1, 0177.0.0.1: resolvers read these as addresses; humans do not
    if all(_NUMERIC_LABEL.match(label) for label in bare.split(".")):
        raise InvalidInputError(f"ambiguous numeric host {host!r}; write the address in full")
    if _LOCAL_NAMES.match(bare) and not policy.host_allowed(bare):
        raise ForbiddenTargetError(
            f"refusing to connect to {host}: local host name (add it to ssrf_allow to permit it)",
            details={"host": host, "reason": "local host name"},
        )
    return name


# --- resolution and connection ------------------------------------------------------------


def _remaining(deadline: float | None, timeout: float | None = None) -> float | None:
    """The smaller of ``timeout`` and the time left before ``deadline``; raises when past."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("overall deadline passed")
    return left if timeout is None else min(timeout, left)


def _resolve(host: str, port: int, resolver: Resolver, timeout: float | None) -> list[str]:
    """Resolve in a daemon thread: getaddrinfo takes no timeout, the deadline must hold."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["infos"] = resolver(host, port, 0, socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"resolve-{host}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise httpcore.ConnectTimeout(f"resolving {host} timed out")
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, socket.gaierror) and error.errno == socket.EAI_AGAIN:
            raise TransientError(f"temporary DNS failure resolving {host}") from None
        if isinstance(error, OSError):
            raise InvalidInputError(f"cannot resolve host {host}: {error}") from None
        raise error
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in outcome["infos"]))
    if not addresses:
        raise InvalidInputError(f"cannot resolve host {host}: no addresses")
    return addresses


def _default_connector(ip: str, port: int, timeout: float | None) -> httpcore.NetworkStream:
    # an IP literal: socket.create_connection parses it and performs no DNS lookup
    return httpcore.SyncBackend().connect_tcp(ip, port, timeout=timeout)


class _DeadlineStream(httpcore.NetworkStream):
    """Caps every read, write and TLS handshake at the fetch's overall deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float | None) -> None:
        self._inner, self._deadline = inner, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _remaining(self._deadline, timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _remaining(self._deadline, timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        # server_hostname is the URL's host name, so SNI and certificate checks use it
        inner = self._inner.start_tls(
            ssl_context, server_hostname, _remaining(self._deadline, timeout)
        )
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class SafeBackend(httpcore.NetworkBackend):
    """Resolve once, check every address, connect to a checked address only."""

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
        deadline: float | None = None,
    ) -> None:
        self.policy = policy
        self.resolver = resolver or socket.getaddrinfo
        self.connector = connector or _default_connector
        self.deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        # literal addresses are checked here, never resolved; a name is resolved in ASCII
        name = _check_host(host, self.policy)
        try:
            addresses = [str(ipaddress.ip_address(name.rstrip(".")))]
        except ValueError:
            addresses = _resolve(name, port, self.resolver, _remaining(self.deadline, timeout))
        for address in addresses:  # all of them: one bad answer is a rebinding signature
            check_address(address, self.policy, name)
        last_error: Exception | None = None
        for address in addresses[:MAX_CONNECT_ATTEMPTS]:
            try:
                stream = self.connector(address, port, _remaining(self.deadline, timeout))
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
                continue
            return _DeadlineStream(stream, self.deadline)
        assert last_error is not None
        raise last_error

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise ForbiddenTargetError("unix sockets are not reachable through the URL guard")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@lru_cache(maxsize=1)
def _default_ssl_context() -> Any:
    # loading the CA bundle takes ~15 ms; one verifying context is safe to share
    return httpx.create_ssl_context(verify=True, trust_env=False)


class SafeTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` whose pool connects only through ``SafeBackend``."""

    def __init__(
        self,
        policy: UrlPolicy,
        *,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
        deadline: float | None = None,
        verify: Any = True,
    ) -> None:
        # HTTPTransport.__init__ would build a pool on the default backend; only _pool is used
        self._pool = httpcore.ConnectionPool(
            ssl_context=_default_ssl_context()
            if verify is True
            else httpx.create_ssl_context(verify=verify, trust_env=False),
            network_backend=SafeBackend(
                policy, resolver=resolver, connector=connector, deadline=deadline
            ),
        )


def safe_client(
    policy: UrlPolicy,
    *,
    timeout: float,
    resolver: Resolver | None = None,
    connector: Connector | None = None,
    deadline: float | None = None,
    verify: Any = True,
) -> httpx.Client:
    """An ``httpx.Client`` behind the guard: no redirects followed, no proxies, no netrc.

    The caller follows redirects itself and validates each hop with ``validate_url``.
    """
    transport = SafeTransport(
        policy, resolver=resolver, connector=connector, deadline=deadline, verify=verify
    )
    return httpx.Client(
        transport=transport,
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": USER_AGENT},
    )


# --- fetching ----------------------------------------------------------------------------


@contextmanager
def _http_errors(url: str, timeout: float, doing: str = "fetching") -> Iterator[None]:
    """Translate httpx failures into morag's error kinds."""
    try:
        yield
    except httpx.TimeoutException:
        raise TransientError(
            f"timed out {doing} {url} (limit {timeout:g} s)", details={"url": url}
        ) from None
    except httpx.DecodingError as exc:
        raise InvalidInputError(f"cannot decode the response from {url}: {exc}") from None
    except httpx.InvalidURL as exc:
        raise InvalidInputError(f"invalid URL {url!r}: {exc}") from None
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):  # retrying will not fix a bad certificate
            raise InvalidInputError(
                f"TLS certificate of {url} failed verification: {exc}", details={"url": url}
            ) from None
        raise TransientError(f"cannot connect to {url}: {exc}", details={"url": url}) from None
    except httpx.TransportError as exc:
        raise TransientError(
            f"network error {doing} {url}: {exc or type(exc).__name__}", details={"url": url}
        ) from None


def _check_status(response: httpx.Response, url: str) -> None:
    status = response.status_code
    details = {"url": url, "status": status}
    if status >= 500 or status in (408, 429):  # the server may recover: retry later
        raise TransientError(f"{url} answered HTTP {status}", details=details)
    if status >= 300:
        raise InvalidInputError(f"{url} answered HTTP {status}", details=details)


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip().lower()


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float, url: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise LimitExceededError(
            f"{url} is {int(declared)} bytes, over the limit of {max_bytes}",
            details={"url": url, "limit": max_bytes},
        )
    body = bytearray()
    for piece in response.iter_bytes():  # decoded bytes: a gzip bomb hits the cap too
        body += piece
        if len(body) > max_bytes:
            raise LimitExceededError(
                f"{url} is over the limit of {max_bytes} bytes",
                details={"url": url, "limit": max_bytes},
            )
        if time.monotonic() > deadline:  # a server dripping bytes still ends on time
            raise httpx.ReadTimeout("overall deadline passed")
    return bytes(body)


def fetch(
    url: str,
    policy: UrlPolicy,
    *,
    timeout: float = 20.0,
    max_bytes: int = 10 * 1024 * 1024,
    max_redirects: int = 5,
    accept_content_types: tuple[str, ...] | None = None,
    resolver: Resolver | None = None,
    connector: Connector | None = None,
    verify: Any = True,
) -> FetchResult:
    """GET ``url`` through the guard, following and re-checking up to ``max_redirects`` hops.

    ``timeout`` bounds the whole fetch (DNS, connects, every hop, the body). A response
    without a Content-Type passes the ``accept_content_types`` check; the caller sniffs it.
    """
    deadline = time.monotonic() + timeout
    current = validate_url(url, policy)
    accept = ", ".join(accept_content_types) if accept_content_types else "*/*"
    with safe_client(
        policy,
        timeout=timeout,
        resolver=resolver,
        connector=connector,
        deadline=deadline,
        verify=verify,
    ) as client:
        for _hop in range(max_redirects + 1):
            with _http_errors(current, timeout):
                request = client.build_request(
                    "GET",
                    current,
                    headers={"Accept": accept},
                    timeout=_remaining_or_fail(deadline, current, timeout),
                )
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        target = response.url.join(response.headers["location"])
                        current = validate_url(str(target), policy)
                        continue
                    _check_status(response, current)
                    media_type = _media_type(response)
                    if (
                        accept_content_types
                        and media_type
                        and media_type not in accept_content_types
                    ):
                        raise UnsupportedFormatError(
                            f"{current} is {media_type}; expected one of "
                            f"{', '.join(accept_content_types)}",
                            details={"url": current, "content_type": media_type},
                        )
                    content = _read_capped(response, max_bytes, deadline, current)
                    return FetchResult(
                        final_url=str(response.url),
                        status=response.status_code,
                        headers=dict(response.headers),
                        content=content,
                        content_type=media_type,
                        encoding=response.charset_encoding,
                    )
                finally:
                    response.close()
    raise InvalidInputError(
        f"too many redirects (more than {max_redirects}) fetching {url}",
        details={"url": url, "max_redirects": max_redirects},
    )


def _remaining_or_fail(deadline: float, url: str, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransientError(
            f"timed out fetching {url} (limit {timeout:g} s)", details={"url": url}
        )
    return left


# --- posting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PostResult:
    status: int
    headers: dict[str, str]
    content: bytes  # the start of the answer's body, at most ``max_response_bytes``


def post(
    url: str,
    policy: UrlPolicy,
    *,
    content: bytes,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    max_response_bytes: int = 4096,
    resolver: Resolver | None = None,
    connector: Connector | None = None,
    verify: Any = True,
) -> PostResult:
    """POST ``content`` to ``url`` through the guard; redirects are answers, not followed.

    ``timeout`` bounds the whole exchange (DNS, connect, upload, answer). Any HTTP status
    is returned for the caller to judge; a refused target raises ``ForbiddenTargetError``
    before anything is sent, a timeout or network failure ``TransientError``.
    """
    deadline = time.monotonic() + timeout
    target = validate_url(url, policy)
    shown = redact_url(target)  # a POST target (a webhook) often carries its credentials
    with (
        safe_client(
            policy,
            timeout=timeout,
            resolver=resolver,
            connector=connector,
            deadline=deadline,
            verify=verify,
        ) as client,
        _http_errors(shown, timeout, "posting to"),
    ):
        request = client.build_request(
            "POST",
            target,
            content=content,
            headers=headers,
            timeout=_remaining_or_fail(deadline, shown, timeout),
        )
        response = client.send(request, stream=True)
        try:
            body = bytearray()
            for piece in response.iter_raw():  # only a snippet for the log: keep it raw
                body += piece[: max_response_bytes - len(body)]
                if len(body) >= max_response_bytes:
                    break  # the rest is not worth the wait
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("overall deadline passed")
            return PostResult(
                status=response.status_code, headers=dict(response.headers), content=bytes(body)
            )
        finally:
            response.close()
