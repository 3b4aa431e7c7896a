"""Per-host caps, rate, 429/503 back-off, robots.txt and opt-out lists, against real HTTP
servers on their own loopback addresses (tests/data/polite_server.py).  Most tests run the
download actor's own async path in-process (``ShardDownloader._download_all``); the last runs
the real stage on Ray and checks stats.json, dropped/ and ``--retry-failed``."""

from __future__ import annotations

import hashlib
import json
import time

import pyarrow as pa
import pytest

from align_ray.data import pipeline
from align_ray.data.config import DataConfig
from align_ray.data.downloader import ShardDownloader
from align_ray.data.errors import RETRYABLE
from align_ray.data.resizer import process_image
from tests.data.polite_server import Host, jpeg
from tests.data.test_fetcher import FAST
from tests.data.test_pipeline import accounting


def download(tmp_path, urls: list[str], **kw) -> tuple[dict, dict, ShardDownloader, float]:
    """key -> sample, key -> (reason, retryable, detail), the downloader, seconds."""
    cfg = DataConfig(output=str(tmp_path / "out"), **{**FAST, **kw})
    dl = ShardDownloader(cfg)
    rows = pa.table({"key": [f"k{i:04d}" for i in range(len(urls))], "url": urls,
                     "text": [f"t{i}" for i in range(len(urls))]})
    t0 = time.monotonic()
    try:
        result, _ = dl._run(dl._download_all(rows, None))
    finally:
        seconds = time.monotonic() - t0
        dl._run(dl.fetcher.close())   # its loop thread stays (a daemon), as in an actor
        dl.pool.shutdown()
    samples = dict(zip(result.samples["key"], result.samples["url"]))
    dropped = {k: (r, k_retry, d) for k, r, k_retry, d in zip(
        result.dropped["key"], result.dropped["reason"], result.dropped["retryable"],
        result.dropped["detail"])}
    return samples, dropped, dl, seconds


def test_cap_per_host_holds_and_hosts_run_side_by_side(tmp_path):
    with Host("127.0.0.2", delay=0.1) as a, Host("127.0.0.3", delay=0.1) as b, \
            Host("127.0.0.4", delay=0.1) as c:
        urls = [h.url(f"/img/{i}.jpg") for i in range(18) for h in (a, b, c)]
        samples, dropped, _, seconds = download(tmp_path, urls, max_per_host=3, threads=64)
        assert not dropped and len(samples) == 54
        # never more than the cap at one host, and the cap is used (the hosts are slow)
        assert [h.peak for h in (a, b, c)] == [3, 3, 3]
        # 18 URLs x 0.1 s at 3 in flight = 0.6 s per host; the hosts run side by side
        assert seconds < 1.6, seconds
    # unlimited: one host gets many more in flight at once
    with Host("127.0.0.5", delay=0.1) as d:
        download(tmp_path, [d.url(f"/img/{i}.jpg") for i in range(16)], max_per_host=0)
        assert d.peak > 3


def test_rate_limit_spaces_request_starts(tmp_path):
    with Host("127.0.0.2") as a, Host("127.0.0.3") as b:
        urls = [a.url(f"/img/{i}.jpg") for i in range(8)] + [b.url(f"/img/{i}.jpg")
                                                             for i in range(8)]
        samples, dropped, _, _ = download(tmp_path, urls, max_host_rate=10.0)
        assert len(samples) == 16 and not dropped
        for h in (a, b):
            # 10 req/s: starts 0.1 s apart by the client's clock; arrivals jitter on a busy box
            t = sorted(h.times())
            assert t[-1] - t[0] > 0.7 - 0.05, t
            assert all(sum(x <= y < x + 0.25 for y in t) <= 4 for x in t), t   # nominally 3
        # the two hosts' buckets are separate: they ran in parallel
        assert abs(min(a.times()) - min(b.times())) < 0.08


