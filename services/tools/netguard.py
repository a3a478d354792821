"""The egress guard: tools never reach private, loopback or otherwise internal addresses.

A tool call's URL comes from a catalog, but its host, path and query can be steered by
model output and by redirects, so every connection is checked *when it is made*: the host
is resolved, every address is vetted, and the socket connects to a vetted address (no
second DNS lookup, so DNS rebinding cannot slip past). Refused: private, loopback,
link-local, multicast, reserved, unspecified and other non-global addresses, IPv4 and IPv6,
including IPv4 addresses embedded in IPv6 (mapped, 6to4, Teredo, NAT64). A host name, an
IP or a CIDR range listed in ``UMI_TOOLS_ALLOW_HOSTS`` is let through.

Redirects are never followed and environment proxies are ignored (a proxy would make the
guard check the proxy instead of the destination).

Usage::

    guard = NetworkGuard(allow_hosts=["127.0.0.1"])
    guard.check("169.254.169.254")        # raises EgressRefused
    client = guarded_client(guard)        # an httpx.Client whose connections are vetted
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpcore
import httpx

from services.tools.errors import BackendUnavailable, EgressRefused, ToolSetupError

__all__ = [
    "GuardedNetworkBackend",
    "GuardedTransport",
    "NetworkGuard",
    "Resolver",
    "address_problem",
    "check_host",
    "guarded_client",
    "system_resolver",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``(host, port) -> IP address strings``; :func:`system_resolver` by default.
Resolver = Callable[[str, int], Sequence[str]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver, without duplicates or IPv6 zone ids."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        address = str(sockaddr[0]).split("%", 1)[0]
        if address not in addresses:
            addresses.append(address)
    return addresses


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in _NAT64:
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [address for address in embedded if address is not None]


def address_problem(ip: IPAddress) -> str | None:
    """Why a tool must not connect to ``ip`` (``"loopback"``, ``"private"``, …), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in _embedded_ipv4(ip):
            problem = address_problem(inner)
            if problem:
                return f"{problem} (embedded IPv4 {inner})"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-global", not ip.is_global),
    )
    return next((label for label, hit in checks if hit), None)


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class NetworkGuard:
    """Vets destinations against the internal-address rules and the allow-list."""

    def __init__(self, allow_hosts: Iterable[str] = (), *, resolver: Resolver | None = None) -> None:
        self._names: set[str] = set()
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow_hosts:
            self._add_allowed(entry)
        self._resolve = resolver or system_resolver

    def _add_allowed(self, entry: str) -> None:
        entry = entry.strip().strip("[]").lower().rstrip(".")
        if not entry:
            return
        try:
            self._networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            self._names.add(entry)

    def _ip_allowed(self, ip: IPAddress) -> bool:
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c.version == net.version and c in net for c in candidates for net in self._networks)

    def check(self, host: str, port: int = 443) -> list[str]:
        """The vetted addresses of ``host``; raises :class:`EgressRefused` if any is internal.

        A host whose name is allow-listed is not vetted. Otherwise every address the
        host resolves to must be global or allow-listed (one internal address refuses
        the host: that is how DNS-based tricks mix them).
        """
        host = host.strip().strip("[]").lower()
        if not host:
            raise EgressRefused("the URL has no host")
        addresses = self._resolve_or_fail(host, port)
        if host.rstrip(".") in self._names:
            return addresses
        for address in addresses:
            self._vet(host, address)
        return addresses

    def _resolve_or_fail(self, host: str, port: int) -> list[str]:
        literal = _parse_ip(host)
        if literal is not None:
            return [str(literal)]
        try:
            addresses = list(self._resolve(host, port))
        except (OSError, UnicodeError) as exc:
            raise BackendUnavailable(f"cannot resolve {host}: {exc}") from None
        if not addresses:
            raise BackendUnavailable(f"cannot resolve {host}: no addresses")
        return addresses

    def _vet(self, host: str, address: str) -> None:
        ip = _parse_ip(address)
        if ip is None:
            raise EgressRefused(f"{host} resolved to {address!r}, which is not an IP address")
        problem = address_problem(ip)
        if problem is None or self._ip_allowed(ip):
            return
        if _parse_ip(host) is not None:
            article = "an" if problem[0] in "aeiou" else "a"
            where = f"{host} is {article} {problem} address"
        else:
            where = f"{host} resolves to {problem} address {address}"
        raise EgressRefused(f"{where}; list the host in UMI_TOOLS_ALLOW_HOSTS to allow it")


def check_host(host: str, allow_hosts: Iterable[str] = (), *, port: int = 443, resolver: Resolver | None = None) -> list[str]:
    """One-shot :meth:`NetworkGuard.check`: the vetted addresses or :class:`EgressRefused`."""
    return NetworkGuard(allow_hosts, resolver=resolver).check(host, port)


class GuardedNetworkBackend(httpcore.NetworkBackend):
    """An httpcore network backend that connects only to addresses the guard vetted."""

    def __init__(self, guard: NetworkGuard, inner: httpcore.NetworkBackend | None = None) -> None:
        self._guard = guard
        self._inner = inner or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        """Vet ``host``, then connect to the first of its vetted addresses that answers."""
        last_error: Exception | None = None
        for address in self._guard.check(host, port):
            try:
                return self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectError as exc:
                last_error = exc
        raise last_error or httpcore.ConnectError(f"no address to connect to for {host}")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        """Unix sockets are local by definition: always refused."""
        raise EgressRefused("unix-socket connections are not allowed")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` whose connection pool dials through :class:`GuardedNetworkBackend`."""

    def __init__(self, guard: NetworkGuard, *, limits: httpx.Limits | None = None, verify: bool = True) -> None:
        limits = limits or httpx.Limits(max_connections=50, max_keepalive_connections=10)
        super().__init__(verify=verify, trust_env=False, limits=limits)
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise ToolSetupError("this httpx version has no replaceable connection pool; cannot guard egress")
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedNetworkBackend(guard),
        )


def guarded_client(guard: NetworkGuard) -> httpx.Client:
    """An ``httpx.Client`` for tool calls: vetted connections, no redirects, no env proxies."""
    return httpx.Client(transport=GuardedTransport(guard), follow_redirects=False, trust_env=False)
