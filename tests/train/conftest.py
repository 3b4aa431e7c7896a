"""A small slice of the dev set (128 train + 32 val rows) plus one undecodable training image."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import DEV_SET

DEV = str(DEV_SET)  # found as every test finds it ($ALIGN_RAY_SHARED, shared/ by the checkout)


@pytest.fixture(scope="session")
def small_parquet(tmp_path_factory):
    t = pq.read_table(DEV, columns=["image", "alt_text", "concept", "dev_split", "label"])
    train = t.filter(pc.equal(t["dev_split"], "train")).slice(0, 128)
    val = t.filter(pc.equal(t["dev_split"], "val")).slice(0, 32)
    bad = pa.table({"image": pa.array([b"not an image"], pa.binary()),
                    "alt_text": ["broken (bytes)"], "concept": ["emoji:BAD"],
                    "dev_split": ["train"], "label": ["broken"]}).cast(t.schema)
    path = tmp_path_factory.mktemp("data") / "small.parquet"
    pq.write_table(pa.concat_tables([train.slice(0, 64), bad, train.slice(64), val]), path,
                   row_group_size=40)
    return str(path)
