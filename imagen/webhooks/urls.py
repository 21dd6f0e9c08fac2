"""Which webhook targets may be called: the URL rules at submission, and the address rules when connecting.

A URL is read with ``httpx.URL``, the parser that sends it, so a URL the sender cannot read is refused at
submission instead of failing at every attempt. A host that the system resolver reads as an IPv4 address
(``127.1``, ``2130706433``, ``0x7f.1``: ``inet_aton`` forms that ``httpx`` keeps as names) is judged as
that address.

- **Never called**, whatever the settings: link-local addresses (``169.254.0.0/16``, ``fe80::/10``), the cloud
  metadata addresses (``169.254.169.254``, ``fd00:ec2::254``, ``100.100.100.200``, ``168.63.129.16``),
  unspecified (``0.0.0.0/8``, ``::``) and multicast addresses.
- **Internal**, refused unless ``IMAGEN_WEBHOOK_ALLOWED_HOSTS`` lists them (by name, address or network):
  loopback (and the names ``localhost`` and ``*.localhost``), private networks (RFC 1918, ``fc00::/7``), shared
  address space (CGNAT, ``100.64.0.0/10``), and the reserved, documentation and benchmarking ranges.
- An IPv6 address that carries an IPv4 address (IPv4-mapped ``::ffff:0:0/96``, IPv4-compatible ``::/96``,
  NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) is judged by the IPv4 address it carries.
- ``IMAGEN_WEBHOOK_ALLOWED_HOSTS`` unset: any host whose addresses are public. Set: only the hosts,
  addresses and networks it lists (internal ones included); ``*`` in the list adds any public host.

A host name is resolved when connecting, every address it resolves to is checked, and the connection goes
to a checked address (DNS rebinding cannot swap it between the check and the connection): see ``network.py``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PUBLIC_HOST = "*"
SETTING = "IMAGEN_WEBHOOK_ALLOWED_HOSTS"

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
# (network, what it is, never called). Checked in order, after the metadata addresses and the IPv4 address an
# IPv6 one carries; an address in none of them is internal still when Python does not call it global.
NETWORKS: tuple[tuple[IPNetwork, str, bool], ...] = tuple(
    (ipaddress.ip_network(network), label, never)
    for network, label, never in (
        ("0.0.0.0/8", "an unspecified address", True),
        ("169.254.0.0/16", "a link-local address (cloud metadata services live there)", True),
        ("224.0.0.0/4", "a multicast address", True),
        ("127.0.0.0/8", "a loopback address", False),
        ("10.0.0.0/8", "a private address", False),
        ("172.16.0.0/12", "a private address", False),
        ("192.168.0.0/16", "a private address", False),
        ("100.64.0.0/10", "a shared (carrier-grade NAT) address", False),
        ("192.0.0.0/24", "a reserved address", False),
        ("192.0.2.0/24", "a documentation address", False),
        ("198.51.100.0/24", "a documentation address", False),
        ("203.0.113.0/24", "a documentation address", False),
        ("198.18.0.0/15", "a benchmarking address", False),
        ("192.88.99.0/24", "a reserved address", False),
        ("240.0.0.0/4", "a reserved address", False),
        ("::/128", "an unspecified address", True),
        ("fe80::/10", "a link-local address", True),
        ("ff00::/8", "a multicast address", True),
        ("::1/128", "a loopback address", False),
        ("fc00::/7", "a private (unique local) address", False),
        ("fec0::/10", "a private (site-local) address", False),
        ("64:ff9b:1::/48", "a private (local NAT64) address", False),
        ("2001:db8::/32", "a documentation address", False),
        ("100::/64", "a reserved address", False),
        ("2001::/23", "a reserved address", False),
    )
)
IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Names that always mean this host (RFC 6761), whatever the resolver says.
LOOPBACK_NAMES = (
    "localhost", "localhost.localdomain", "localhost6", "localhost6.localdomain6", "ip6-localhost", "ip6-loopback"
)
LOOPBACK_ADDRESSES = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # letters, digits, hyphens (IDNs come as xn--)

Resolver = Callable[[str, int], Sequence[str]]


class UnsafeTarget(Exception):
    """The target is refused (its message says why)."""


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def carried_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4), where a connection to it
    ends up."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in IPV4_MAPPED:
        return address.ipv4_mapped
    if address in IPV4_COMPATIBLE and int(address) > 1:  # not :: nor ::1
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


@dataclass(frozen=True)
class Verdict:
    what: str  # "a loopback address"
    never: bool  # refused even when the settings list it
    address: IPAddress  # the address judged: the IPv4 address an IPv6 one carries, or the address itself


def judge(address: IPAddress) -> Verdict | None:
    """What an address is, when it is not a plain public one; None for a public address."""
    carried = carried_ipv4(address)
    if carried is not None:
        return judge(carried)
    if address in METADATA_ADDRESSES:
        return Verdict("a cloud metadata address", True, address)
    for network, what, never in NETWORKS:
        if address.version == network.version and address in network:
            return Verdict(what, never, address)
    if not address.is_global or address.is_reserved:
        return Verdict("a reserved address", False, address)
    return None


def describe(host: str, verdict: Verdict) -> str:
    """``127.1 (127.0.0.1) is a loopback address``: the host as written, and the address it means."""
    if str(verdict.address) == host:
        return f"{host} is {verdict.what}"
    return f"{host} ({verdict.address}) is {verdict.what}"


def numeric_host(host: str) -> IPAddress | None:
    """The address a host written as an address means, as the system resolver reads it (``127.1``, ``0x7f.1``
    and ``2130706433`` are 127.0.0.1), without any DNS query; None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ipaddress.ip_address(str(infos[0][4][0])) if infos else None


