"""Per-host politeness inside one download actor: a cap on requests in flight, a request rate,
and a back-off that a host's 429/503 answers impose on *every* URL of that host.

One ``HostGate`` per actor, used from its one asyncio loop (no locks needed).  A URL's task
calls :meth:`HostGate.enter` before it takes a global download slot, so rows waiting for a busy
or backing-off host hold no slot and other hosts keep their speed; the ``Ticket`` it gets is
held for the whole URL (every attempt and redirect hop, keyed by the host of the URL as given)
and given back before decoding.

* **Cap** (``max_per_host``): at most that many tickets of one host at a time.
* **Rate** (``max_host_rate``): a token bucket of capacity 1, i.e. request starts to one host
  are at least ``1 / max_host_rate`` seconds apart (every attempt counts, retries too).
* **Back-off**: a 429 or 503 sets the host's window to its ``Retry-After`` (or the exponential
  ``retry_backoff`` when it has none); until the window ends no request starts to that host,
  the failing URL's own retry included.  ``host_backoff_failures`` 429/503 answers in a row from
  a host (any other answer resets the count), or a ``Retry-After`` beyond ``max_retry_after``,
  pause the host for ``host_pause_s``: its waiting and later rows are dropped ``host_backoff``
  (retryable: ``--retry-failed`` tries them again), without a request.

Everything here is per actor: a host whose rows reach N actors sees up to N x the cap and
N x the rate, unless ``partition_by_host`` gives each host to one actor (README,
"Politeness").  Time is the loop's monotonic clock.
"""

from __future__ import annotations

import asyncio

from align_ray.data.config import DataConfig
from align_ray.data.errors import Drop

# answers that mean "you are too fast / I am overloaded": they back the whole host off
OVERLOAD = frozenset({"http_429", "http_503"})
# failures where no HTTP answer came: they neither back off nor reset the host's count
_NO_ANSWER = frozenset({"timeout_connect", "timeout_read", "timeout_total", "connection_error",
                        "truncated_body", "dns_error", "blocked_address", "invalid_url",
                        "unsupported_scheme", "tls_error"})


class _Host:
    __slots__ = ("sem", "users", "not_before", "strikes", "paused_until", "next_start")

    def __init__(self, cap: int) -> None:
        self.sem = asyncio.Semaphore(cap) if cap > 0 else None
        self.users = 0              # tickets held + tasks waiting for one (for eviction)
        self.not_before = 0.0       # back-off window: no request starts before this
        self.strikes = 0            # 429/503 answers in a row
        self.paused_until = 0.0     # paused: rows are dropped as host_backoff until then
        self.next_start = 0.0       # token bucket (capacity 1): earliest next request start


class Ticket:
    """One URL's right to talk to its host; ``leave`` (idempotent) hands it back."""

    def __init__(self, gate: HostGate, host: str, state: _Host) -> None:
        self.gate, self.host, self._state, self._held = gate, host, state, True

    async def ready(self, deadline: float | None = None) -> bool:
        """Wait out the host's back-off window and rate; False if that would pass ``deadline``.
        Raises ``Drop("host_backoff")`` when the host is paused."""
        return await self.gate._ready(self.host, self._state, deadline)

    def report(self, drop: Drop | None) -> None:
        """What one attempt came to (None: a response that is not an error)."""
        self.gate._report(self.host, self._state, drop)

    def leave(self) -> None:
        if self._held:
            self._held = False
            self.gate._leave(self.host, self._state)


class HostGate:
    def __init__(self, cfg: DataConfig) -> None:
        self.cap = cfg.max_per_host
        self.interval = 1.0 / cfg.max_host_rate if cfg.max_host_rate > 0 else 0.0
        self.pause_after = max(1, cfg.host_backoff_failures)
        self.pause_s = cfg.host_pause_s
        self.backoff = cfg.retry_backoff
        self.max_wait = cfg.max_retry_after
        self.hosts: dict[str, _Host] = {}
        self._entries = 0

    async def enter(self, host: str) -> Ticket:
        """Wait for a free place at ``host`` and for its window and rate; raises
        ``Drop("host_backoff")`` if the host is or becomes paused meanwhile."""
        self._entries += 1
        if self._entries % 4096 == 0:
            self._sweep()
        state = self.hosts.get(host)
        if state is None:
            state = self.hosts[host] = _Host(self.cap)
        state.users += 1
        try:
            if state.sem is not None:
                await state.sem.acquire()
        except BaseException:
            state.users -= 1
            raise
        ticket = Ticket(self, host, state)
        try:
            await self._ready(host, state, None)
        except BaseException:
            ticket.leave()
            raise
        return ticket

    async def _ready(self, host: str, state: _Host, deadline: float | None) -> bool:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if state.paused_until > now:
                raise Drop("host_backoff", f"{host} paused after repeated 429/503 answers "
                           f"(for {self.pause_s:.0f}s)", retryable=True)
            if state.not_before > now:
                if deadline is not None and state.not_before >= deadline:
                    return False
                await asyncio.sleep(state.not_before - now)
                continue
            if self.interval and state.next_start > now:
                if deadline is not None and state.next_start >= deadline:
                    return False
                # no reservation: whoever wakes first takes the token, the others wait again,
                # so a stalled loop never releases a burst (at most `cap` tasks wait here)
                await asyncio.sleep(state.next_start - now)
                continue
            state.next_start = now + self.interval
            return True

    def _report(self, host: str, state: _Host, drop: Drop | None) -> None:
        if drop is None or (drop.reason not in OVERLOAD and drop.reason not in _NO_ANSWER):
            state.strikes = 0
            return
        if drop.reason not in OVERLOAD:
            return
        now = _now()
        state.strikes += 1
        wait = getattr(drop, "retry_after", None)
        if wait is None:
            wait = self.backoff * (2 ** min(state.strikes - 1, 10))
        if state.strikes >= self.pause_after or wait > self.max_wait:
            self._pause(state, now)
        else:
            state.not_before = max(state.not_before, now + wait)

    def _pause(self, state: _Host, now: float) -> None:
        state.paused_until = now + self.pause_s
        state.not_before = max(state.not_before, state.paused_until)
        state.strikes = 0

    def _leave(self, host: str, state: _Host) -> None:
        if state.sem is not None:
            state.sem.release()
        state.users -= 1

    def _sweep(self) -> None:
        """Forget hosts with nothing left to remember (keeps memory bounded on big crawls)."""
        now = _now()
        for host in [h for h, s in self.hosts.items()
                     if s.users == 0 and s.strikes == 0
                     and max(s.not_before, s.paused_until, s.next_start) <= now]:
            del self.hosts[host]


def _now() -> float:
    return asyncio.get_running_loop().time()
