"""Every transport/decoding fault of the built-in noisy web, through the real fetch + decode
path, in-process against the real server on 127.0.0.1 (Ray-level accounting is in
test_pipeline.py)."""

from __future__ import annotations

import asyncio
import time


from align_ray.data.config import DataConfig
from align_ray.data.errors import Drop
from align_ray.data.fetcher import Fetcher
from align_ray.data.resizer import process_image
from align_ray.web.faults import EXPECTED_OUTCOME, FAULT_NAMES

# the reason each dropped fault must carry
EXPECTED_REASON = {
    "404": "http_404", "410": "http_410", "500": "http_500", "503": "http_503",
    "429": "http_429", "redirect_long": "too_many_redirects", "redirect_loop": "redirect_loop",
    "redirect_private": "blocked_address", "redirect_metadata": "blocked_address",
    "redirect_host": "blocked_address", "delay_headers": "timeout_read",
    "slow_drip": "timeout_total", "endless": "too_large", "too_large": "too_large",
    "too_large_chunked": "too_large", "html": "not_an_image", "html_as_jpeg": "not_an_image",
    "empty": "empty_body", "truncated_jpeg": "truncated_image",
    "short_content_length": "truncated_body", "garbage": "not_an_image",
    "png_bomb": "too_many_pixels", "unsupported": "unsupported_format",
    "noai": "robots_disallowed", "noimageai": "robots_disallowed",
}
# timeout_read is 5x the slow-drip interval (0.5 s) and timeout_total 2x timeout_read: on a loaded
# 2-core CI box a 1.5 s read timeout fired between two drips (CI, 2026-11-28), mislabelling slow_drip.
FAST = dict(timeout_total=5.0, timeout_read=2.5, retries=1, retry_backoff=0.1,
            allow_cidr=["127.0.0.0/8"], resolve={"internal.test": "10.0.0.1"},
            max_bytes=8 * 1024 * 1024, image_size=64)


def test_expected_reasons_cover_every_fault():
    drops = {n for n, o in EXPECTED_OUTCOME.items() if o == "drop"}
    assert drops == set(EXPECTED_REASON)


async def _outcome(fetcher: Fetcher, cfg: DataConfig, url: str):
    try:
        got = await fetcher.fetch(url)
        return process_image(got.body, cfg)
    except Drop as d:
        return d


def test_every_fault_kept_or_dropped_with_its_reason(web):
    cfg = DataConfig(**FAST)

    async def go():
        f = Fetcher(cfg)
        try:
            return await asyncio.gather(*(_outcome(f, cfg, f"{web.base_url}/fault/{n}/7")
                                          for n in FAULT_NAMES))
        finally:
            await f.close()

    t0 = time.time()
    results = dict(zip(FAULT_NAMES, asyncio.run(go())))
    elapsed = time.time() - t0
    wrong = {}
    for name, out in results.items():
        if EXPECTED_OUTCOME[name] == "ok":
            if isinstance(out, Drop):
                wrong[name] = out
        elif not isinstance(out, Drop) or out.reason != EXPECTED_REASON[name]:
            wrong[name] = out
    assert not wrong, wrong
    # nothing hangs: the slowest fault is bounded by one per-URL deadline, whatever the retries
    assert elapsed < cfg.timeout_total + 3
    rotated = results["exif_rotated"]
    assert rotated.original_height > rotated.original_width  # displayed upright (portrait)


async def _timed(fetcher: Fetcher, cfg: DataConfig, url: str):
    t0 = time.monotonic()
    out = await _outcome(fetcher, cfg, url)
    return out, time.monotonic() - t0


def _run_timed(cfg: DataConfig, urls: list[str]) -> tuple[list, list[int]]:
    """[(outcome, seconds)] per URL, fetched together, and the attempts each URL made."""
    attempts = [0] * len(urls)

    async def go():
        f = Fetcher(cfg)
        once = f._fetch_once

        async def counted(url):
            attempts[urls.index(url)] += 1
            return await once(url)

        f._fetch_once = counted
        try:
            return await asyncio.gather(*(_timed(f, cfg, u) for u in urls))
        finally:
            await f.close()

    return asyncio.run(go()), attempts


