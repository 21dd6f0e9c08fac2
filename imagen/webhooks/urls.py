"""Which webhook targets may be called: URL rules at submission, and the address rules when connecting.

Always refused, whatever the settings: link-local addresses (169.254.0.0/16, where cloud metadata services
live, and fe80::/10), the AWS IPv6 metadata address fd00:ec2::254, unspecified and multicast addresses, and
the same addresses written as IPv4-mapped IPv6. Loopback and private networks are allowed by default (a
receiver on the same host or network is common); ``IMAGEN_WEBHOOK_ALLOWED_HOSTS`` restricts the targets to
a list of host names, addresses and networks.

A host name is resolved when connecting, every address it resolves to is checked, and the request goes to
the checked address (DNS rebinding cannot swap it between the check and the connection).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_ADDRESSES = (ipaddress.ip_address("fd00:ec2::254"),)
SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}

Resolver = Callable[[str, int], Sequence[str]]


class UnsafeTarget(Exception):
    """The target is refused (its message says why)."""


def refused_reason(address: IPAddress) -> str | None:
    """Why an address is never called, or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return f"{address} is a cloud metadata address"
    if address.is_link_local:
        return f"{address} is a link-local address (cloud metadata services live there)"
    if address.is_unspecified or address.is_multicast:
        return f"{address} is not a unicast address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    """A checked target: connect to ``address``, and name ``host`` in the Host header and for TLS."""

    url: str
    host: str
    address: str


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class TargetPolicy:
    allowed_names: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, allowed_hosts: str | None) -> TargetPolicy:
        """``"hooks.example.com, 10.0.0.0/8, 192.0.2.7"``: host names, addresses and networks."""
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in (allowed_hosts or "").split(","):
            entry = entry.strip().lower().strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    @property
    def restricted(self) -> bool:
        return bool(self.allowed_names or self.allowed_networks)

    def _address_allowed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.allowed_networks)

    def url_problem(self, url: str) -> str | None:
        """Why a webhook URL is refused at submission, or None. Host names are checked again (resolved)
        when connecting."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            return f"must be an http(s) URL ({exc})"
        if parts.scheme not in SCHEMES or not parts.hostname:
            return "must be an absolute http:// or https:// URL with a host"
        del port  # read above only to refuse a malformed port
        host = parts.hostname.rstrip(".")
        address = _literal_address(host)
        if address is not None:
            reason = refused_reason(address)
            if reason is not None:
                return f"{reason}; webhooks are never sent there"
            if self.restricted and not (host in self.allowed_names or self._address_allowed(address)):
                return f"{host} is not in this server's IMAGEN_WEBHOOK_ALLOWED_HOSTS"
        elif self.restricted and host not in self.allowed_names and not self.allowed_networks:
            return f"{host} is not in this server's IMAGEN_WEBHOOK_ALLOWED_HOSTS"
        return None

    def resolve(self, url: str, resolver: Resolver = system_resolver) -> Target:
        """The address to connect to, after checking every address the host resolves to. Raises
        ``UnsafeTarget`` (never call it), or ``OSError`` when the name does not resolve (may pass)."""
        problem = self.url_problem(url)
        if problem is not None:
            raise UnsafeTarget(problem)
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        port = parts.port or DEFAULT_PORTS[parts.scheme]
        literal = _literal_address(host)
        addresses = [literal] if literal is not None else [ipaddress.ip_address(a) for a in resolver(host, port)]
        if not addresses:
            raise OSError(f"{host} resolves to no address")
        for address in addresses:
            reason = refused_reason(address)
            if reason is not None:
                raise UnsafeTarget(f"{host} resolves to {reason}")
            if self.restricted and host not in self.allowed_names and not self._address_allowed(address):
                raise UnsafeTarget(f"{host} resolves to {address}, outside IMAGEN_WEBHOOK_ALLOWED_HOSTS")
        return Target(url=url, host=host, address=str(addresses[0]))
