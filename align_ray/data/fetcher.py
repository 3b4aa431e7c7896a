"""Async HTTP fetcher: connection reuse, SSRF-checked hops, timeouts and a per-URL deadline.

img2dataset's users hit endless/slow-drip bodies that hang a worker forever; here every URL is
bounded by one ``timeout_total`` deadline (every attempt, redirect hop, header wait, body read and
backoff sleep together, so a URL holds its download slot for at most that long), each socket
read by ``timeout_read``, and the body by ``max_bytes`` (counted after gzip/deflate is undone, so
a compression bomb cannot get past it).  Redirects are followed by hand so that every hop passes
the SSRF guard.  Retries (with exponential backoff, or the server's ``Retry-After``) happen only
for failures that can be transient, and only while the deadline leaves room for the wait.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import aiohttp
from yarl import URL

from align_ray.data.config import DataConfig
from align_ray.data.errors import Drop
from align_ray.data.hostgate import Ticket
from align_ray.data.ssrf import AddressPolicy, GuardedResolver, check_host

_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass
class Fetched:
    body: bytes
    final_url: str
    content_type: str


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _annotated(drop: Drop, note: str) -> Drop:
    """``drop``'s reason and retryability, with ``note`` added to its detail."""
    return Drop(drop.reason, f"{drop.detail}; {note}" if drop.detail else note, drop.retryable)


def _status_drop(resp: aiohttp.ClientResponse) -> Drop:
    drop = Drop(f"http_{resp.status}", resp.reason or "")
    drop.retry_after = _retry_after(resp.headers.get("Retry-After"))
    return drop


