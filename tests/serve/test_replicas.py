"""The Router's call wrapper (align_ray/serve/replicas.py): the retry on a lost replica and the
timeout that bounds the whole call.

The handle here is a stand-in with DeploymentHandle's two methods the wrapper uses
(``.remote()`` and the response's ``.cancel()``), so the timing is exact; the same paths run
against real replicas on a real cluster in tests/multinode/test_serve.py (a node killed under
load), where one failing run is too slow to show *which* attempt overran.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.exceptions import ActorDiedError

from align_ray.serve.replicas import Unavailable, call


class Handle:
    """``.remote()`` answers from a script: each attempt sleeps, then returns or raises."""

    def __init__(self, *script: tuple[float, object]):
        self.script, self.calls, self.cancelled = list(script), 0, 0

    def remote(self, *args):
        delay, outcome = self.script[self.calls]
        self.calls += 1
        handle = self

        class Response:
            def __await__(self):
                return self._run().__await__()

            async def _run(self):
                await asyncio.sleep(delay)
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome

            def cancel(self):
                handle.cancelled += 1
        return Response()


def run(handle: Handle, timeout_s: float):
    return asyncio.run(call(handle, "x", what="text encoder", timeout_s=timeout_s))


def test_a_lost_replica_is_retried_once():
    h = Handle((0.0, ActorDiedError()), (0.0, "ok"))
    assert run(h, 1.0) == "ok" and h.calls == 2


def test_two_losses_are_a_503():
    h = Handle((0.0, ActorDiedError()), (0.0, ActorDiedError()))
    with pytest.raises(Unavailable) as e:
        run(h, 1.0)
    assert e.value.status == 503 and "replica lost" in str(e.value)


def test_the_timeout_bounds_the_call_retry_included():
    # the first attempt fails late (its node died mid-call), the retry's replica never answers:
    # the client must hear 503 at the configured timeout, not at the late failure + a timeout
    h = Handle((0.8, ActorDiedError()), (60.0, "never"))
    t = time.monotonic()
    with pytest.raises(Unavailable) as e:
        run(h, 1.0)
    took = time.monotonic() - t
    assert "did not answer within 1 s" in str(e.value)
    assert took < 1.4, took
    assert h.calls == 2 and h.cancelled == 1


def test_a_slow_answer_inside_the_timeout_is_returned():
    h = Handle((0.3, "ok"))
    assert run(h, 1.0) == "ok" and h.cancelled == 0
