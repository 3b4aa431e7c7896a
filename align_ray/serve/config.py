"""``ServeConfig``: one typed config for ``align-ray serve``, the Serve app builder and the YAML.

Nested sections (``image_encoder``, ``text_encoder``, ``router``, ``limits``) are plain dicts in
YAML / app-builder ``args``, loaded by the project's one loader (:mod:`align_ray.config`);
unknown keys are an error at every level.  A Serve config file's
``deployments:`` entries (``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests``,
``user_config``) override what is built from here, whole, as Serve documents.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from align_ray import config as config_lib
from align_ray.serve.ingress import INGRESSES

# auto: the tuned ANN index the index dir holds, else exact; exact: normalised dot product in
# NumPy; faiss: a faiss index built at load time from faiss_factory
BACKENDS = ("auto", "exact", "faiss")
PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")


@dataclass
class EncoderConfig:
    """One encoder deployment: its own autoscaling, resources and dynamic batching.

    ``max_ongoing_requests`` must be >= ``max_batch_size`` (a replica cannot batch requests it
    was never sent) and > ``target_ongoing_requests`` (else the autoscaler never sees a queue).
    ``num_gpus`` > 0 runs the model on CUDA; fractions share one GPU between replicas.
    """

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    initial_replicas: int | None = None
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 60.0
    # the window Serve averages ongoing requests over (Serve's default); shorter reacts faster
    look_back_period_s: float = 30.0
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    # at most this many replicas on one node (None: no limit): spreads the replicas so that one
    # lost node does not take them all, or keeps one replica per GPU node
    max_replicas_per_node: int | None = None
    # how long a stopping replica may drain its requests before Serve kills it (Serve's own
    # default); a replica that never got a node also waits this long before it is removed
    graceful_shutdown_timeout_s: float = 20.0
    max_batch_size: int = 32
    # Serve starts a batch when max_batch_size requests wait or this long after the first one:
    # the latency / throughput trade-off (Triton's max_queue_delay). 5 ms suits an interactive
    # page; a throughput-bound deployment (bulk embedding, a busy API) wants more. Measured on
    # 2 cores, c=32, max 32: 5 ms -> half batches of ~16, 0.05 (about one full batch's forward)
    # -> full batches of 32, +18% req/s and a lower p50, but a lone request then waits the whole
    # 50 ms (BENCHMARKS.md, Serving, session-5 runs).
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 64
    forward_batch_size: int = 64   # items per model forward; a batch of requests is cut into these
    # sys.setswitchinterval in the replica. The forward pass (on Serve's user-code thread) and
    # Serve's request thread share the GIL; a thread that wants it back after a torch op waits
    # up to one interval while the other holds it. Measured on 2 cores, MiniLM-sized tower,
    # c=32, batched: CPython's 5 ms -> 238 req/s, 0.5 ms -> 251 (BENCHMARKS.md, within the
    # run-to-run noise); a 20 ms interval fell to ~180 in a profiling run. Live-tunable.
    gil_switch_interval_s: float = 0.0005

    def validate(self, name: str) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"{name}: need 0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if self.max_batch_size < 1 or self.forward_batch_size < 1:
            raise ValueError(f"{name}: max_batch_size and forward_batch_size must be >= 1")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"{name}: max_ongoing_requests ({self.max_ongoing_requests}) must be "
                             f">= max_batch_size ({self.max_batch_size}) so batches can form")
        if not 0 < self.target_ongoing_requests <= self.max_ongoing_requests:
            raise ValueError(f"{name}: need 0 < target_ongoing_requests <= max_ongoing_requests")
        if not 0 < self.gil_switch_interval_s <= 1:
            raise ValueError(f"{name}: gil_switch_interval_s must be in (0, 1]")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.batch_wait_timeout_s < 0:
            raise ValueError(f"{name}: num_cpus, num_gpus, batch_wait_timeout_s must be >= 0")
        if self.max_replicas_per_node is not None and self.max_replicas_per_node < 1:
            raise ValueError(f"{name}: max_replicas_per_node must be >= 1 (or unset)")
        if self.graceful_shutdown_timeout_s < 0:
            raise ValueError(f"{name}: graceful_shutdown_timeout_s must be >= 0")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def autoscaling_config(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                                   target_ongoing_requests=self.target_ongoing_requests,
                                   upscale_delay_s=self.upscale_delay_s,
                                   downscale_delay_s=self.downscale_delay_s,
                                   look_back_period_s=self.look_back_period_s)
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        return out

    def ray_actor_options(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def user_config(self) -> dict[str, Any]:
        """Tunable at run time (``reconfigure``), e.g. from a Serve config file."""
        return {"max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "forward_batch_size": self.forward_batch_size,
                "gil_switch_interval_s": self.gil_switch_interval_s}


@dataclass
class RouterConfig:
    num_replicas: int = 1
    num_cpus: float = 0.5
    max_ongoing_requests: int = 256
    # a call to an encoder or index shard that takes longer is answered 503 instead of waiting
    # on a replica that may be on a dying node (serve/replicas.py)
    call_timeout_s: float = 30.0


@dataclass
class ShardConfig:
    """The ``IndexShard`` deployments (``index_shards`` > 1): each shard its own deployment,
    autoscaled on its own like the encoders (a shard's load is its share of every search).

    A shard's request is a *batch* of queries (the Router's natural batcher), and each Router
    replica keeps at most :meth:`batches_in_flight` batches out per index (a further one only
    when more than a full batch waits per batch out: :mod:`align_ray.serve.batcher`), so a
    shard's ongoing requests count batches: the default target of 1 adds a replica when full
    batches queue behind each other, and a saturated Router (every batch slot busy) takes a
    shard to ``max_replicas``.  A target of 8 (the encoders') would need 8 batches out per
    replica."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 1.0
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 30.0   # as EncoderConfig's
    num_cpus: float = 0.5
    max_ongoing_requests: int = 64

    def batches_in_flight(self) -> int:
        """Batches a Router replica keeps out at once per index: enough that a saturated Router
        asks for ``max_replicas`` replicas of every shard (Serve asks ongoing / target)."""
        return max(1, math.ceil(self.max_replicas * self.target_ongoing_requests))

    def options(self) -> dict[str, Any]:
        if not 1 <= max(self.min_replicas, 1) <= self.max_replicas:
            raise ValueError("index_shard: need 0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if not 0 < self.target_ongoing_requests <= self.max_ongoing_requests:
            raise ValueError("index_shard: need 0 < target_ongoing_requests <= max_ongoing_requests")
        return dict(autoscaling_config=dict(
            min_replicas=self.min_replicas, max_replicas=self.max_replicas,
            target_ongoing_requests=self.target_ongoing_requests,
            upscale_delay_s=self.upscale_delay_s, downscale_delay_s=self.downscale_delay_s,
            look_back_period_s=self.look_back_period_s),
            ray_actor_options={"num_cpus": self.num_cpus},
            max_ongoing_requests=self.max_ongoing_requests)


@dataclass
class Limits:
    """Request caps; anything beyond them is a 4xx with a message, before any model runs."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_texts: int = 64
    max_text_chars: int = 1000
    max_images: int = 16
    max_image_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 25_000_000      # decompression-bomb guard, checked from the header
    max_k: int = 1000
    max_labels: int = 64
    max_templates: int = 8


@dataclass
class UrlFetchConfig:
    """How ``image_url`` queries (clip-retrieval's ``/knn-service``) are fetched: by the download
    stage's fetcher, behind its SSRF guard.  Loopback, private and other special-purpose
    addresses are refused unless ``allow_cidr`` admits them (e.g. an intranet image host), so the
    server never fetches itself or a cloud metadata address for a client."""

    allow_cidr: list[str] = field(default_factory=list)
    timeout_total: float = 10.0
    max_redirects: int = 3


@dataclass
class ServeConfig:
    """``model``: a ``save_pretrained`` dir; ``index``: an ``align-ray index`` output dir (or None:
    the embed/classify endpoints work, search answers 404).  ``backend``: ``exact`` (normalised dot
    product) or ``faiss`` (``faiss_factory``, e.g. ``Flat``, ``HNSW32``, ``IVF1024,Flat``)."""

    model: str = ""
    index: str | None = None
    # more indexes served side by side, by name (clip-retrieval's indice_name, /v1/search's
    # "index"); ``index`` stays the default one, named ``index_name``
    indexes: dict[str, str] = field(default_factory=dict)
    # > 1: each index is split into this many row ranges, each held by an IndexShard deployment;
    # the Router then holds only metadata and merges the shards' top-k
    index_shards: int = 1
    index_shard: ShardConfig = field(default_factory=ShardConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    # Serve's HTTP proxies: EveryNode (Serve's default: any node answers, behind a load
    # balancer), HeadOnly (one proxy; also the choice when several "nodes" share one host and
    # so one port, as in tests/multinode) or Disabled (DeploymentHandle callers only)
    proxy_location: str = field(default="EveryNode", metadata={"choices": PROXY_LOCATIONS})
    # proxy: Serve's Python proxy (Ray's default); haproxy: Ray Serve's HAProxy ingress, no
    # Python hop before the Router (a property of the Ray cluster: serve/ingress.py)
    ingress: str = field(default="proxy", metadata={"choices": INGRESSES})
    app_name: str = "align"
    route_prefix: str = "/"
    backend: str = field(default="auto", metadata={"choices": BACKENDS})
    faiss_factory: str = "HNSW32"
    dedup_hamming: int = 6            # image hits within this pHash distance are duplicates
    page_k: int = 12
    image_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    text_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    limits: Limits = field(default_factory=Limits)
    # clip-retrieval's API: the name /indices-list reports and indice_name must match ("" = the
    # index directory's base name), and the origins allowed to call us from a browser (its
    # static front end runs on another origin; "*" as its own back end does: every endpoint is
    # read-only)
    index_name: str = ""
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    url_fetch: UrlFetchConfig = field(default_factory=UrlFetchConfig)
    # seconds for every deployment to run before the app is deleted and the start fails, saying
    # what it waits on (Serve itself waits forever); an autoscaler adding a GPU node needs minutes
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        self.image_encoder.validate("image_encoder")
        self.text_encoder.validate("text_encoder")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.ingress not in INGRESSES:
            raise ValueError(f"ingress must be one of {INGRESSES}, got {self.ingress!r}")
        if self.proxy_location not in PROXY_LOCATIONS:
            raise ValueError(f"proxy_location must be one of {PROXY_LOCATIONS}, got "
                             f"{self.proxy_location!r}")
        if self.router.call_timeout_s <= 0:
            raise ValueError("router.call_timeout_s must be > 0")
        if self.index_shards < 1:
            raise ValueError(f"index_shards must be >= 1, got {self.index_shards}")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        self.index_shard.options()
        if not isinstance(self.indexes, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.indexes.items()):
            raise ValueError("indexes must map non-empty names to index directories")
        if self.index and self.resolved_index_name() in self.indexes:
            raise ValueError(f"indexes: {self.resolved_index_name()!r} is already the name of "
                             "'index' (set index_name to tell them apart)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServeConfig":
        """From YAML / the Serve app builder's ``args`` (nested sections as mappings)."""
        return config_lib.from_dict(cls, dict(data or {}), source="serve config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_index_name(self) -> str:
        if self.index_name or not self.index:
            return self.index_name or "default"
        return self.index.rstrip("/").rsplit("/", 1)[-1] or "default"

    def index_map(self) -> dict[str, str]:
        """name -> index dir, the default (``index``) first."""
        out = {self.resolved_index_name(): self.index} if self.index else {}
        out.update(self.indexes)
        return out

    def index_user_config(self) -> dict[str, Any]:
        """The Router's Serve ``user_config``: the indexes it serves.  A Serve config update of
        just this (``deployments: [{name: Router, user_config: {indexes: ..., default: ...}}]``)
        swaps indexes in the running replicas (``Router.reconfigure``), without a restart."""
        names = self.index_map()
        return {"indexes": names, "default": next(iter(names), None)}


ANN_KINDS = ("auto", "flat", "hnsw", "ivf")
QUANTIZATIONS = ("auto", "none", "fp16", "sq8", "pq")


@dataclass
class AnnConfig:
    """The approximate index ``align-ray index`` builds (:mod:`align_ray.serve.ann`).

    ``kind``: ``auto`` = exact search below ``exact_below`` rows, else HNSW when it fits
    ``memory_budget_mb`` (0 = no cap), else IVF; ``flat`` = always exact.  ``quantization``:
    ``auto`` = the widest codes within the budget (float32, fp16, 8-bit scalar, PQ).  The index is
    tuned to the smallest nprobe / efSearch with recall@``k`` >= ``target_recall`` on
    ``recall_queries`` held-out queries (the other modality's embeddings), within
    ``max_query_ms`` per single query when that latency budget is set (0 = none).  When ``auto``'s
    HNSW misses ``target_recall`` at ``max_ef``, an IVF index (if it fits the budget) is built and
    tuned too, and the one with the higher recall is kept; ``index.json`` records both.
    ``shards`` > 1: one index per row range of that many ``IndexShard`` deployments instead of
    one over all rows, tuned on their merged result (:mod:`align_ray.serve.ann_shards`)."""

    kind: str = field(default="auto", metadata={"choices": ANN_KINDS})
    exact_below: int = 200_000
    memory_budget_mb: float = 0.0
    quantization: str = field(default="auto", metadata={"choices": QUANTIZATIONS})
    target_recall: float = 0.95
    max_query_ms: float = 0.0      # latency budget per single query (the build box's CPU)
    max_ef: int = 1024             # the widest efSearch an HNSW index is tuned up to
    recall_queries: int = 1000
    k: int = 10
    add_parts: int = 0             # parallel add tasks for IVF; 0 = the cluster's CPUs (max 8)
    shards: int = 0                # > 1: per-shard indexes for serving with index_shards = this
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ANN_KINDS or self.quantization not in QUANTIZATIONS:
            raise ValueError(f"ann.kind must be one of {ANN_KINDS} and ann.quantization one of "
                             f"{QUANTIZATIONS}")
        if not 0 < self.target_recall <= 1 or self.k < 1 or self.recall_queries < 1 \
                or self.max_query_ms < 0 or self.max_ef < 1 or self.shards < 0:
            raise ValueError("ann: need 0 < target_recall <= 1, k >= 1, recall_queries >= 1, "
                             "max_query_ms >= 0, max_ef >= 1, shards >= 0")


@dataclass
class IndexConfig:
    """``align-ray index``: embed a corpus with Ray Data batch inference into an index dir.

    ``data``: a data-stage output dir (its ``parquet/`` is read), or any parquet file / dir / glob
    (local or s3://) with image-bytes and text columns.  ``image_col`` None = ``jpg`` if present,
    else ``image``.  Up to ``concurrency`` encoder actors, each ``num_cpus``/``num_gpus``.
    """

    model: str = ""
    data: str = ""
    output: str = ""
    image_col: str | None = None
    text_col: str = "text"
    batch_size: int = 64
    # Most encoder actors (the pool starts at 1 and grows while input queues up).  None = what
    # the cluster can hold *after* one CPU is left for the read and write tasks that feed the
    # pool: a pool that takes every CPU starves its own reader (a resource deadlock).
    concurrency: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    thumbnails: bool = True
    thumb_size: int = 256
    limit: int | None = None   # index only the first N rows (a quick try); None: every row
    overwrite: bool = False
    # Fail (exit 3, naming the stuck operator) after this long without progress; <= 0: never.
    stall_timeout_s: float = 600.0
    ann: AnnConfig = field(default_factory=AnnConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.concurrency is not None and self.concurrency < 1):
            raise ValueError("batch_size and concurrency must be >= 1")
        if self.limit is not None and self.limit < 1:   # 0 used to mean "every row", silently
            raise ValueError(f"limit must be >= 1 (leave it out to index every row), not "
                             f"{self.limit}")
        if self.num_cpus <= 0 and self.num_gpus <= 0:
            raise ValueError("an encoder actor needs num_cpus > 0 or num_gpus > 0")