@dataclass(frozen=True)
class WebhookUrl:
    """A URL that passed the rules: ``host`` is lower-case, without brackets or a final dot."""

    url: httpx.URL
    host: str
    port: int


@dataclass(frozen=True)
class TargetPolicy:
    allowed_names: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()
    any_public_host: bool = True

    @classmethod
    def parse(cls, allowed_hosts: str | None) -> TargetPolicy:
        """``"hooks.example.com, 10.0.0.0/8, 127.0.0.1, *"``: host names, addresses, networks, and ``*`` for
        any public host. Unset or empty: any public host, nothing internal."""
        names: set[str] = set()
        networks: list[IPNetwork] = []
        any_public = True
        entries = [entry.strip().lower().strip("[]").rstrip(".") for entry in (allowed_hosts or "").split(",")]
        entries = [entry for entry in entries if entry]
        if entries:
            any_public = ANY_PUBLIC_HOST in entries
        for entry in entries:
            if entry == ANY_PUBLIC_HOST:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry)
        return cls(frozenset(names), tuple(networks), any_public)

    def _listed(self, address: IPAddress) -> bool:
        carried = carried_ipv4(address)
        return any(
            candidate.version == network.version and candidate in network
            for candidate in (address, carried) if candidate is not None
            for network in self.allowed_networks
        )  # fmt: skip

    def address_problem(self, host: str, address: IPAddress, shown: str | None = None) -> str | None:
        """Why ``host`` may not be reached at ``address`` (the address of a connection, or the one a
        numeric host means), or None. ``shown``: how the message names it (the host)."""
        shown = shown or host
        verdict = judge(address)
        if verdict is not None and verdict.never:
            return f"{describe(shown, verdict)}; webhooks are never sent there"
        if host in self.allowed_names or self._listed(address):
            return None
        if verdict is not None:
            return f"{describe(shown, verdict)}; webhooks go to internal addresses only when {SETTING} lists them"
        if not self.any_public_host:
            return f"{shown} is not in this server's {SETTING}"
        return None

    def check_url(self, url: str) -> WebhookUrl:
        """The URL as the sender reads it, after the rules that need no DNS; raises ``UnsafeTarget``. Host
        names are checked again, with their addresses, when connecting."""
        try:
            parsed = httpx.URL(url)
            port = parsed.port
        except (httpx.InvalidURL, ValueError) as exc:
            raise UnsafeTarget(f"must be an http(s) URL this server can send to ({exc})") from exc
        if parsed.scheme not in SCHEMES or not parsed.raw_host:
            raise UnsafeTarget("must be an absolute http:// or https:// URL with a host")
        port = port if port is not None else DEFAULT_PORTS[parsed.scheme]
        if not 0 < port < 65536:
            raise UnsafeTarget(f"port {port} is not a TCP port (1 to 65535)")
        host = parsed.raw_host.decode("ascii").lower().rstrip(".")
        address = numeric_host(host)
        if address is not None:
            problem = self.address_problem(host, address)
        elif not HOST_NAME.fullmatch(host):
            problem = f"{host!r} is not a valid host name"
        elif host in LOOPBACK_NAMES or host.endswith(".localhost"):
            problem = next(
                (found for loopback in LOOPBACK_ADDRESSES if (found := self.address_problem(host, loopback))), None
            )
        elif not self.any_public_host and host not in self.allowed_names and not self.allowed_networks:
            problem = f"{host} is not in this server's {SETTING}"
        else:
            problem = None
        if problem is not None:
            raise UnsafeTarget(problem)
        return WebhookUrl(parsed, host, port)

    def url_problem(self, url: str) -> str | None:
        """Why a webhook URL is refused at submission, or None."""
        try:
            self.check_url(url)
        except UnsafeTarget as exc:
            return str(exc)
        return None

    def addresses(self, host: str, port: int, resolver: Resolver = system_resolver) -> list[str]:
        """The addresses to connect to for ``host``, after checking every address it resolves to. Raises
        ``UnsafeTarget`` (never call it), or ``OSError`` when the name does not resolve."""
        host = host.lower().strip("[]").rstrip(".")
        literal = numeric_host(host)
        found = [literal] if literal is not None else [ipaddress.ip_address(a) for a in resolver(host, port)]
        if not found:
            raise OSError(f"{host} resolves to no address")
        for address in found:
            problem = self.address_problem(host, address, shown=host if literal is not None else str(address))
            if problem is not None:
                raise UnsafeTarget(problem if literal is not None else f"{host} resolves to {address}; {problem}")
        return [str(address) for address in found]
