"""Opt-out lists (Spawning-style "do not train" lists), loaded once per download actor.

Three optional files, local or ``s3://``, one entry a line (blank lines and ``#`` comments
ignored):

* ``blocklist_domains``: a domain blocks itself and every subdomain (``example.com`` blocks
  ``img.example.com``; a leading ``*.`` or ``.`` is ignored); IP literals match exactly.
  Checked before any request: reason ``optout_domain``.
* ``blocklist_urls``: exact URLs (compared after the same normalisation as our client applies:
  scheme and host lower-cased, default port and ``#fragment`` dropped).  Checked before any
  request: reason ``optout_url``.
* ``blocklist_hashes``: sha256 of the downloaded bytes (64 hex digits) and/or the 64-bit pHash
  of the decoded image (16 hex digits, exact match; the ``phash`` column printed as hex).
  Checked after the download: reason ``optout_hash``.

None of these reasons is retryable.  Redirect targets are checked against the URL and domain
lists too, before they are requested (``politeness.Politeness.check_hop``).
"""

from __future__ import annotations

from yarl import URL

from align_ray import storage
from align_ray.data.config import DataConfig
from align_ray.data.errors import Drop


def _lines(path: str) -> list[str]:
    fs, p = storage.filesystem(path)
    text = storage.read_bytes(fs, p).decode("utf-8-sig")
    return [s for s in (line.split("#", 1)[0].strip() for line in text.splitlines()) if s]


def normalize_host(host: str) -> str:
    """Lower-case, IDNA (punycode) form, no trailing dot: how hosts are compared here."""
    host = host.strip().lower().rstrip(".")
    if not host.isascii():
        host = URL.build(scheme="http", host=host).raw_host or host
    return host


def normalize_url(url: str) -> str:
    try:
        return str(URL(url.strip()).with_fragment(None))
    except (ValueError, TypeError):
        return url.strip()


class Blocklists:
    def __init__(self, cfg: DataConfig) -> None:
        self.domains: frozenset[str] = frozenset()
        self.urls: frozenset[str] = frozenset()
        self.sha256: frozenset[str] = frozenset()
        self.phash: frozenset[int] = frozenset()
        if cfg.blocklist_domains:
            self.domains = frozenset(
                normalize_host(d.removeprefix("*.").lstrip("."))
                for d in _lines(cfg.blocklist_domains))
        if cfg.blocklist_urls:
            self.urls = frozenset(normalize_url(u) for u in _lines(cfg.blocklist_urls))
        if cfg.blocklist_hashes:
            sha, ph = set(), set()
            for entry in _lines(cfg.blocklist_hashes):
                h = entry.lower().removeprefix("0x")
                try:
                    int(h, 16)
                except ValueError:
                    raise ValueError(f"{cfg.blocklist_hashes}: {entry!r} is not a hex hash") from None
                if len(h) == 64:
                    sha.add(h)
                elif len(h) <= 16:
                    ph.add(int(h, 16))
                else:
                    raise ValueError(f"{cfg.blocklist_hashes}: {entry!r} is neither a sha256 "
                                     "(64 hex digits) nor a pHash (16 hex digits)")
            self.sha256, self.phash = frozenset(sha), frozenset(ph)

    @property
    def checks_hashes(self) -> bool:
        return bool(self.sha256 or self.phash)

    def check_request(self, url: str, host: str | None) -> None:
        """Before any request: raise ``optout_url`` / ``optout_domain`` drops."""
        if self.urls and (url in self.urls or normalize_url(url) in self.urls):
            raise Drop("optout_url", "URL is on the opt-out list", retryable=False)
        if self.domains and host:
            labels = host.split(".")
            for i in range(len(labels)):
                if ".".join(labels[i:]) in self.domains:
                    raise Drop("optout_domain", f"{'.'.join(labels[i:])} is on the opt-out list",
                               retryable=False)

    def check_content(self, sha256_hex: str, phash: int) -> None:
        """After the download: raise an ``optout_hash`` drop."""
        if sha256_hex in self.sha256:
            raise Drop("optout_hash", f"sha256 {sha256_hex} is on the opt-out list",
                       retryable=False)
        if int(phash) in self.phash:
            raise Drop("optout_hash", f"pHash {int(phash):016x} is on the opt-out list",
                       retryable=False)
