"""robots.txt, fetched once per origin in each download actor and honoured before any image
request to that origin (``respect_robots_txt``, on by default).

The fetch goes through the Fetcher's guarded session (the SSRF guard checks every hop, the
resolver connects to exactly the address it checked), holds a :class:`HostGate` ticket like any
request (so it counts against the host's cap, rate and back-off), follows up to
``max_redirects`` hops, reads at most ``robots_max_bytes`` (the rest is ignored, as Google does
past 500 KiB) and must finish within ``robots_timeout``.  Rules are matched with
``urllib.robotparser`` for our user agent's product token (``align-ray``), falling back to
``User-agent: *``; note that it applies the first matching rule, not RFC 9309's longest match.

What an answer means (RFC 9309, section 2.3.1):

* 200: the rules.  A row they forbid is dropped ``robots_txt`` (not retryable), no request made.
* 4xx other than 429 (404, 401, 403, ...), or more than ``max_redirects`` hops: no rules,
  everything allowed.
* 429, 5xx, a timeout or a connection failure: "unreachable", so everything is disallowed for
  now: the origin's rows are dropped ``robots_txt_error`` (retryable, so ``--retry-failed``
  asks again), and the answer is remembered for ``host_pause_s`` before robots.txt is asked
  again (Google treats 5xx as disallow-all for a while the same way).
* a refusal that would also refuse the image (SSRF guard, DNS failure, bad URL): no rules; the
  image request then fails with its own reason (``blocked_address``, ...) without a connection.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from urllib.robotparser import RobotFileParser

import aiohttp
from yarl import URL

from align_ray.data.config import DataConfig
from align_ray.data.errors import Drop
from align_ray.data.fetcher import _REDIRECTS, Fetcher
from align_ray.data.hostgate import HostGate

MAX_ORIGINS = 100_000   # cached origins per actor (least recently used ones are forgotten)


class _Rules:
    __slots__ = ("parser", "error", "expires")

    def __init__(self, parser: RobotFileParser | None = None, error: str = "",
                 expires: float = float("inf")) -> None:
        self.parser, self.error, self.expires = parser, error, expires


ALLOW_ALL = _Rules()


class RobotsCache:
    def __init__(self, cfg: DataConfig, fetcher: Fetcher, gate: HostGate) -> None:
        self.cfg, self.fetcher, self.gate = cfg, fetcher, gate
        self.agent = cfg.user_agent
        self._origins: OrderedDict[str, asyncio.Task] = OrderedDict()
        self.fetches = 0   # robots.txt requests made (for tests and stats)

    async def check(self, url: URL, host: str, gated: bool = True) -> None:
        """Raise ``Drop("robots_txt")`` if the origin's robots.txt forbids ``url`` for us, or
        ``Drop("robots_txt_error")`` if it could not be read (retryable)."""
        origin = str(url.origin())   # scheme://host[:port], IPv6 literals bracketed
        task = self._origins.get(origin)
        if task is not None and task.done() and not task.cancelled() \
                and task.exception() is None and task.result().expires <= _now():
            task = None   # an "unreachable" answer has expired: ask again
        if task is None:
            task = asyncio.ensure_future(self._load(origin, host, gated))
            self._origins[origin] = task
            while len(self._origins) > MAX_ORIGINS:
                self._origins.popitem(last=False)
        else:
            self._origins.move_to_end(origin)
        try:
            rules = await asyncio.shield(task)
        except Drop:   # host_backoff while waiting for the host: not an answer, do not keep it
            if self._origins.get(origin) is task:
                del self._origins[origin]
            raise
        if rules.error:
            raise Drop("robots_txt_error", rules.error, retryable=True)
        if rules.parser is not None and not rules.parser.can_fetch(self.agent, str(url)):
            raise Drop("robots_txt", f"{origin}/robots.txt disallows {url.path_qs}",
                       retryable=False)

    async def _load(self, origin: str, host: str, gated: bool) -> _Rules:
        ticket = await self.gate.enter(host) if gated else None
        try:
            self.fetches += 1
            return await asyncio.wait_for(self._get(origin + "/robots.txt"),
                                          self.cfg.robots_timeout)
        except asyncio.TimeoutError:
            return self._unreachable(f"robots.txt: no answer within {self.cfg.robots_timeout}s")
        except Drop as d:
            if d.retryable:
                return self._unreachable(f"robots.txt: {d.reason} {d.detail}".strip())
            return ALLOW_ALL
        finally:
            if ticket is not None:
                ticket.leave()

    def _unreachable(self, why: str) -> _Rules:
        return _Rules(error=why + " (disallow all for now)",
                      expires=_now() + self.cfg.host_pause_s)

    async def _get(self, url: str) -> _Rules:
        f = self.fetcher
        seen, current = {url}, url
        for _ in range(self.cfg.max_redirects + 1):
            target = f._parse(current)
            try:
                async with f.session.get(target, allow_redirects=False,
                                         headers={"Accept": "text/plain, */*;q=0.5"}) as resp:
                    if resp.status in _REDIRECTS:
                        current = f._next_hop(target, resp, seen)
                        continue
                    if resp.status == 200:
                        return _parse(await _read_capped(resp, self.cfg.robots_max_bytes))
                    if 400 <= resp.status < 500 and resp.status != 429:
                        return ALLOW_ALL
                    raise Drop(f"http_{resp.status}", "", retryable=True)
            except Drop:
                raise
            except (aiohttp.ClientError, ConnectionError, OSError) as e:
                raise Drop("connection_error", f"{type(e).__name__}: {e}", retryable=True) from None
        return ALLOW_ALL   # too many redirects: RFC 9309 lets a crawler treat it as no rules


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size >= cap:
            break
    return b"".join(chunks)[:cap]


def _parse(body: bytes) -> _Rules:
    parser = RobotFileParser()
    parser.parse(body.decode("utf-8", errors="replace").splitlines())
    return _Rules(parser)


def _now() -> float:
    return asyncio.get_running_loop().time()
