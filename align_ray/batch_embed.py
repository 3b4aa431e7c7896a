"""Batch inference pieces shared by ``align-ray index`` and ``align-ray score``: the size of the
encoder actor pool, one Embedder per actor, and decode-then-embed of (image bytes, text) pairs
that sets the undecodable rows aside instead of failing the batch.

Both stages run the same model code on the same bytes, so an index built from a scored corpus
and the scores themselves agree on what each pair embeds to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


def pool_size(cfg: Any, resources: dict[str, float] | None = None) -> tuple[int, float]:
    """(most encoder actors, CPUs per actor) for a config with ``concurrency``, ``num_cpus`` and
    ``num_gpus``.  ``cfg.concurrency`` actors of ``cfg.num_cpus`` when set; else as many as the
    cluster's *free* resources hold with one CPU left over for the read / repartition / write
    tasks that feed them, shrinking a lone actor to a fractional CPU when even one whole actor
    would not leave that room (e.g. next to a running Serve app).  GPU actors: one per
    ``num_gpus`` share.  ``resources`` defaults to ``ray.available_resources()``; a cluster with
    nothing free (still scaling up) gets one actor as configured."""
    if cfg.concurrency:
        return cfg.concurrency, cfg.num_cpus
    if resources is None:
        import ray

        resources = ray.available_resources()
    free = float(resources.get("CPU", 0))
    cpus, room = cfg.num_cpus, free - 1
    if cpus > 0 and free > 0 and room < cpus:
        cpus = round(room if room > 0 else free / 2, 3)
    fits = [math.floor(room / cpus + 1e-9)] if cpus > 0 and room > 0 else []
    if cfg.num_gpus > 0:
        fits.append(math.floor(float(resources.get("GPU", 0)) / cfg.num_gpus + 1e-9))
    return max(1, min(fits) if fits else 1), cpus


def actor_embedder(model: str, device: str, threads: int = 1):
    """The Embedder of one pool actor (any ``--model`` kind, :func:`load_embedder`)."""
    import torch

    from align_ray.model.pretrained import load_embedder

    # as many intra-op threads as CPUs reserved for the actor: more would steal the cores
    # the other actors and the read/write tasks were promised
    torch.set_num_threads(max(1, threads))
    return load_embedder(model, device=device)


def decode(data: bytes | None, draft: int | None):
    """(PIL image, None) or (None, why it does not decode), decoded exactly as ImageEncoder
    decodes a query, so the same bytes embed the same everywhere."""
    from align_ray.model.transforms import decode_rgb

    try:
        return decode_rgb(data or b"", draft=draft), None
    except ValueError as e:
        return None, str(e)


@dataclass
class Embedded:
    """The decodable pairs of a batch: their row indices, decoded images, texts, embeddings;
    and the undecodable ones as {row index: reason detail}."""
    keep: list[int]
    images: list
    texts: list[str]
    image_emb: np.ndarray
    text_emb: np.ndarray
    failed: dict[int, str]


def embed_pairs(embedder: Any, images: Sequence[bytes | None],
                texts: Sequence[str | None]) -> Embedded:
    """Decode every image, embed the decodable pairs (L2-normalised float32 rows)."""
    draft = embedder.decode_draft
    keep, pils, failed = [], [], {}
    for j, data in enumerate(images):
        im, why = decode(data, draft)
        if im is None:
            failed[j] = why
        else:
            keep.append(j)
            pils.append(im)
    kept_texts = [texts[j] or "" for j in keep]
    return Embedded(keep, pils, kept_texts, embedder.embed_images(pils),
                    embedder.embed_texts(kept_texts), failed)
