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
    # nothing hangs: the slowest fault is bounded by the deadline (x attempts, + backoff)
    assert elapsed < 2 * cfg.timeout_total + 3
    rotated = results["exif_rotated"]
    assert rotated.original_height > rotated.original_width  # displayed upright (portrait)


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