def test_429_storm_backs_the_host_off_then_pauses_it_while_other_hosts_go_on(tmp_path):
    with Host("127.0.0.2", delay=0.02) as storm, Host("127.0.0.3", delay=0.02) as calm:
        storm.status, storm.retry_after = 429, "1"
        urls = [storm.url(f"/img/{i}.jpg") for i in range(12)] + [
            calm.url(f"/img/{i}.jpg") for i in range(40)]
        samples, dropped, _, _ = download(tmp_path, urls, threads=8, max_per_host=4, retries=2,
                                          host_backoff_failures=6, timeout_total=8.0)
        t = sorted(storm.times())
        # first wave: the cap's 4 requests; then silence for Retry-After; then the retries
        # that reach the pause threshold; never 12 URLs x 3 attempts
        first, rest = t[:4], t[4:]
        assert rest and len(t) <= 8, t
        assert min(rest) - max(first) >= 0.95, t     # nothing during the back-off window
        reasons = {k: v for k, v in dropped.items() if int(k[1:]) < 12}
        assert len(reasons) == 12 and len(samples) == 40
        kinds = {r for r, _, _ in reasons.values()}
        assert kinds <= {"http_429", "host_backoff"} and "host_backoff" in kinds
        assert all(retry for r, retry, _ in reasons.values())
        assert sum(r == "host_backoff" for r, _, _ in reasons.values()) >= 4
        # the calm host kept its speed: all of it was done inside the storm's first window
        assert max(calm.times()) < min(first) + 0.9
        assert "host_backoff" in RETRYABLE


def test_503_with_retry_after_backs_off_the_host_for_every_url(tmp_path):
    with Host("127.0.0.2") as h:
        h.status, h.retry_after = 503, "1"
        urls = [h.url(f"/img/{i}.jpg") for i in range(6)]
        _, dropped, _, _ = download(tmp_path, urls, max_per_host=1, retries=1,
                                    host_backoff_failures=3, timeout_total=8.0)
        t = sorted(h.times())
        assert len(t) == 3 and all(y - x >= 0.95 for x, y in zip(t, t[1:])), t
        assert sorted(r for r, _, _ in dropped.values()).count("host_backoff") >= 4


def test_retry_after_beyond_max_retry_after_pauses_the_host_at_once(tmp_path):
    with Host("127.0.0.2") as h:
        h.status, h.retry_after = 429, "3600"
        _, dropped, _, _ = download(tmp_path, [h.url(f"/img/{i}.jpg") for i in range(5)],
                                    max_per_host=1, max_retry_after=10.0)
        assert len(h.paths("/img/")) == 1
        assert dropped["k0000"][0] == "http_429" and "max_retry_after" in dropped["k0000"][2]
        assert {dropped[f"k{i:04d}"][0] for i in range(1, 5)} == {"host_backoff"}


def test_robots_txt_disallow_means_no_request_and_is_fetched_once(tmp_path):
    rules = "User-agent: align-ray\nDisallow: /img/1\n\nUser-agent: *\nDisallow: /\n"
    with Host("127.0.0.2", robots=rules) as h, Host("127.0.0.3", robots=503) as down, \
            Host("127.0.0.4", robots=None) as none:
        urls = ([h.url(f"/img/{i}.jpg") for i in range(20)]
                + [down.url(f"/img/{i}.jpg") for i in range(3)]
                + [none.url(f"/img/{i}.jpg") for i in range(3)])
        samples, dropped, dl, _ = download(tmp_path, urls)
        forbidden = {f"k{i:04d}" for i in [1] + list(range(10, 20))}
        assert {k for k, v in dropped.items() if v[0] == "robots_txt"} == forbidden
        assert all(not dropped[k][1] for k in forbidden)          # not retryable
        assert not [p for p in h.paths("/img/") if p.startswith("/img/1")]
        assert h.paths("/robots.txt") == ["/robots.txt"]          # once for 20 rows
        # robots.txt 5xx: disallow all for now, retryable, no image request
        assert {dropped[f"k{i:04d}"][0] for i in range(20, 23)} == {"robots_txt_error"}
        assert all(dropped[f"k{i:04d}"][1] for i in range(20, 23))
        assert down.paths("/img/") == [] and down.paths("/robots.txt") == ["/robots.txt"]
        # no robots.txt (404): everything allowed
        assert all(f"k{i:04d}" in samples for i in range(23, 26))
        assert dl.polite.robots.fetches == 3
    with Host("127.0.0.2", robots="User-agent: *\nDisallow: /\n") as h:
        samples, dropped, _, _ = download(tmp_path, [h.url("/img/3.jpg")],
                                          respect_robots_txt=False)
        assert len(samples) == 1 and h.paths("/robots.txt") == []


def test_a_robots_txt_past_its_deadline_disallows_for_now(tmp_path):
    """``robots_timeout``: a robots.txt that does not answer in time is an error (disallow all,
    retryable), and the rows do not wait for it longer than the deadline."""
    with Host("127.0.0.2", robots="User-agent: *\nDisallow:\n", robots_delay=3.0) as h:
        samples, dropped, _, seconds = download(tmp_path, [h.url(f"/img/{i}.jpg") for i in range(3)],
                                                robots_timeout=0.5)
        assert not samples and h.paths("/img/") == []
        assert {k: v[:2] for k, v in dropped.items()} == {
            f"k{i:04d}": ("robots_txt_error", True) for i in range(3)}
        assert "no answer within 0.5s" in dropped["k0000"][2]
        assert seconds < 2.5, seconds


