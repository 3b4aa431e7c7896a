"""``Router``: the FastAPI ingress.  It validates requests, calls the two encoder deployments
through their ``DeploymentHandle``s and searches the index it holds.

Every client mistake is a 4xx with ``{"detail": message}``: request models are strict
(:mod:`align_ray.serve.schemas`), caps come from ``Limits``, a body over ``max_body_bytes`` is
refused while it streams in, and the handlers below turn validation-type exceptions into 4xx.
Anything else is a real bug: logged with its traceback and answered 500.

(No ``from __future__ import annotations`` here: FastAPI must see the request-model classes,
not strings, in the endpoint signatures Serve's class-based ingress hands it.)
"""

import asyncio
import logging
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from align_ray.serve import knn_service as knn
from align_ray.serve import page, replicas, schemas
from align_ray.serve.catalog import Catalog
from align_ray.serve.config import Limits, ServeConfig
from align_ray.serve.schemas import APIError, ClassifyRequest, EmbedImageRequest, EmbedTextRequest, SearchRequest

log = logging.getLogger("ray.serve")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
api = FastAPI(title="align-ray", description="ALIGN dual-encoder embedding, search and "
              "zero-shot classification", version="1")
# What the middleware below needs from the Router's config.  Not ``api.state``: Serve's ingress
# serves a cloudpickled copy of ``api``, and the Router class is pickled by value with its own
# copy, so state set through ``api`` in ``Router.__init__`` never reaches the app that serves.
# This dict is reached through a module function (pickled by reference), so it is the one the
# middleware classes (also by reference) read.
_replica: dict[str, Any] = {"limits": Limits(), "cors_origins": []}


def configure_replica(cfg: ServeConfig) -> None:
    _replica["limits"] = cfg.limits
    _replica["cors_origins"] = list(cfg.cors_origins)


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limits.max_body_bytes`` (by Content-Length, or
    counted while it streams in when the length is not declared)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits: Limits = _replica["limits"]
        cap = limits.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > cap
            except ValueError:
                return await _send_json(scope, send, 400, "invalid Content-Length header")
            if too_big:
                return await _send_json(scope, send, 413, f"request body over {cap} bytes")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise HTTPException(413, f"request body over {cap} bytes")
            return message

        return await self.app(scope, counted, send)


async def _send_json(scope, send, status: int, detail: str) -> None:
    async def no_body():
        return {"type": "http.disconnect"}

    await JSONResponse({"detail": detail}, status_code=status)(scope, no_body, send)


class Cors:
    """ASGI middleware: Starlette's CORSMiddleware, built on the first request from the origins
    the Router's config allows (middleware must be added before the app starts; the config
    arrives later, in the replica's ``Router.__init__``)."""

    def __init__(self, app):
        self.app, self.inner = app, None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":     # lifespan events come before the Router's __init__
            return await self.app(scope, receive, send)
        if self.inner is None:
            from starlette.middleware.cors import CORSMiddleware

            origins = _replica["cors_origins"]
            self.inner = (CORSMiddleware(self.app, allow_origins=origins,
                                         allow_methods=["GET", "POST"], allow_headers=["*"])
                          if origins else self.app)
        return await self.inner(scope, receive, send)


api.add_middleware(BodyLimit)
api.add_middleware(Cors)      # outermost: a 413 or 4xx still carries the CORS headers


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    retry = getattr(exc, "retry_after", None)     # replicas.Unavailable: a 503 to retry
    headers = {"Retry-After": str(retry)} if retry is not None else None
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"detail": "malformed JSON body"}, status_code=400)
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(parts)}, status_code=422)


@api.exception_handler(ValueError)      # also UnicodeDecodeError, JSON and base64 errors
@api.exception_handler(RecursionError)  # absurdly nested input
async def _bad_value(request: Request, exc: Exception):
    log.warning("align-ray: %s answered 400 (%s: %s)", request.url.path, type(exc).__name__, exc,
                exc_info=exc)
    return JSONResponse({"detail": f"invalid request: {exc}"[:500]}, status_code=400)


