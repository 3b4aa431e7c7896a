"""SSRF guard: decide whether the downloader may connect to an IP address.

Default policy: only globally routable unicast addresses.  Loopback, private (RFC 1918, ULA),
link-local (incl. the 169.254.169.254 cloud metadata endpoint), multicast, reserved, shared
(100.64/10), documentation and unspecified addresses are refused.

* ``allow_private_network`` admits loopback and private ranges (for crawling a local mirror);
  link-local / metadata addresses stay blocked.
* ``allow_cidr`` admits exactly the given ranges, whatever they are (``169.254.0.0/16`` included).

The guard is applied to the *resolved* address of every hop (redirects included) by
:class:`GuardedResolver`, and the connector connects to exactly the addresses that resolver
returned, so there is no second DNS lookup an attacker could race (DNS rebinding).  IP-literal
hosts never reach a resolver in aiohttp, so :func:`check_host` covers them before each request.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from align_ray.data.errors import Drop

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_PRIVATE_NETS = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
]


def _canonical(ip: IPAddress) -> IPAddress:
    """Map IPv4-mapped/compatible IPv6 (``::ffff:127.0.0.1``) to plain IPv4 before judging."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


@dataclass(frozen=True)
class AddressPolicy:
    allow_cidr: tuple[str, ...] = ()
    allow_private_network: bool = False
    _nets: tuple = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        try:
            nets = tuple(ipaddress.ip_network(c, strict=False) for c in self.allow_cidr)
        except ValueError as e:
            raise ValueError(f"invalid --allow-cidr value: {e}") from None
        object.__setattr__(self, "_nets", nets)

    def why_blocked(self, address: str) -> str | None:
        """None if connecting to ``address`` is allowed, else the name of the blocked class."""
        ip = _canonical(ipaddress.ip_address(address.split("%", 1)[0]))
        if any(ip in net for net in self._nets if net.version == ip.version):
            return None
        if ip.is_unspecified:
            return "unspecified"
        if ip.is_multicast:
            return "multicast"
        if ip.is_link_local:
            return "link-local"  # 169.254.169.254 lives here: never opened by allow_private_network
        if ip.is_loopback:
            return None if self.allow_private_network else "loopback"
        if any(ip in net for net in _PRIVATE_NETS if net.version == ip.version):
            return None if self.allow_private_network else "private"
        if not ip.is_global or ip.is_reserved:
            return "reserved"
        return None

    def check(self, address: str, host: str) -> None:
        why = self.why_blocked(address)
        if why is not None:
            raise Drop("blocked_address", f"{host} -> {address} is {why}", retryable=False)


def ip_literal(host: str) -> str | None:
    """The address if ``host`` is an IP literal (brackets stripped), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


def check_host(policy: AddressPolicy, host: str) -> None:
    """Guard IP-literal hosts (which aiohttp connects to without asking the resolver)."""
    addr = ip_literal(host)
    if addr is not None:
        policy.check(addr, host)


class GuardedResolver(AbstractResolver):
    """Resolve, then keep only addresses the policy admits; raise a Drop if none is left.

    ``overrides`` maps host names to fixed addresses (like ``curl --resolve``); tests use it to
    point a name at 10.0.0.1 or 169.254.169.254 without any real DNS.
    """

    def __init__(self, policy: AddressPolicy, overrides: dict[str, str] | None = None,
                 base: AbstractResolver | None = None):
        self.policy = policy
        self.overrides = {k.lower(): v for k, v in (overrides or {}).items()}
        self.base = base or ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        fixed = self.overrides.get(host.lower().rstrip("."))
        if fixed is not None:
            fam = socket.AF_INET6 if ":" in fixed else socket.AF_INET
            results: Iterable[ResolveResult] = [ResolveResult(
                hostname=host, host=fixed, port=port, family=fam, proto=0,
                flags=socket.AI_NUMERICHOST)]
        else:
            try:
                results = await self.base.resolve(host, port, family)
            except OSError as e:
                raise Drop("dns_error", f"{host}: {e}", retryable=False) from None
        allowed, refused = [], []
        for r in results:
            (refused if self.policy.why_blocked(r["host"]) else allowed).append(r)
        if not allowed:
            self.policy.check(refused[0]["host"], host)  # raises with the reason
        return allowed

    async def close(self) -> None:
        await self.base.close()
