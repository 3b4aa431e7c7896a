"""The Router's calls to its encoder and shard deployments, when a replica is lost.

A node that dies (a crash, a spot reclaim) takes its replicas with it.  Serve starts new ones
elsewhere, but the requests already sent to the lost replica fail, and so do new ones that Serve
routes there before it learns of the loss.  Without this module such a request surfaced as an
unhandled exception: a 500, or a client that waits for ever on a call nobody will answer.

* A call that fails because its replica died or cannot be reached is sent again, once: every
  call made here (embed a batch, search a shard) is a pure function of its arguments, so a
  retry cannot do anything twice.
* If the retry fails too, or Serve refuses the call because every replica's queue is full
  (back-pressure), the client gets **503** with ``Retry-After``: a status, fast, never a 500.
* A call that takes longer than ``timeout_s`` (a replica on a node that is dying but not yet
  declared dead can stop answering without failing) is cancelled and answered 503 as well.
  ``timeout_s`` bounds the whole call, retry included: a first attempt that fails late must not
  give the retry a fresh budget, or the client waits up to twice the timeout it configured.

Why not in Serve itself: Serve's handles do not retry a request whose replica died mid-call,
and the proxy cannot tell a lost replica from a bug in our code; only the caller knows that the
call is safe to repeat.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from align_ray.serve.schemas import APIError

log = logging.getLogger(__name__)

LOST = (ActorDiedError, ActorUnavailableError, RayActorError)
RETRY_AFTER_S = 1


class Unavailable(APIError):
    """503 with a Retry-After header (the Router's APIError handler adds it)."""

    retry_after = RETRY_AFTER_S

    def __init__(self, message: str):
        super().__init__(503, message)


async def call(method: Any, *args: Any, what: str, timeout_s: float) -> Any:
    """``await method.remote(*args)`` (a DeploymentHandle method), retried once on a lost
    replica; 503 (:class:`Unavailable`) when it still fails, is refused, or the whole call
    (retry included) outlasts ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    for attempt in (1, 2):
        response = method.remote(*args)
        try:
            left = deadline - asyncio.get_running_loop().time()
            return await asyncio.wait_for(_result(response), max(left, 0.0))
        except BackPressureError as e:
            raise Unavailable(f"{what} is overloaded (every replica's queue is full); "
                              "retry later") from e
        except asyncio.TimeoutError as e:
            response.cancel()
            raise Unavailable(f"{what} did not answer within {timeout_s:g} s (a replica may "
                              "be on a node that is going down); retry") from e
        except LOST as e:
            log.warning("%s: replica lost on attempt %d (%s)", what, attempt, type(e).__name__)
            if attempt == 2:
                raise Unavailable(f"{what} replica lost ({type(e).__name__}); Serve is "
                                  "starting a replacement, retry") from e
    raise AssertionError("unreachable")


async def _result(response: Any) -> Any:
    return await response
