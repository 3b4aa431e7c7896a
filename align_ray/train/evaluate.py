"""Zero-shot retrieval and classification metrics (exact, NumPy; no Ray).

Retrieval: query i's correct gallery items are every j with ``match[j] == match[i]`` (row i's own
pair always counts).  Its rank is 1 + the number of *incorrect* gallery items scoring at least as
high as its best correct item: ties count against the query (pessimistic), so a collapsed model
(all scores equal) gets the worst rank, never R@1 = 1.  Similarities are computed in row chunks
(``chunk`` x N floats at a time), so a 100k x 100k evaluation never holds the full matrix.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

KS = (1, 5, 10)
DEFAULT_TEMPLATES = ("a photo of a {}.", "{}")


def _codes(match: Sequence[Any] | None, n: int) -> np.ndarray:
    if match is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(match, dtype=object) if not isinstance(match, np.ndarray) else match
    if len(arr) != n:
        raise ValueError(f"match has {len(arr)} values for {n} pairs")
    _, inv = np.unique(arr.astype(str) if arr.dtype == object else arr, return_inverse=True)
    return inv.astype(np.int64).reshape(-1)


def _auto_chunk(n: int, budget: int = 1 << 24) -> int:
    return max(1, min(n, budget // max(1, n)))


def ranks(queries: np.ndarray, gallery: np.ndarray, q_codes: np.ndarray, g_codes: np.ndarray,
          chunk: int | None = None) -> np.ndarray:
    """1-based rank of each query's best correct gallery item (pessimistic on ties)."""
    q = np.asarray(queries, dtype=np.float32)
    g = np.asarray(gallery, dtype=np.float32)
    chunk = chunk or _auto_chunk(len(g))
    out = np.empty(len(q), dtype=np.int64)
    for s in range(0, len(q), chunk):
        sims = q[s:s + chunk] @ g.T
        correct = q_codes[s:s + chunk, None] == g_codes[None, :]
        best = np.where(correct, sims, -np.inf).max(axis=1)
        out[s:s + chunk] = 1 + ((sims >= best[:, None]) & ~correct).sum(axis=1)
    return out


def _summary(r: np.ndarray) -> dict[str, float]:
    out = {f"R@{k}": float(np.mean(r <= k)) for k in KS}
    out["mean_rank"] = float(np.mean(r))
    out["median_rank"] = float(np.median(r))
    return out


def chance_recall(codes: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Expected R@k of a random ranking: mean over queries of 1 - C(N-m, k) / C(N, k), where m is
    the number of correct gallery items of the query."""
    n = len(codes)
    _, inv, counts = np.unique(codes, return_inverse=True, return_counts=True)
    m = counts[inv]
    out = {}
    for k in ks:
        miss = np.ones(n)
        for i in range(min(k, n)):
            miss *= np.clip((n - m - i) / (n - i), 0.0, 1.0)
        out[f"R@{k}"] = float(np.mean(1.0 - miss))
    return out


def retrieval_metrics(img_emb: np.ndarray, txt_emb: np.ndarray, match: Sequence[Any] | None = None,
                      chunk: int | None = None) -> dict[str, Any]:
    """R@1/5/10, mean and median rank for image->text and text->image over N pairs (row i of
    ``img_emb`` pairs with row i of ``txt_emb``); ``match``: optional per-row value, equal values
    are correct for each other.  Embeddings are expected L2-normalised (cosine = dot)."""
    img = np.asarray(img_emb, dtype=np.float32)
    txt = np.asarray(txt_emb, dtype=np.float32)
    if img.shape != txt.shape or img.ndim != 2:
        raise ValueError(f"need two [N, D] arrays of equal shape, got {img.shape} and {txt.shape}")
    codes = _codes(match, len(img))
    return {
        "n": int(len(img)),
        "image_to_text": _summary(ranks(img, txt, codes, codes, chunk)),
        "text_to_image": _summary(ranks(txt, img, codes, codes, chunk)),
        "chance": chance_recall(codes),
    }


def class_embeddings(embedder, classes: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Per class: embed every template filled with the class name, average, L2-normalise."""
    per_t = np.stack([embedder.embed_texts([t.format(c) for c in classes]) for t in templates])
    mean = per_t.mean(axis=0)
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def topk_accuracy(img_emb: np.ndarray, class_emb: np.ndarray, label_idx: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    scores = np.asarray(img_emb, np.float32) @ np.asarray(class_emb, np.float32).T
    true = scores[np.arange(len(scores)), label_idx]
    # rank of the true class, pessimistic on ties (like retrieval)
    rank = (scores >= true[:, None]).sum(axis=1)
    return {f"top{k}": float(np.mean(rank <= k)) for k in ks}


def zero_shot_classify(embedder, images, labels: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES,
                       classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Zero-shot classification: ``images`` (image bytes, or already computed image embeddings
    [N, D]) against class-name prompts ``templates`` x ``classes`` (default: the distinct
    ``labels``).  Returns top1/top5 accuracy, the number of images and classes."""
    labels = [str(v) for v in labels]
    classes = sorted(set(labels)) if classes is None else [str(c) for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted({v for v in labels if v not in index})
    if missing:
        raise ValueError(f"labels not among the classes: {missing[:5]}")
    if isinstance(images, np.ndarray) and images.ndim == 2:
        img = images
    else:
        img = embedder.embed_images(list(images))
    cls = class_embeddings(embedder, classes, templates)
    out = topk_accuracy(img, cls, np.asarray([index[v] for v in labels]))
    out.update(n=len(labels), classes=len(classes), chance_top1=1.0 / max(1, len(classes)),
               chance_top5=min(5, len(classes)) / max(1, len(classes)))
    return out