@api.exception_handler(Exception)       # a real bug: logged with its traceback, JSON 500
async def _bug(request: Request, exc: Exception):
    log.error("align-ray: %s failed", request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def _err(status: int, message: str) -> APIError:
    return APIError(status, message)


@serve.deployment(name="Router", health_check_period_s=10, graceful_shutdown_wait_loop_s=2,
                  graceful_shutdown_timeout_s=20)
@serve.ingress(api)
class Router:
    def __init__(self, image_encoder: DeploymentHandle, text_encoder: DeploymentHandle,
                 cfg: ServeConfig, shards: list[DeploymentHandle] | None = None):
        self.img = image_encoder
        self.txt = text_encoder
        self.cfg = cfg
        self.limits = cfg.limits
        configure_replica(cfg)
        self.url_fetcher = knn.ImageUrlFetcher(cfg.url_fetch, cfg.limits)
        # the indexes arrive in reconfigure (the user_config), so that a Serve config update
        # of the Router's user_config swaps them in a running replica
        self.catalog = Catalog(cfg, shards or [])
        self._info: dict[str, Any] | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await self.catalog.apply(user_config)

    async def _model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self._call(self.txt.info, what="text encoder")
        return self._info

    async def _call(self, method, *args, what: str):
        return await replicas.call(method, *args, what=what, timeout_s=self.cfg.router.call_timeout_s)

    async def _embed_texts(self, texts: list[str]) -> np.ndarray:
        out = await self._call(self.txt.embed, texts, what="text encoder")
        if isinstance(out, dict):
            raise _err(400, out["error"])
        return out

    async def _embed_images(self, images: list[bytes]) -> np.ndarray:
        out = await self._call(self.img.embed, images, what="image encoder")
        if isinstance(out, dict):
            raise _err(400, out["error"])
        return out

    async def _query_vector(self, text: str | None, image: str | None, embedding: list | None,
                            dim: int, image_bytes: bytes | None = None) -> np.ndarray:
        """One search query as a vector (/v1/search and /knn-service alike): a text or an image
        (base64, or bytes already fetched) through its encoder, or an embedding as given."""
        if text is not None:
            schemas.check_text(text, self.limits)
            return (await self._embed_texts([text]))[0]
        if image is not None or image_bytes is not None:
            data = image_bytes if image_bytes is not None else schemas.decode_image(image, self.limits)
            return (await self._embed_images([data]))[0]
        schemas.check_embedding(embedding, dim)
        return np.asarray(embedding, np.float32)

    @staticmethod
    def _embedding_response(emb: np.ndarray) -> JSONResponse:
        return JSONResponse({"embeddings": emb.tolist(), "dim": int(emb.shape[1])})

    @api.post("/v1/embed/text")
    async def embed_text(self, req: EmbedTextRequest) -> JSONResponse:
        schemas.check_texts(req.texts, self.limits)
        return self._embedding_response(await self._embed_texts(req.texts))

    @api.post("/v1/embed/image")
    async def embed_image(self, req: EmbedImageRequest) -> JSONResponse:
        if not req.images:
            raise _err(422, "'images' must not be empty")
        if len(req.images) > self.limits.max_images:
            raise _err(413, f"too many images: {len(req.images)} > {self.limits.max_images}")
        data = [schemas.decode_image(b, self.limits, f"images[{i}]") for i, b in enumerate(req.images)]
        return self._embedding_response(await self._embed_images(data))

    @api.post("/v1/search")
    async def search(self, req: SearchRequest, request: Request) -> JSONResponse:
        schemas.check_k(req.k, self.limits)
        target = req.target
        served = self.catalog.get(req.index)
        store = served.store
        if target not in store.modalities:
            raise _err(404, f"the loaded index has no {target} embeddings")
        query = await self._query_vector(req.text, req.image, req.embedding, store.dim)
        knobs = schemas.check_knobs(req.nprobe, req.ef)
        hits = await served.searches.submit((query, target, req.k, req.dedup, knobs))
        root = request.scope.get("root_path", "").rstrip("/")
        if store.has_thumbnails:
            suffix = self._index_query(served)
            for h in hits:
                h["image_url"] = f"{root}/v1/image/{h['id']}{suffix}"
        for h in hits:
            h["modality"] = target
        return JSONResponse({"results": hits})

    @api.post("/v1/classify")
    async def classify(self, req: ClassifyRequest) -> JSONResponse:
        lim = self.limits
        schemas.check_texts(req.labels, lim, "labels", lim.max_labels)
        templates = list(req.templates) if req.templates is not None else list(DEFAULT_TEMPLATES)
        if not templates or len(templates) > lim.max_templates:
            raise _err(422, f"'templates' must hold 1..{lim.max_templates} entries")
        for i, t in enumerate(templates):
            if t.count("{}") != 1:
                raise _err(422, f"templates[{i}] must contain '{{}}' exactly once (the label goes there)")
            schemas.check_text(t.replace("{}", "x"), lim, f"templates[{i}]")
        prompts = [t.replace("{}", label) for label in req.labels for t in templates]
        for p in prompts:
            schemas.check_text(p, lim, "label with template")
        image = schemas.decode_image(req.image, lim)
        # both encoders work concurrently
        txt, img = await asyncio.gather(self._embed_texts(prompts), self._embed_images([image]))
        label_emb = txt.reshape(len(req.labels), len(templates), -1).mean(axis=1)
        label_emb /= np.maximum(np.linalg.norm(label_emb, axis=1, keepdims=True), 1e-12)
        sims = label_emb @ img[0]
        temperature = (await self._model_info()).get("temperature") or 0.01
        logits = sims / temperature
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        return JSONResponse({"labels": [req.labels[i] for i in order],
                             "scores": [float(probs[i]) for i in order],
                             "similarities": [float(sims[i]) for i in order]})

    # -- clip-retrieval's API (align_ray/serve/knn_service.py has the decisions) --

    @api.get("/indices-list")
    async def indices_list(self) -> JSONResponse:
        return JSONResponse(self.catalog.names)

    @api.post("/knn-service")
    async def knn_service(self, request: Request) -> JSONResponse:
        req = knn.parse(knn.KnnRequest, await request.body())
        served = self.catalog.get(req.indice_name)
        knn.check_modality(req.modality, served.store.modalities)
        k, with_meta = knn.result_counts(req, self.limits, len(served.store))
        kind = req.query_kind()
        fetched = await self.url_fetcher.fetch(req.image_url) if kind == "image_url" else None
        query = await self._query_vector(req.text if kind == "text" else None,
                                         req.image if kind == "image" else None,
                                         req.embedding_input if kind == "embedding_input" else None,
                                         served.store.dim, image_bytes=fetched)
        knobs = schemas.check_knobs(req.nprobe, req.ef)
        hits = await served.searches.submit((query, req.modality, k, req.deduplicate, knobs))
        return JSONResponse(knn.knn_results(hits, with_meta, self._thumb_url(request, served)))

    @api.post("/metadata")
    async def metadata(self, request: Request) -> JSONResponse:
        req = knn.parse(knn.MetadataRequest, await request.body())
        served = self.catalog.get(req.indice_name)
        store = served.store
        if len(req.ids) > knn.MAX_RESULT_IDS:
            raise _err(413, f"too many ids: {len(req.ids)} > {knn.MAX_RESULT_IDS}")
        bad = [i for i in req.ids if not 0 <= i < len(store)]
        if bad:
            raise _err(404, f"no pair with id {bad[0]} (ids run 0..{len(store) - 1})")
        thumb = self._thumb_url(request, served)
        return JSONResponse([{"id": i, "metadata": knn.metadata(store.record(i, 0.0), thumb(i))}
                             for i in req.ids])

    def _index_query(self, served) -> str:
        """The thumbnail URL's ``?index=`` for an index other than the default."""
        return "" if served.name == self.catalog.default else f"?index={quote(served.name)}"

    def _thumb_url(self, request: Request, served):
        """id -> the absolute URL of its thumbnail (None without thumbnails)."""
        if not served.store.has_thumbnails:
            return lambda i: None
        base, suffix = str(request.base_url).rstrip("/"), self._index_query(served)
        return lambda i: f"{base}/v1/image/{int(i)}{suffix}"

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        status: dict[str, Any] = {"status": "ok"}
        for name, handle in (("image_encoder", self.img), ("text_encoder", self.txt)):
            try:
                status[name] = await asyncio.wait_for(handle.ping.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                status[name] = f"unavailable: {type(e).__name__}"
                status["status"] = "degraded"
        cat = self.catalog
        status["index"] = cat.info(cat.get(None)) if cat.default else None
        status["indexes"] = {n: cat.info(cat.get(n)) for n in cat.names}
        status["index_version"], status["index_error"] = cat.version, cat.last_error
        return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)

    @api.get("/v1/image/{item_id}")
    async def image(self, item_id: int, index: str | None = None) -> Response:
        data = self.catalog.get(index).store.thumbnail(item_id) if self.catalog.entries else None
        if data is None:
            raise _err(404, f"no image with id {item_id}")
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    @api.get("/", response_class=HTMLResponse)
    async def index_page(self, request: Request) -> HTMLResponse:
        cat = self.catalog
        info = (f"{len(cat.get(None).store)} indexed pairs, {self.cfg.backend} search"
                if cat.default else "no index loaded: search is unavailable")
        return HTMLResponse(page.render(info, self.cfg.page_k, request.scope.get("root_path", "")))