class Fetcher:
    """One per download actor; must be created and used inside a running event loop."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.policy = AddressPolicy(tuple(cfg.allow_cidr), cfg.allow_private_network)
        self.disallow = {t.lower() for t in cfg.robots_disallow}
        # called with every redirect target before it is requested; raises the row's Drop to
        # refuse it (the download stage's politeness: robots.txt and the opt-out lists)
        self.hop_check: Callable[[str], Awaitable[None]] | None = None
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.policy, cfg.resolve),
            limit=cfg.threads, limit_per_host=0, ttl_dns_cache=300,
            ssl=None if cfg.verify_tls else False, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeout_connect,
                                          sock_read=cfg.timeout_read),
            trust_env=False,          # an env proxy would bypass the SSRF guard
            auto_decompress=True)

    async def close(self) -> None:
        await self.session.close()

    async def fetch(self, url: str, ticket: Ticket | None = None) -> Fetched:
        """Fetch ``url`` or raise :class:`Drop`; retries retryable failures within one deadline.

        The deadline is ``timeout_total`` after the call, for the URL as a whole; no retry is
        started, and no backoff slept, that would end at or after it.  The row's reason is the
        last failure an attempt came to by itself: a retry cut short by the deadline, or not
        started because its wait would pass it, adds nothing new, and the detail says so.  Only
        when the deadline ends the first attempt is the reason ``timeout_total``.  A URL's reason
        thus depends on how its server behaves, not on ``retries`` or the backoff schedule.

        ``ticket`` (the URL's host gate, :mod:`align_ray.data.hostgate`) hears what every
        attempt came to, and a retry waits for the host's back-off window and rate too.
        """
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.timeout_total
        last: Drop | None = None
        for attempt in range(cfg.retries + 1):
            if attempt and ticket is not None and not await ticket.ready(deadline):
                raise _annotated(last, "not retried: the host's back-off would pass "
                                       f"timeout_total ({cfg.timeout_total}s)")
            try:
                # wait_for, not asyncio.timeout: requires-python still admits 3.10
                got = await asyncio.wait_for(self._fetch_once(url),
                                             max(0.0, deadline - loop.time()))
            except Drop as d:
                drop = d
                if ticket is not None:
                    ticket.report(d)
            except asyncio.TimeoutError:
                # only the deadline gets here: _fetch_once turns aiohttp's own timeouts into Drops
                if last is None:
                    raise Drop("timeout_total",
                               f"no complete response within {cfg.timeout_total}s") from None
                raise _annotated(last, f"retry {attempt} cut short by timeout_total "
                                       f"({cfg.timeout_total}s)") from None
            else:
                if ticket is not None:
                    ticket.report(None)
                return got
            if not drop.retryable or attempt == cfg.retries:
                raise drop
            wait = getattr(drop, "retry_after", None)
            if wait is None:
                wait = cfg.retry_backoff * (2 ** attempt)
            elif wait > cfg.max_retry_after:
                raise Drop(drop.reason, f"Retry-After {wait:.0f}s exceeds max_retry_after",
                           drop.retryable)
            if loop.time() + wait >= deadline:
                raise _annotated(drop, f"not retried: a {wait:.1f}s wait would pass "
                                       f"timeout_total ({cfg.timeout_total}s)")
            last = drop
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _fetch_once(self, url: str) -> Fetched:
        seen = {url}
        current = url
        for hop in range(self.cfg.max_redirects + 1):
            target = self._parse(current)
            if hop and self.hop_check is not None:
                await self.hop_check(current)
            try:
                async with self.session.get(target, allow_redirects=False) as resp:
                    if resp.status not in _REDIRECTS:
                        return await self._read(resp, current)
                    current = self._next_hop(target, resp, seen)
            except Drop:
                raise
            except aiohttp.ConnectionTimeoutError as e:
                raise Drop("timeout_connect", str(e)) from None
            except aiohttp.SocketTimeoutError as e:
                raise Drop("timeout_read", str(e) or "read timed out") from None
            except aiohttp.ClientPayloadError as e:
                raise Drop("truncated_body", str(e)) from None
            except aiohttp.ClientConnectorCertificateError as e:
                raise Drop("tls_error", str(e), retryable=False) from None
            except (aiohttp.ClientConnectionError, ConnectionError) as e:
                raise Drop("connection_error", f"{type(e).__name__}: {e}") from None
            except aiohttp.ClientResponseError as e:   # malformed status line / headers
                raise Drop("bad_response", str(e)) from None
            except (aiohttp.InvalidURL, ValueError) as e:
                raise Drop("invalid_url", str(e)) from None
        raise Drop("too_many_redirects", f"more than {self.cfg.max_redirects} hops")

    def _parse(self, url: str) -> URL:
        try:
            target = URL(url)
        except (ValueError, TypeError) as e:
            raise Drop("invalid_url", str(e)) from None
        if target.scheme not in ("http", "https"):
            raise Drop("unsupported_scheme", target.scheme or "(none)")
        if not target.host:
            raise Drop("invalid_url", "no host")
        check_host(self.policy, target.host)
        return target

    def _next_hop(self, target: URL, resp: aiohttp.ClientResponse, seen: set[str]) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise Drop("bad_redirect", f"{resp.status} without Location")
        try:
            nxt = str(target.join(URL(location)))
        except ValueError as e:
            raise Drop("bad_redirect", str(e)) from None
        if nxt in seen:
            raise Drop("redirect_loop", nxt)
        seen.add(nxt)
        return nxt

    async def _read(self, resp: aiohttp.ClientResponse, url: str) -> Fetched:
        if resp.status != 200:
            raise _status_drop(resp)
        tags = ",".join(resp.headers.getall("X-Robots-Tag", ())).lower()
        hit = {t.strip().split(":")[-1].strip() for t in tags.replace(";", ",").split(",")}
        if hit & self.disallow:
            raise Drop("robots_disallowed", f"X-Robots-Tag: {tags}", retryable=False)
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype in ("text/html", "application/xhtml+xml"):
            raise Drop("not_an_image", f"Content-Type {ctype}", retryable=False)
        if resp.content_length is not None and resp.content_length > self.cfg.max_bytes:
            raise Drop("too_large", f"Content-Length {resp.content_length} > {self.cfg.max_bytes}")
        chunks, size = [], 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > self.cfg.max_bytes:
                raise Drop("too_large", f"body exceeds {self.cfg.max_bytes} bytes")
            chunks.append(chunk)
        return Fetched(b"".join(chunks), url, ctype)