def test_robots_txt_goes_through_the_ssrf_guard_and_its_size_cap(tmp_path):
    # 127.0.0.3 is not admitted: neither robots.txt nor the image is asked for
    with Host("127.0.0.3", robots="User-agent: *\nDisallow:\n") as h:
        _, dropped, _, _ = download(tmp_path, [h.url("/img/0.jpg")],
                                    allow_cidr=["127.0.0.2/32"])
        assert dropped["k0000"][0] == "blocked_address" and h.log == []
    # rules past robots_max_bytes are not read (as Google ignores them past 500 KiB)
    late = "User-agent: *\n" + "# padding\n" * 2000 + "Disallow: /img/\n"
    with Host("127.0.0.2", robots=late) as h:
        samples, _, _, _ = download(tmp_path, [h.url("/img/0.jpg")], robots_max_bytes=4096)
        assert len(samples) == 1
        _, dropped, _, _ = download(tmp_path, [h.url("/img/1.jpg")])
        assert dropped["k0000"][0] == "robots_txt" and h.paths("/img/") == ["/img/0.jpg"]


def test_a_redirect_hop_is_checked_as_the_url_given(tmp_path):
    """robots.txt and the opt-out lists apply to every redirect target too: a hop they refuse
    is never requested, and its row drops with their reason."""
    domains = tmp_path / "domains.txt"
    domains.write_text("optout.test\n")
    with Host("127.0.0.2") as a, Host("127.0.0.3", robots="User-agent: *\nDisallow: /img/1\n") as b:
        a.redirects = {"/img/0.jpg": b.url("/img/0.jpg"),                     # allowed there
                       "/img/1.jpg": b.url("/img/1.jpg"),                     # b's robots.txt: no
                       "/img/2.jpg": f"http://optout.test:{b.port}/img/2.jpg",  # opted out
                       "/img/3.jpg": a.url("/img/4.jpg")}                     # same host: fine
        samples, dropped, _, _ = download(tmp_path, [a.url(f"/img/{i}.jpg") for i in range(4)],
                                          resolve={"optout.test": "127.0.0.3"},
                                          blocklist_domains=str(domains))
        assert set(samples) == {"k0000", "k0003"}
        assert {k: v[:2] for k, v in dropped.items()} == {"k0001": ("robots_txt", False),
                                                          "k0002": ("optout_domain", False)}
        assert "127.0.0.3" in dropped["k0001"][2]
        assert b.paths("/img/") == ["/img/0.jpg"] and b.paths("/robots.txt") == ["/robots.txt"]
        assert sorted(a.paths("/img/")) == [f"/img/{i}.jpg" for i in range(5)]


def test_blocklists_each_with_its_reason(tmp_path):
    with Host("127.0.0.2") as h:
        port = h.port
        resolve = {"img.optout.test": "127.0.0.2", "optout.test": "127.0.0.2",
                   "fine.test": "127.0.0.2", "notoptout.test": "127.0.0.2"}
        urls = [f"http://img.optout.test:{port}/img/0.jpg",     # subdomain of a listed domain
                f"http://optout.test:{port}/img/1.jpg",          # the domain itself
                f"http://notoptout.test:{port}/img/2.jpg",       # not a subdomain
                f"http://fine.test:{port}/img/3.jpg#frag",       # listed URL (fragment ignored)
                f"http://fine.test:{port}/img/4.jpg",            # sha256 listed
                f"http://fine.test:{port}/img/5.jpg",            # pHash listed
                f"http://fine.test:{port}/img/6.jpg"]
        (tmp_path / "domains.txt").write_text("# opt-outs\n*.optout.test\n\n")
        (tmp_path / "urls.txt").write_text(f"HTTP://FINE.test:{port}/img/3.jpg\n")
        ph = process_image(jpeg(5), DataConfig(**FAST)).phash
        (tmp_path / "hashes.txt").write_text(
            f"{hashlib.sha256(jpeg(4)).hexdigest()}\n{ph:016x}\n")
        samples, dropped, _, _ = download(
            tmp_path, urls, resolve=resolve, blocklist_domains=str(tmp_path / "domains.txt"),
            blocklist_urls=str(tmp_path / "urls.txt"),
            blocklist_hashes=str(tmp_path / "hashes.txt"))
        assert {k: v[0] for k, v in dropped.items()} == {
            "k0000": "optout_domain", "k0001": "optout_domain", "k0003": "optout_url",
            "k0004": "optout_hash", "k0005": "optout_hash"}
        assert set(samples) == {"k0002", "k0006"}
        assert not any(v[1] for v in dropped.values())
        # the request-side lists are checked before any request
        assert sorted(h.paths("/img/")) == ["/img/2.jpg", "/img/4.jpg", "/img/5.jpg",
                                            "/img/6.jpg"]


