"""Global distinct counts on Ray Data, with answers computed by hand (boundaries and skew)."""

from __future__ import annotations

import pyarrow as pa
import ray.data

from align_ray.filter.counts import count_distinct, over_limit


def rows_for(spec):
    """spec: list of (image, text, repeats) -> table of sha256/text_hash rows."""
    img, txt = [], []
    for image, text, reps in spec:
        img += [image] * reps
        txt += [text] * reps
    return pa.table({"sha256": img, "text_hash": pa.array(txt, pa.uint64())})


def test_images_per_text_boundary_and_texts_per_image(ray_cluster):
    spec = ([(f"i{n}", 1, 1) for n in range(10)]          # text 1: 10 images -> kept
            + [(f"j{n}", 2, 2) for n in range(11)]        # text 2: 11 images (each twice) -> over
            + [("k", 3, 5)])                              # text 3: 1 image, 5 rows
    ds = ray.data.from_arrow(rows_for(spec)).repartition(7)
    counts = {r["text_hash"]: r["n"] for r in
              count_distinct(ds, "text_hash", "sha256", num_partitions=4).take_all()}
    assert counts == {1: 10, 2: 11, 3: 1}
    bad = [r["text_hash"] for r in over_limit(
        count_distinct(ds, "text_hash", "sha256", num_partitions=4), "text_hash", 10).take_all()]
    assert bad == [2]


def test_texts_per_image_1000_vs_1001_with_skew(ray_cluster):
    spec = ([("a", t, 1) for t in range(1000)]            # image a: 1000 texts -> kept
            + [("b", t, 1) for t in range(1001)]          # image b: 1001 texts -> over
            + [("c", 7, 3000)])                           # skew: one pair on 3000 rows
    ds = ray.data.from_arrow(rows_for(spec)).repartition(5)
    counts = count_distinct(ds, "sha256", "text_hash", num_partitions=3)
    got = {r["sha256"]: r["n"] for r in counts.take_all()}
    assert got == {"a": 1000, "b": 1001, "c": 1}
    assert [r["sha256"] for r in over_limit(counts, "sha256", 1000).take_all()] == ["b"]
