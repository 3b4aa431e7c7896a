"""SSRF guard: decide whether the downloader may connect to an IP address.

Default policy: only globally routable unicast addresses.  The verdict comes from an explicit
table, not from the ``ipaddress`` module's ``is_global``/``is_private`` flags, whose tables
change between Python versions (3.11 calls parts of 192.0.0.0/24 global, a range SSRF lists name
for a metadata endpoint).  Blocked: every range of the IANA IPv4 and IPv6 Special-Purpose
Address Registries (whatever its "globally reachable" column says: none of them serves images),
multicast, 240.0.0.0/4, and all IPv6 space outside 2000::/3 (the only block allocated for global
unicast, so the unallocated rest is refused too).

Addresses that embed an IPv4 address are judged by it where that is where the packets go:
IPv4-mapped ``::ffff:a.b.c.d`` (the same host), well-known NAT64 ``64:ff9b::a.b.c.d`` and 6to4
``2002:AABB:CCDD::/48``.  IPv4-compatible ``::a.b.c.d`` (deprecated; may still be tunnelled) and
local-use NAT64 ``64:ff9b:1::/48`` (the operator picks where the IPv4 sits) are always refused.

* ``allow_private_network`` admits loopback and private ranges (10/8, 172.16/12, 192.168/16,
  100.64/10, fc00::/7, and their embedded forms) for crawling a local mirror; link-local
  addresses (the 169.254.169.254 cloud metadata endpoint among them) and the rest stay blocked.
* ``allow_cidr`` admits exactly the given ranges, whatever they are (``169.254.0.0/16``
  included); an embedded IPv4 inside a named range is admitted too.

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
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Kinds that allow_private_network opens; every other kind only opens to --allow-cidr.
PRIVATE_KINDS = frozenset({"loopback", "private"})
EMBEDS_IPV4 = "embeds-ipv4"  # judged by the IPv4 address inside it

# (range, kind, what it is); the first match wins, so a range nested in another comes first.
_V4_RANGES = (
    ("0.0.0.0/8", "unspecified", "this network"),
    ("10.0.0.0/8", "private", "private-use"),
    ("100.64.0.0/10", "private", "shared address space"),
    ("127.0.0.0/8", "loopback", "loopback"),
    ("169.254.0.0/16", "link-local", "link-local, cloud metadata"),
    ("172.16.0.0/12", "private", "private-use"),
    ("192.0.0.0/24", "reserved", "IETF protocol assignments"),
    ("192.0.2.0/24", "reserved", "documentation"),
    ("192.31.196.0/24", "reserved", "AS112-v4"),
    ("192.52.193.0/24", "reserved", "AMT"),
    ("192.88.99.0/24", "reserved", "6to4 relay anycast"),
    ("192.168.0.0/16", "private", "private-use"),
    ("192.175.48.0/24", "reserved", "AS112 direct delegation"),
    ("198.18.0.0/15", "reserved", "benchmarking"),
    ("198.51.100.0/24", "reserved", "documentation"),
    ("203.0.113.0/24", "reserved", "documentation"),
    ("224.0.0.0/4", "multicast", "multicast"),
    ("255.255.255.255/32", "reserved", "limited broadcast"),
    ("240.0.0.0/4", "reserved", "reserved for future use"),
)
_V6_RANGES = (
    ("::/128", "unspecified", "unspecified"),
    ("::1/128", "loopback", "loopback"),
    ("::ffff:0:0/96", EMBEDS_IPV4, "IPv4-mapped"),
    ("::/96", "reserved", "IPv4-compatible (deprecated)"),
    ("64:ff9b::/96", EMBEDS_IPV4, "NAT64"),
    ("64:ff9b:1::/48", "reserved", "local-use NAT64"),
    ("100::/64", "reserved", "discard-only"),
    ("100:0:0:1::/64", "reserved", "dummy prefix"),
    ("2001::/23", "reserved", "IETF protocol assignments (Teredo, ORCHID, AMT, AS112, ...)"),
    ("2001:db8::/32", "reserved", "documentation"),
    ("2002::/16", EMBEDS_IPV4, "6to4"),
    ("2620:4f:8000::/48", "reserved", "AS112 direct delegation"),
    ("3fff::/20", "reserved", "documentation"),
    ("5f00::/16", "reserved", "SRv6 SIDs"),
    ("fc00::/7", "private", "unique-local"),
    ("fe80::/10", "link-local", "link-local"),
    ("fec0::/10", "reserved", "site-local (deprecated)"),
    ("ff00::/8", "multicast", "multicast"),
)
# the range's text is kept as written: str() of an IPv6 network consults ipv4_mapped on 3.13+
_TABLE = tuple((ipaddress.ip_network(net), kind, what, net)
               for net, kind, what in _V4_RANGES + _V6_RANGES)
_V6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")


def _lookup(ip: IPAddress) -> tuple[Network, str, str, str] | None:
    for row in _TABLE:
        if row[0].version == ip.version and ip in row[0]:
            return row
    return None


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 destination inside an IPv4-mapped, well-known NAT64 or 6to4 address."""
    hit = _lookup(ip) if ip.version == 6 else None
    if hit is None or hit[1] != EMBEDS_IPV4:
        return None
    shift = 80 if hit[0].prefixlen == 16 else 0  # 6to4 puts it right after 2002::/16
    return ipaddress.IPv4Address((int(ip) >> shift) & 0xFFFFFFFF)


def classify(ip: IPAddress) -> tuple[str, str] | None:
    """(kind, what) of a non-global address, None for a global unicast one; no flags applied."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        got = classify(inner)
        return None if got is None else (got[0], f"{got[1]}, as {_lookup(ip)[2]} of {inner}")
    hit = _lookup(ip)
    if hit is not None:
        return hit[1], f"{hit[2]}, {hit[3]}"
    if ip.version == 6 and ip not in _V6_GLOBAL_UNICAST:
        return "reserved", "outside 2000::/3 global unicast"
    return None


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

    def verdict(self, address: str) -> tuple[str, str] | None:
        """None if connecting to ``address`` is allowed, else (kind, what) of its range."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        inner = embedded_ipv4(ip)
        if any(a in net for net in self._nets for a in (ip, inner)
               if a is not None and net.version == a.version):
            return None
        got = classify(ip)
        if got is not None and self.allow_private_network and got[0] in PRIVATE_KINDS:
            return None
        return got

    def why_blocked(self, address: str) -> str | None:
        """None if connecting to ``address`` is allowed, else the kind of its range."""
        got = self.verdict(address)
        return None if got is None else got[0]

    def check(self, address: str, host: str) -> None:
        got = self.verdict(address)
        if got is not None:
            raise Drop("blocked_address", f"{host} -> {address} is {got[0]} ({got[1]})",
                       retryable=False)


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
