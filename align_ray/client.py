"""A small Python client for the align-ray HTTP API (``align-ray serve``).

    >>> c = AlignClient("http://127.0.0.1:8000")
    >>> c.embed_text(["a dog on a beach"]).shape        # (1, D) float32
    >>> c.search(text="a dog on a beach", k=5)           # [{"id", "score", "text", "url", ...}]
    >>> c.search(image=open("dog.jpg", "rb").read(), modality="text")   # best captions
    >>> c.classify(open("dog.jpg", "rb").read(), ["dog", "cat"])     # [("dog", 0.93), ...]

Errors come back as :class:`APIError` with the HTTP status and the server's message.

**Retries.** Every endpoint is a pure read (embed, search, classify, a thumbnail), so a request
that got no answer can be sent again without harm.  By default the client sends it up to
``retries`` more times when the connection fails or breaks before the answer (a replica's node
died mid-request; a load balancer closed a kept-alive connection), and on a 502/503/504, or a
500, which is what Serve's HTTP proxy answers when the replica serving a request dies (it does
not replay the request itself; README "HTTP ingress").  The server gives 4xx for bad requests
and never 500 for them, so a retried 500 is a lost replica or a server bug; a bug's 500 comes
back after the retries as an :class:`APIError`.  A 503's ``Retry-After`` (the encoders' back
pressure) is honoured.  ``timeout`` holds per attempt.  ``retries=0`` turns this off (the
tests do, so that a flaky server cannot pass them).
"""

from __future__ import annotations

import base64
import os
from typing import Any, Sequence

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

RETRY_STATUS = (500, 502, 503, 504)


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def b64(image: bytes | str | os.PathLike) -> str:
    """Image bytes (or a file path) -> base64 text for a request."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            image = f.read()
    return base64.b64encode(image).decode("ascii")


def retrying_session(retries: int = 2, backoff_s: float = 0.25) -> requests.Session:
    """A ``requests`` session that replays any request, POST included, on a failed or broken
    connection and on :data:`RETRY_STATUS`, ``retries`` times at most (module doc: why that is
    safe here).  The first replay goes at once, later ones after ``backoff_s``, doubling
    (urllib3's backoff)."""
    session = requests.Session()
    if retries > 0:
        policy = Retry(total=retries, connect=retries, read=retries, status=retries,
                       allowed_methods=None, status_forcelist=RETRY_STATUS,
                       backoff_factor=backoff_s, respect_retry_after_header=True,
                       raise_on_status=False)
        adapter = HTTPAdapter(max_retries=policy)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    return session


class AlignClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0,
                 session: requests.Session | None = None, retries: int = 2):
        """``session``: your own ``requests`` session, used as it is (``retries`` then does
        nothing; :func:`retrying_session` builds one with the retries)."""
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or retrying_session(retries)

    # -- raw access ---------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One HTTP call, no status check (tests use it to send anything at all)."""
        kwargs.setdefault("timeout", self.timeout)
        return self.session.request(method, f"{self.base_url}/{path.lstrip('/')}", **kwargs)

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        r = self.request(method, path, json=payload) if payload is not None else self.request(method, path)
        if r.status_code >= 400:
            try:
                message = r.json().get("detail", r.text)
            except ValueError:
                message = r.text
            raise APIError(r.status_code, str(message))
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    # -- API ----------------------------------------------------------------------------------
    def healthz(self) -> dict:
        return self._call("GET", "/healthz")

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        out = self._call("POST", "/v1/embed/text", {"texts": list(texts)})
        return np.asarray(out["embeddings"], np.float32).reshape(-1, out["dim"])

    def embed_image(self, images: Sequence[bytes | str | os.PathLike]) -> np.ndarray:
        out = self._call("POST", "/v1/embed/image", {"images": [b64(i) for i in images]})
        return np.asarray(out["embeddings"], np.float32).reshape(-1, out["dim"])

    def search(self, text: str | None = None, image: bytes | str | os.PathLike | None = None,
               embedding: Sequence[float] | np.ndarray | None = None, k: int = 10,
               modality: str | None = None, dedup: bool = False) -> list[dict]:
        """Exactly one of ``text`` / ``image`` / ``embedding``.  ``modality`` = the index searched
        (default: the other one: text -> images, image -> captions, embedding -> images)."""
        payload: dict[str, Any] = {"k": k, "dedup": dedup}
        if text is not None:
            payload["text"] = text
        if image is not None:
            payload["image"] = b64(image)
        if embedding is not None:
            payload["embedding"] = [float(v) for v in np.asarray(embedding).reshape(-1)]
        if modality is not None:
            payload["modality"] = modality
        return self._call("POST", "/v1/search", payload)["results"]

    def classify(self, image: bytes | str | os.PathLike, labels: Sequence[str],
                 templates: Sequence[str] | None = None) -> list[tuple[str, float]]:
        payload: dict[str, Any] = {"image": b64(image), "labels": list(labels)}
        if templates is not None:
            payload["templates"] = list(templates)
        out = self._call("POST", "/v1/classify", payload)
        return list(zip(out["labels"], out["scores"]))

    def image(self, item_id: int) -> bytes:
        """The indexed image's thumbnail (JPEG bytes)."""
        return self._call("GET", f"/v1/image/{int(item_id)}")
