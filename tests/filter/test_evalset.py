"""Eval-set near-duplicates: re-encoded / resized / cropped copies caught, unrelated not."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_ray.data.config import DataConfig
from align_ray.data.resizer import process_image
from align_ray.filter.evalset import image_phash, load_hashes, min_distance
from tests.data.test_resizer import encode, picture


def test_min_distance_is_exact_hamming():
    ev = np.array([0, 2 ** 64 - 1], np.uint64)
    got = min_distance(np.array([0, 1, 0b111, 2 ** 63, 2 ** 64 - 2], np.uint64), ev, chunk=1)
    assert got.tolist() == [0, 1, 3, 1, 1]
    assert min_distance(np.array([5], np.uint64), np.array([], np.uint64)).tolist() == [64]


def test_copies_of_eval_images_are_caught_and_unrelated_are_not(tmp_path):
    evals = [picture(500, 400, seed=s) for s in range(3)]
    pq.write_table(pa.table({"image": [encode(im, "PNG") for im in evals]}),
                   tmp_path / "eval.parquet")
    hashes = load_hashes([str(tmp_path / "eval.parquet")])
    assert len(hashes) == 3
    # what the download stage would store for copies found on the web
    stage = DataConfig(image_size=256, resize_mode="center_crop")
    copies = [encode(evals[0], "JPEG", quality=35), encode(evals[1].resize((460, 368)), "JPEG"),
              encode(evals[2].resize((640, 512)), "WEBP"), encode(evals[0], "JPEG", quality=90)]
    near = min_distance(np.array([process_image(d, stage).phash for d in copies], np.uint64),
                        hashes)
    assert near.max() <= 6, near
    unrelated = [encode(picture(500, 400, seed=s), "JPEG") for s in range(100, 130)]
    far = min_distance(np.array([process_image(d, stage).phash for d in unrelated], np.uint64),
                       hashes)
    assert far.min() > 8, far        # the default eval_max_distance


def test_unreadable_eval_image_is_an_error_not_a_silent_skip(tmp_path):
    pq.write_table(pa.table({"jpg": [encode(picture(), "JPEG"), b"not an image"]}),
                   tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="image 1 is unreadable"):
        load_hashes([str(tmp_path)])
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="no image column"):
        load_hashes([str(tmp_path)])


def test_eval_hash_matches_the_download_stage():
    data = encode(picture(300, 300, seed=7), "JPEG")
    assert image_phash(data) == process_image(data, DataConfig(resize_mode="keep_ratio")).phash


def test_a_stage_dir_reads_only_its_samples(tmp_path):
    """A stage output as an eval set: its parquet/ is read, never dropped/ or _manifest/."""
    from align_ray.layout import Layout

    good = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"jpg": [encode(picture(300, 200, seed=7), "JPEG")]}), good)
    stage = Layout(str(tmp_path / "stage"))
    stage.write_samples("s", pq.read_table(good), parquet=True, webdataset=False)
    stage.write_dropped("s", pa.table({"key": ["k"], "reason": ["x"]}))   # no image column
    assert list(load_hashes([stage.uri])) == list(load_hashes([str(good)]))