@pytest.mark.timeout(300)
def test_stage_accounts_every_politeness_reason(ray_cluster, tmp_path):
    with Host("127.0.0.2", robots="User-agent: *\nDisallow: /img/1\n") as ok, \
            Host("127.0.0.3") as storm:
        storm.status, storm.retry_after = 429, "1"
        rows = ([{"url": ok.url(f"/img/{i}.jpg"), "caption": f"ok {i}"} for i in range(20)]
                + [{"url": storm.url(f"/img/{100 + i}.jpg"), "caption": f"busy {i}"}
                   for i in range(10)])
        src = tmp_path / "urls.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "urls.txt").write_text(ok.url("/img/2.jpg") + "\n")
        (tmp_path / "hashes.txt").write_text(hashlib.sha256(jpeg(3)).hexdigest() + "\n")
        out = tmp_path / "out"
        opts = dict(processes=1, shard_size=30, retries=1, host_backoff_failures=3,
                    blocklist_urls=str(tmp_path / "urls.txt"),
                    blocklist_hashes=str(tmp_path / "hashes.txt"))
        stats = pipeline.run(DataConfig(input=str(src), output=str(out), **{**FAST, **opts}))
        keys = [f"00000{i:09d}" for i in range(30)]
        samples, dropped = accounting(out, keys)
        assert stats["dropped"]["robots_txt"] == 11          # /img/1, /img/10../img/19
        assert stats["dropped"]["optout_url"] == 1 and stats["dropped"]["optout_hash"] == 1
        assert stats["dropped"].get("host_backoff", 0) >= 5
        assert set(stats["dropped"]) <= {"robots_txt", "optout_url", "optout_hash",
                                         "host_backoff", "http_429"}
        assert all(dropped[k]["retryable"] for k in keys[20:])
        assert not [p for p in ok.paths("/img/") if p.startswith("/img/1")]
        assert len(samples) == 7
        # the host recovers: --retry-failed re-tries exactly its rows, now successfully
        storm.status = 200
        again = pipeline.run(DataConfig(input=str(src), output=str(out), retry_failed=True,
                                        **{**FAST, **opts}))
        assert again["output_rows"] == 17 and "host_backoff" not in again["dropped"], again["dropped"]
        assert accounting(out, keys)


@pytest.mark.timeout(300)
def test_partition_by_host_holds_the_cap_across_actors(ray_cluster, tmp_path):
    """Two download actors, three slow hosts whose rows are interleaved.  Without partitioning
    every shard holds every host, so both actors talk to each host at once and a host sees
    up to 2 x the cap; partitioned by host, one actor owns each host and the cap holds."""
    def stage(name: str, hosts: list[Host], **kw) -> None:
        rows = [{"url": h.url(f"/img/{i}.jpg"), "caption": f"{h.addr} {i}"}
                for i in range(30) for h in hosts]
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / name
        stats = pipeline.run(DataConfig(input=str(src), output=str(out), **{
            **FAST, "processes": 2, "shard_size": 6, "max_per_host": 2,
            "respect_robots_txt": False, **kw}))
        samples, _ = accounting(out, [f"00000{i:09d}" for i in range(len(rows))])
        assert len(samples) == len(rows), stats["dropped"]
        return stats

    with Host("127.0.0.2", delay=0.5) as a, Host("127.0.0.3", delay=0.5) as b, \
            Host("127.0.0.4", delay=0.5) as c:
        stage("plain", [a, b, c])
        assert max(h.peak for h in (a, b, c)) > 2, [h.peak for h in (a, b, c)]
    with Host("127.0.0.2", delay=0.5) as a, Host("127.0.0.3", delay=0.5) as b, \
            Host("127.0.0.4", delay=0.5) as c:
        stats = stage("by_host", [a, b, c], partition_by_host=True, host_groups=3)
        assert [h.peak for h in (a, b, c)] == [2, 2, 2]
        assert stats["config"]["partition_by_host"] is True
