"""Optional per-row safety hook (off by default).

ALIGN also dropped pornographic images; we ship the hook, not a classifier.  Set
``safety_hook: "my_pkg.nsfw:check"`` in the filter config.  The function receives a
``pyarrow.Table`` of the rows that passed every frequency rule (all download-stage columns,
including the JPEG bytes in ``jpg``) and returns one value per row: falsy to keep it, or a
string saying why it is unsafe (it becomes the dropped row's ``detail``; the reason is
``unsafe``).  It runs inside the per-shard writers, so a model it loads is loaded once per
worker process; cache it at module level.
"""

from __future__ import annotations

import importlib
from typing import Callable

import pyarrow as pa

Hook = Callable[[pa.Table], list]


def load_hook(spec: str) -> Hook:
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"safety_hook must look like 'package.module:function', not {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"safety_hook {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ValueError(f"safety_hook {spec!r} is not callable")
    return fn


def keyword_hook(rows: pa.Table) -> list:
    """Example hook (documentation and tests): flags alt-texts containing a word from the
    comma-separated ``ALIGN_RAY_BLOCKLIST`` environment variable (default ``nsfw``).
    A real deployment would run an image classifier on ``rows.column("jpg")`` here."""
    import os

    from align_ray.filter.rules import unigrams

    words = {w.strip().lower() for w in os.environ.get("ALIGN_RAY_BLOCKLIST", "nsfw").split(",")}
    out = []
    for text in rows.column("text").to_pylist():
        hit = sorted(words.intersection(unigrams(text)))
        out.append(f"blocklisted word {hit[0]!r}" if hit else None)
    return out
