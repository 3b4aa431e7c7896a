"""The polite part of a download, in the order it is checked for every row, before the row
takes a download slot:

1. opt-out lists (``optout_url``, ``optout_domain``; :mod:`align_ray.data.blocklist`);
2. robots.txt of the URL's origin (``robots_txt``, ``robots_txt_error``;
   :mod:`align_ray.data.robots`);
3. the host's gate: cap, rate, back-off and pause (``host_backoff``;
   :mod:`align_ray.data.hostgate`), whose ticket the fetch then holds;

and, after the download, the hash opt-out list (``optout_hash``).  A row any of these refuses
is dropped with that reason and no image request is made for it.  Every redirect target is
checked against 1 and 2 as well before it is requested (the hop's request still counts against
the first host's gate).  All state is per download actor.  A URL that does not parse is let
through: the fetcher gives it its usual reason.
"""

from __future__ import annotations

from yarl import URL

from align_ray.data.blocklist import Blocklists, normalize_host
from align_ray.data.config import DataConfig
from align_ray.data.fetcher import Fetcher
from align_ray.data.hostgate import HostGate, Ticket
from align_ray.data.robots import RobotsCache


class Politeness:
    def __init__(self, cfg: DataConfig, fetcher: Fetcher) -> None:
        self.gate = HostGate(cfg)
        self.blocklists = Blocklists(cfg)
        self.robots = RobotsCache(cfg, fetcher, self.gate) if cfg.respect_robots_txt else None
        fetcher.hop_check = self.check_hop

    async def admit(self, url: str) -> Ticket | None:
        """Raise the row's Drop, or return the host ticket the fetch must hold (None when the
        URL does not parse; the fetcher then refuses it with its own reason)."""
        host = await self.check_hop(url, gated=True)
        return None if host is None else await self.gate.enter(host)

    async def check_hop(self, url: str, gated: bool = False) -> str | None:
        """The opt-out lists and robots.txt for ``url``: raise its Drop, else return its host
        (None when it does not parse).  A redirect hop's robots.txt is fetched without waiting
        for its host's gate (``gated=False``): the row already holds its first host's ticket,
        and waiting for a second one could deadlock two hosts that redirect to each other."""
        try:
            target = URL(url)
        except (ValueError, TypeError):
            return None
        if target.scheme not in ("http", "https") or not target.raw_host:
            return None
        host = normalize_host(target.raw_host)
        self.blocklists.check_request(url, host)
        if self.robots is not None:
            await self.robots.check(target, host, gated)
        return host

    def check_content(self, sha256_hex: str, phash: int) -> None:
        if self.blocklists.checks_hashes:
            self.blocklists.check_content(sha256_hex, phash)
