"""MetaCLIP-style balancing (``metaclip_balance``) on a real local Ray cluster: a crafted stage
whose captions match a small concept file in known ways (a head entry over the cap, tail
entries under it, near-misses that must not match), every other rule off."""

from __future__ import annotations

import numpy as np
import pytest

from align_ray.data.errors import InputError
from align_ray.filter import balance, pipeline
from align_ray.filter.config import RULES, FilterConfig
from tests.filter import crafted
from tests.filter.test_pipeline import read_dir

CAP = 20
ENTRIES = "cat\ndog\n  Red Car \n# a comment\n\nzebra\ncat\n"
OTHER_RULES = [r for r in RULES if r != balance.RULE]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    c = crafted.Corpus()
    groups = {}
    for name, n, fmt in (("cat", 120, "a cat number {}"), ("cat+dog", 10, "a dog and a cat {}"),
                         ("red car", 6, "red car {}"), ("red car, spelt", 2, "Red  CAR! {}"),
                         ("car red", 4, "car red {}"), ("category", 3, "category {}")):
        groups[name] = []
        for i in range(n):
            groups[name].append(f"{len(c.rows):014d}")
            c.add(f"{name}-{i}", fmt.format(i), None)
    root = tmp_path_factory.mktemp("balance")
    out = root / "stage"
    crafted.write_stage1(c, out, shard_size=50)
    (root / "entries.txt").write_text(ENTRIES)
    return out, root / "entries.txt", groups


def _run(stage, tmp_path, name="out", **kw) -> tuple[dict, dict[str, tuple[str | None, str]]]:
    out, entries, _ = stage
    cfg = FilterConfig(input=str(out), output=str(tmp_path / name), disabled_rules=OTHER_RULES,
                       balance_entries=str(entries), write_webdataset=False,
                       **{"balance_cap": CAP, **kw})
    stats = pipeline.run(cfg)
    kept = read_dir(tmp_path / name, "parquet")
    dropped = read_dir(tmp_path / name, "dropped", "0*.parquet")
    verdict = {k: (None, "") for k in kept.column("key").to_pylist()}
    verdict.update({k: (r, d) for k, r, d in zip(dropped.column("key").to_pylist(),
                                                 dropped.column("reason").to_pylist(),
                                                 dropped.column("detail").to_pylist())})
    return stats, verdict


def test_head_entries_are_sampled_down_the_tail_kept_and_unmatched_pairs_dropped(
        ray_cluster, stage, tmp_path):
    _, _, groups = stage
    stats, verdict = _run(stage, tmp_path, num_partitions=3)
    assert len(verdict) == sum(len(g) for g in groups.values())
    assert stats["balance"] == {
        "entries": 4, "entries_matched": 3, "entries_over_cap": 1, "cap": CAP,
        "largest": [{"entry": "cat", "pairs": 130}, {"entry": "dog", "pairs": 10},
                    {"entry": "red car", "pairs": 8}]}
    # under the cap: every pair kept, whatever else it matches; the spelling is normalised
    for name in ("cat+dog", "red car", "red car, spelt"):
        assert all(verdict[k] == (None, "") for k in groups[name]), name
    # whole words in order only
    for name in ("car red", "category"):
        assert all(verdict[k] == (balance.RULE, "matches no metadata entry")
                   for k in groups[name]), name
    # over the cap: each pair kept with probability 20/130, by its deterministic draw
    draw = balance.uniform(np.array([int(k) for k in groups["cat"]]), np.zeros(120, int), 0)
    want_kept = {k for k, u in zip(groups["cat"], draw) if u < CAP / 130}
    got_kept = {k for k in groups["cat"] if verdict[k][0] is None}
    assert got_kept == want_kept and 5 <= len(got_kept) <= 35
    for k in set(groups["cat"]) - got_kept:
        assert verdict[k] == (balance.RULE,
                              f"entries 'cat' (130 pairs) over the cap {CAP}: not sampled")
    assert stats["stages"]["filter"]["dropped"] == {
        balance.RULE: 120 - len(got_kept) + 4 + 3}

    # the draws are a function of (key, entry, seed): other partitions keep the same rows,
    # another seed other ones
    _, same = _run(stage, tmp_path, name="out-parts", num_partitions=1)
    assert same == verdict
    _, other = _run(stage, tmp_path, name="out-seed", num_partitions=3, balance_seed=1)
    assert {k for k in groups["cat"] if other[k][0] is None} != got_kept


