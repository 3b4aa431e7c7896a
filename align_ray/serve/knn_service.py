"""clip-retrieval's HTTP API on our index: ``POST /knn-service``, ``POST /metadata``,
``GET /indices-list``, so that clip-retrieval's ``ClipClient`` and its static web front end talk to
an align-ray server unchanged.  The Router (:mod:`align_ray.serve.router`) holds the routes; this
module holds what is specific to that API: its request fields, its result shape, and fetching
``image_url`` queries safely.

Decisions (README, "clip-retrieval compatibility"):

* Bodies are parsed as JSON whatever their Content-Type, as clip-retrieval's back end does
  (``get_json(force=True)``): its front end posts JSON as ``text/plain`` and ``ClipClient`` with
  no Content-Type at all.
* ``modality`` names the index searched, as in clip-retrieval: ``"image"`` returns images,
  ``"text"`` captions.  Of ``text``, ``image``, ``image_url`` and ``embedding_input`` the first
  one given (a non-empty text, then image, URL, embedding) is the query, clip-retrieval's order.
* ``num_result_ids`` hits are returned (clipped to the index size); the first ``num_images`` of
  them carry metadata (``caption``, ``url``, ``key``, ...), the rest only ``id`` and
  ``similarity``, which the front end completes later through ``/metadata``.
* ``url`` is the pair's source URL when the index has one; otherwise the server's own thumbnail
  (``/v1/image/{id}``, absolute), so the front end can still show the picture.
* ``deduplicate`` maps to our duplicate rule (pHash within ``dedup_hamming`` for images, the
  normalised caption hash for texts) instead of clip-retrieval's embedding-distance components.
* ``use_mclip``, ``use_safety_model``, ``use_violence_detector``, ``aesthetic_score`` and
  ``aesthetic_weight`` are accepted and ignored: we have no such models.
* ``image_url`` is fetched by the download stage's :class:`~align_ray.data.fetcher.Fetcher`: the
  same SSRF guard (private, loopback, link-local and other special-purpose addresses refused,
  on every redirect hop, unless ``url_fetch.allow_cidr`` admits them), the same deadline, a byte
  cap of ``limits.max_image_bytes`` and the same header-only decompression-bomb check as an
  uploaded image.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from align_ray.serve.config import Limits, UrlFetchConfig
from align_ray.serve.schemas import APIError, check_image_header

MAX_RESULT_IDS = 10_000   # the front end asks for 3,000 ids; ClipClient for num_images


class KnnRequest(BaseModel):
    """clip-retrieval's ``/knn-service`` body.  Unknown fields are ignored (clients of other
    versions send more); the ignored feature flags accept whatever those clients send."""

    model_config = ConfigDict(extra="ignore", strict=True)
    text: StrictStr | None = None
    image: StrictStr | None = None
    image_url: StrictStr | None = None
    embedding_input: list[StrictFloat | StrictInt] | None = None
    modality: str = "image"
    num_images: StrictInt = 40
    num_result_ids: StrictInt | None = None
    indice_name: StrictStr | None = None
    deduplicate: StrictBool = False
    nprobe: StrictInt | None = None        # ours, as in /v1/search
    ef: StrictInt | None = None
    use_mclip: Any = None
    use_safety_model: Any = None
    use_violence_detector: Any = None
    aesthetic_score: Any = None
    aesthetic_weight: Any = None

    def query_kind(self) -> str:
        if self.text:            # clip-retrieval treats "" as no text
            return "text"
        for kind in ("image", "image_url", "embedding_input"):
            if getattr(self, kind) is not None:
                return kind
        raise APIError(422, "give one of 'text', 'image', 'image_url' or 'embedding_input'")


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    ids: list[StrictInt]
    indice_name: StrictStr | None = None


def parse(model: type[BaseModel], body: bytes) -> Any:
    """A JSON body of any Content-Type -> ``model``, or a 4xx naming the bad field."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, RecursionError):
        raise APIError(400, "malformed JSON body") from None
    if not isinstance(data, dict):
        raise APIError(422, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ())) or 'body'}: {err.get('msg')}"
                 for err in e.errors()[:5]]
        raise APIError(422, "; ".join(parts)) from None


def result_counts(req: KnnRequest, limits: Limits, count: int) -> tuple[int, int]:
    """(hits to search for, hits to give metadata): clip-retrieval's num_result_ids/num_images."""
    if not 1 <= req.num_images <= limits.max_k:
        raise APIError(422, f"num_images must be between 1 and {limits.max_k}, got {req.num_images}")
    ids = req.num_images if req.num_result_ids is None else req.num_result_ids
    if not 1 <= ids <= MAX_RESULT_IDS:
        raise APIError(422, f"num_result_ids must be between 1 and {MAX_RESULT_IDS}, got {ids}")
    return min(max(ids, req.num_images), count), req.num_images


def check_modality(modality: str, available: tuple[str, ...]) -> None:
    if modality not in ("image", "text"):
        raise APIError(422, f"modality must be 'image' or 'text', got {modality!r}")
    if modality not in available:
        raise APIError(404, f"the loaded index has no {modality} embeddings")


def metadata(record: dict[str, Any], thumb_url: str | None) -> dict[str, Any]:
    """One of our hit records as clip-retrieval metadata: ``caption`` and ``url`` first."""
    out = {"caption": record.get("text"), "url": record.get("url") or thumb_url}
    for k, v in record.items():
        if k not in ("id", "score", "text", "url", "modality") and v is not None:
            out[k] = v
    if thumb_url:
        out["image_url"] = thumb_url
    return out


def knn_results(hits: list[dict], with_meta: int, thumb_url) -> list[dict]:
    """Our hits -> clip-retrieval's result list (metadata for the first ``with_meta``)."""
    out = []
    for n, h in enumerate(hits):
        row = metadata(h, thumb_url(h["id"])) if n < with_meta else {}
        row["id"], row["similarity"] = int(h["id"]), float(h["score"])
        out.append(row)
    return out


class ImageUrlFetcher:
    """``image_url`` -> checked image bytes, through the download stage's fetcher.  Built lazily
    inside the replica's event loop (aiohttp sessions belong to one loop)."""

    def __init__(self, cfg: UrlFetchConfig, limits: Limits):
        self.cfg, self.limits = cfg, limits
        self._fetcher = None

    async def fetch(self, url: str) -> bytes:
        from align_ray.data.errors import Drop

        if len(url) > 4096:
            raise APIError(422, "image_url is longer than 4096 characters")
        if self._fetcher is None:
            from align_ray.data.config import DataConfig
            from align_ray.data.fetcher import Fetcher

            self._fetcher = Fetcher(DataConfig(
                allow_cidr=list(self.cfg.allow_cidr), timeout_total=self.cfg.timeout_total,
                timeout_read=self.cfg.timeout_total, max_redirects=self.cfg.max_redirects,
                retries=0, threads=16, max_bytes=self.limits.max_image_bytes))
        try:
            got = await self._fetcher.fetch(url)
        except Drop as d:
            status = 413 if d.reason == "too_large" else 400
            raise APIError(status, f"image_url not fetched: {d.reason}"
                                   + (f" ({d.detail})" if d.detail else "")) from None
        check_image_header(got.body, self.limits, "image_url")
        return got.body
