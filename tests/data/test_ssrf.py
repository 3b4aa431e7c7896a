"""SSRF guard, tested at its decision point: no test lets a packet go anywhere but 127.0.0.0/8.

Every socket.connect in this process is recorded by an audit hook, so the tests can assert that
a blocked address was never even attempted (the guard decides before any connection)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from align_ray.data.config import DataConfig
from align_ray.data.errors import Drop
from align_ray.data.fetcher import Fetcher
from align_ray.data.ssrf import AddressPolicy, GuardedResolver

CONNECTS: list = []


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect":
        CONNECTS.append(args[1])


sys.addaudithook(_audit)


def fetch(url: str, **cfg_kwargs) -> tuple[object, list]:
    """Fetch ``url`` in-process; returns (Fetched or Drop, addresses connected to)."""
    cfg = DataConfig(retries=0, timeout_total=5, **cfg_kwargs)

    async def go():
        f = Fetcher(cfg)
        try:
            return await f.fetch(url)
        except Drop as d:
            return d
        finally:
            await f.close()

    CONNECTS.clear()
    out = asyncio.run(go())
    return out, [a[0] for a in CONNECTS if isinstance(a, tuple)]


@pytest.mark.parametrize("addr,default,private_ok", [
    ("8.8.8.8", None, None), ("127.0.0.1", "loopback", None), ("10.1.2.3", "private", None),
    ("172.16.0.1", "private", None), ("192.168.1.1", "private", None),
    ("169.254.169.254", "link-local", "link-local"), ("::1", "loopback", None),
    ("::ffff:10.0.0.1", "private", None), ("fe80::1", "link-local", "link-local"),
    ("224.0.0.1", "multicast", "multicast"), ("0.0.0.0", "unspecified", "unspecified"),
    ("100.64.0.1", "private", None), ("192.0.2.2", "reserved", "reserved"),
    ("2606:4700::1111", None, None),
])
def test_policy_classes(addr, default, private_ok):
    assert AddressPolicy().why_blocked(addr) == default
    assert AddressPolicy(allow_private_network=True).why_blocked(addr) == private_ok


def test_allow_cidr_admits_exactly_its_ranges():
    p = AddressPolicy(allow_cidr=("127.0.0.0/8", "169.254.169.254/32"))
    assert p.why_blocked("127.5.5.5") is None
    assert p.why_blocked("169.254.169.254") is None          # named explicitly: admitted
    assert p.why_blocked("169.254.169.253") == "link-local"
    assert p.why_blocked("10.0.0.1") == "private"
    with pytest.raises(ValueError, match="allow-cidr"):
        AddressPolicy(allow_cidr=("not-a-cidr",))


def test_resolver_filters_and_raises():
    async def go():
        r = GuardedResolver(AddressPolicy(), {"evil.test": "10.0.0.1"})
        with pytest.raises(Drop) as e:
            await r.resolve("evil.test", 80)
        return e.value
    drop = asyncio.run(go())
    assert drop.reason == "blocked_address" and "10.0.0.1" in drop.detail


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/a.jpg", "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:10.0.0.1]/x.jpg", "http://[fd00::1]/x.jpg",
])
def test_ip_literals_blocked_without_connecting(url):
    out, connects = fetch(url, allow_private_network=True if "169.254" in url else False)
    assert isinstance(out, Drop) and out.reason == "blocked_address", out
    assert connects == []


@pytest.mark.parametrize("target", ["10.0.0.1", "169.254.169.254", "127.0.0.1"])
def test_hostname_resolving_to_blocked_address(target):
    out, connects = fetch("http://internal.test/img.jpg", resolve={"internal.test": target})
    assert isinstance(out, Drop) and out.reason == "blocked_address"
    assert target in out.detail and connects == []


def test_metadata_stays_blocked_with_private_network_allowed():
    out, connects = fetch("http://meta.test/", resolve={"meta.test": "169.254.169.254"},
                          allow_private_network=True)
    assert isinstance(out, Drop) and out.reason == "blocked_address" and connects == []


def test_loopback_server_blocked_by_default_admitted_by_flags(web):
    port = web.base_url.rsplit(":", 1)[1]
    for url in (f"{web.base_url}/img/1.jpg", f"http://localhost:{port}/img/1.jpg",
                f"http://2130706433:{port}/img/1.jpg", f"http://[::ffff:127.0.0.1]:{port}/img/1.jpg"):
        out, connects = fetch(url)
        # yarl refuses the non-canonical decimal form outright; either way nothing connects
        assert isinstance(out, Drop) and out.reason in ("blocked_address", "invalid_url"), url
        assert connects == []
    for kwargs in ({"allow_cidr": ["127.0.0.0/8"]}, {"allow_private_network": True}):
        out, connects = fetch(f"{web.base_url}/img/1.jpg", **kwargs)
        assert not isinstance(out, Drop), out
        assert set(connects) == {"127.0.0.1"}


@pytest.mark.parametrize("fault,blocked", [
    ("redirect_private", "10.0.0.1"), ("redirect_metadata", "169.254.169.254"),
    ("redirect_host", "10.0.0.1"),
])
def test_redirect_to_blocked_address(web, fault, blocked):
    out, connects = fetch(f"{web.base_url}/fault/{fault}/1", allow_cidr=["127.0.0.0/8"],
                          resolve={"internal.test": "10.0.0.1"})
    assert isinstance(out, Drop) and out.reason == "blocked_address", out
    assert blocked in out.detail
    assert set(connects) == {"127.0.0.1"}  # only the first hop was connected to