def test_a_missing_or_empty_entry_file_fails_before_the_output_is_touched(ray_cluster, stage,
                                                                          tmp_path):
    out, _, _ = stage
    keep = tmp_path / "out" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("an earlier run's file")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    for path, msg in ((tmp_path / "nope.txt", "does not exist"),
                      (tmp_path / "empty.txt", "has no entries")):
        cfg = FilterConfig(input=str(out), output=str(tmp_path / "out"), balance_entries=str(path))
        with pytest.raises(InputError, match=msg):
            pipeline.run(cfg)
        assert keep.exists()
    with pytest.raises(ValueError, match="balance_cap"):
        FilterConfig(balance_entries="x", balance_cap=0)


def test_matches_and_draws():
    import pyarrow as pa

    entries = pa.array(["cat", "red car", "new york city"])
    row, ids = balance.matches(pa.array(["a cat in new york city", "red car", "car red cat",
                                         "", None, "red carpet"]), entries)
    assert list(zip(row.tolist(), ids.tolist())) == [(0, 0), (0, 2), (1, 1), (2, 0)]
    u = balance.uniform(np.arange(200_000), np.full(200_000, 3), 0)
    assert 0 <= u.min() and u.max() < 1 and abs((u < 0.1).mean() - 0.1) < 0.005
    assert not np.array_equal(u, balance.uniform(np.arange(200_000), np.full(200_000, 3), 1))


def test_entry_counts_sum_every_block(ray_cluster):
    """Counts over a dataset of 3 blocks equal a count over the texts in one go (each pair
    counted once per caption, however often the entry occurs in it)."""
    import pyarrow as pa
    import ray.data

    entries = pa.array(["cat", "red car"])
    texts = [["cat cat", "red car", "a dog"], ["cat and red car", "the cat"], ["red", "car"]]
    ds = ray.data.from_arrow([pa.table({"text": t}) for t in texts])
    assert ds.num_blocks() == 3
    assert balance.entry_counts(ds, entries).tolist() == [3, 2]


# ---- on real captions: the dev-set corpus of the score tests as a data-stage dir
from tests.score import conftest as score_fixtures  # noqa: E402

corpus, stage_in = score_fixtures.corpus, score_fixtures.stage_in


def test_dev_set_captions_against_a_hand_count(ray_cluster, stage_in, tmp_path):
    """Emoji names: "face" is in most captions (over a cap of 10), "smiling eyes" in a few
    (under it).  Every row's verdict is the one the MetaCLIP rule gives from a plain word count
    and the rule's own per-(key, entry) draw."""
    import re

    entries = tmp_path / "entries.txt"
    entries.write_text("face\nsmiling eyes\n")
    cap = 10
    stats, verdict = _run((stage_in, entries, None), tmp_path, balance_cap=cap)
    rows = read_dir(stage_in, "parquet")
    texts = dict(zip(rows.column("key").to_pylist(), rows.column("text").to_pylist()))

    def has(text: str, entry: str) -> bool:
        return f" {entry} " in f" {' '.join(re.findall(r'[a-z0-9]+', text.lower()))} "

    face = [k for k, t in texts.items() if has(t, "face")]
    smiling = {k for k, t in texts.items() if has(t, "smiling eyes")}
    assert len(face) > cap >= len(smiling) > 0
    draw = balance.uniform(np.array([int(k) for k in face]), np.zeros(len(face), int), 0)
    want = smiling | {k for k, u in zip(face, draw) if u < cap / len(face)}
    assert {k for k, (r, _) in verdict.items() if r is None} == want
    assert {r for k, (r, _) in verdict.items() if k not in want} == {balance.RULE}
    assert stats["balance"]["largest"][0] == {"entry": "face", "pairs": len(face)}
    assert stats["input_rows"] == stats["output_rows"] + sum(stats["dropped"].values())
