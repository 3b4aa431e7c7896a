"""DataConfig: every knob of the download stage (``align-ray data``)."""

from __future__ import annotations

from dataclasses import dataclass, field

RESIZE_MODES = ("center_crop", "keep_ratio", "keep_ratio_largest", "border", "no")


@dataclass
class DataConfig:
    input: str = ""
    output: str = ""
    # input columns (img2dataset's defaults); extra_cols are carried through to the output
    url_col: str = "url"
    text_col: str = "caption"
    extra_cols: list[str] = field(default_factory=list)
    # image processing
    image_size: int = 256
    resize_mode: str = field(default="center_crop", metadata={"choices": RESIZE_MODES})
    resize_only_if_bigger: bool = False
    border_color: list[int] = field(default_factory=lambda: [255, 255, 255])
    jpeg_quality: int = 95
    max_pixels: int = 89_478_485          # Pillow's MAX_IMAGE_PIXELS; checked from the header
    # output
    shard_size: int = 1000                # rows of input per shard (the unit of work and resume)
    write_parquet: bool = True
    write_webdataset: bool = True
    # distribution
    processes: int = 0                    # download actors; 0 = one per CPU of the cluster
    threads: int = 64                     # in-flight downloads per actor
    decode_threads: int = 2               # decode/resize threads per actor (cv2 releases the GIL)
    shards_per_actor: int = 2             # shards an actor works on at once (hides stragglers)
    # host partitioning (README, "Politeness"): the manifest groups rows by a hash of their
    # host, a shard holds one group's rows, and all shards of a group run in one actor call,
    # so every host is owned by one actor and the per-host limits below hold cluster-wide
    partition_by_host: bool = False
    host_groups: int = 0                  # groups when partitioning; 0 = 4 per download actor
    # network
    timeout_connect: float = 5.0
    timeout_read: float = 10.0            # between two reads, and before the headers
    timeout_total: float = 20.0           # one deadline per URL: all attempts, hops, bodies, backoff
    max_bytes: int = 20 * 1024 * 1024     # body cap, after Content-Encoding is undone
    retries: int = 2                      # extra attempts, only for retryable failures
    retry_backoff: float = 0.5            # seconds, doubled each attempt
    max_retry_after: float = 10.0         # longest Retry-After honoured; beyond it, give up
    max_redirects: int = 5
    user_agent: str = "align-ray/0.1 (+https://github.com/align-ray/align-ray; ALIGN dataset builder)"
    robots_disallow: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])
    verify_tls: bool = True
    # politeness (align_ray/data/politeness.py).  Every limit holds per download actor: a host
    # whose rows reach N actors can see N x max_per_host connections and N x max_host_rate
    # requests/s, unless partition_by_host makes N = 1 (README, "Politeness").  Rows that wait
    # for their host hold no download slot.
    max_per_host: int = 4                 # requests in flight to one host; <= 0: no cap
    max_host_rate: float = 0.0            # request starts/s to one host (token bucket); 0: off
    host_backoff_failures: int = 5        # 429/503 answers in a row that pause a host
    host_pause_s: float = 300.0           # a paused host's rows drop as host_backoff (retryable)
    respect_robots_txt: bool = True       # robots.txt per origin, before any image request
    robots_max_bytes: int = 512 * 1024    # read cap (RFC 9309 asks crawlers to parse >= 500 KiB)
    robots_timeout: float = 10.0          # deadline for one robots.txt, every hop included
    # opt-out lists (align_ray/data/blocklist.py): paths, local or s3://, one entry a line
    blocklist_domains: str = ""           # domains; subdomains match too -> optout_domain
    blocklist_urls: str = ""              # exact URLs -> optout_url
    blocklist_hashes: str = ""            # sha256 (64 hex) / pHash (16 hex) -> optout_hash
    # SSRF guard
    allow_cidr: list[str] = field(default_factory=list)
    allow_private_network: bool = False
    resolve: dict[str, str] = field(default_factory=dict)  # host -> IP, like `curl --resolve`
    # run control
    retry_failed: bool = False
    overwrite: bool = False
    # fail (exit 3, naming the stuck operator) after this long without progress; <= 0: never
    stall_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.image_size <= 0 or self.shard_size <= 0 or self.threads <= 0:
            raise ValueError("image_size, shard_size and threads must be positive")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")
        if self.host_groups < 0:
            raise ValueError("host_groups must be >= 0 (0 = 4 per download actor)")
        if self.max_host_rate < 0 or self.host_pause_s < 0 or self.robots_max_bytes <= 0:
            raise ValueError("max_host_rate and host_pause_s must be >= 0, "
                             "robots_max_bytes positive")
