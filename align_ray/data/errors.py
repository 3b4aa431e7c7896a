"""Why a row was dropped.  Every dropped row carries one of these reasons (and a free-text detail)."""

from __future__ import annotations


class Drop(Exception):
    """Raised anywhere in the per-row path; turned into a dropped row, never into a crash."""

    def __init__(self, reason: str, detail: str = "", retryable: bool | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retryable = reason in RETRYABLE if retryable is None else retryable


class InputError(Exception):
    """The input URL list itself is unusable (missing column, empty file, bad encoding...)."""


# Reasons a later `--retry-failed` run re-attempts: transient by nature.
RETRYABLE = frozenset(
    {
        "timeout_connect",
        "timeout_read",
        "timeout_total",
        "connection_error",
        "http_429",
        "http_500",
        "http_502",
        "http_503",
        "http_504",
        "truncated_body",
        "host_backoff",        # the host was paused after repeated 429/503 answers
        "robots_txt_error",    # robots.txt unreachable (5xx, 429, timeout): disallowed for now
    }
)