def test_timeout_total_is_one_deadline_per_url_across_retries(web):
    # timeout_total is retryable; were the deadline per attempt, each of these URLs would hold
    # its slot for three deadlines plus two backoffs.  timeout_read is above timeout_total so
    # only the total deadline can end them, during the first attempt: hence that reason.
    cfg = DataConfig(**{**FAST, "timeout_total": 2.0, "timeout_read": 2.5, "retries": 2,
                        "retry_backoff": 0.1})
    urls = [f"{web.base_url}/fault/slow_drip/{i}" for i in (11, 12, 13)]
    urls.append(f"{web.base_url}/fault/delay_headers/14?s=30")
    results, attempts = _run_timed(cfg, urls)
    for url, (out, seconds) in zip(urls, results):
        assert isinstance(out, Drop) and out.reason == "timeout_total", (url, out)
        assert cfg.timeout_total - 0.05 <= seconds < cfg.timeout_total + 1.0, (url, seconds)
    assert attempts == [1] * len(urls)


def test_no_retry_whose_wait_would_pass_the_deadline(web):
    cfg = DataConfig(**{**FAST, "timeout_total": 1.5, "retries": 5, "retry_backoff": 5.0,
                        "max_retry_after": 10.0})
    # 503: the 5 s backoff would pass the deadline, so the first answer is the outcome, at once.
    # 429 (Retry-After: 1 every time): attempt 2 runs at 1 s; a second 1 s wait would pass 1.5 s.
    urls = [f"{web.base_url}/fault/503/21", f"{web.base_url}/fault/429/22"]
    results, attempts = _run_timed(cfg, urls)
    (out503, t503), (out429, t429) = results
    assert isinstance(out503, Drop) and out503.reason == "http_503" and out503.retryable
    assert "not retried" in out503.detail and t503 < 1.0, (out503, t503)
    assert isinstance(out429, Drop) and out429.reason == "http_429" and out429.retryable
    assert "not retried" in out429.detail and 1.0 <= t429 < cfg.timeout_total, (out429, t429)
    assert attempts == [1, 2]


def test_retry_cut_short_by_the_deadline_keeps_the_earlier_reason(web):
    # attempt 1 ends on its own (timeout_read at 1 s); the retry, started at 1.1 s, is still
    # waiting for headers when the 1.5 s deadline passes, so the row keeps timeout_read.
    cfg = DataConfig(**{**FAST, "timeout_total": 1.5, "timeout_read": 1.0, "retries": 2,
                        "retry_backoff": 0.1})
    [(out, seconds)], attempts = _run_timed(cfg, [f"{web.base_url}/fault/delay_headers/31?s=30"])
    assert isinstance(out, Drop) and out.reason == "timeout_read", out
    assert "cut short by timeout_total" in out.detail, out.detail
    assert cfg.timeout_total - 0.05 <= seconds < cfg.timeout_total + 1.0 and attempts == [2]


def test_retry_after_and_retry_limits(web):
    cfg = DataConfig(**{**FAST, "retries": 0})

    async def go(name):
        f = Fetcher(cfg)
        try:
            return await _outcome(f, cfg, f"{web.base_url}/fault/{name}/901")
        finally:
            await f.close()

    out = asyncio.run(go("429once"))  # no retries allowed: the 429 is the outcome
    assert isinstance(out, Drop) and out.reason == "http_429" and out.retryable
    capped = DataConfig(**{**FAST, "max_retry_after": 0.5})

    async def go_capped():
        f = Fetcher(capped)
        try:
            return await _outcome(f, capped, f"{web.base_url}/fault/429/902")
        finally:
            await f.close()

    out = asyncio.run(go_capped())  # Retry-After 1 s > 0.5 s cap: give up at once
    assert isinstance(out, Drop) and "max_retry_after" in out.detail


def test_non_http_schemes_and_bad_urls(web):
    cfg = DataConfig(**FAST)

    async def go(url):
        f = Fetcher(cfg)
        try:
            return await _outcome(f, cfg, url)
        finally:
            await f.close()

    for url, reason in [("ftp://127.0.0.1/x.jpg", "unsupported_scheme"),
                        ("file:///etc/passwd", "unsupported_scheme"),
                        ("http:///nohost", "invalid_url"), ("not a url", "unsupported_scheme")]:
        out = asyncio.run(go(url))
        assert isinstance(out, Drop) and out.reason == reason, (url, out)
