"""Near-duplicate images across the corpus (``near_duplicate``): the band search against a
brute-force search over every pair, on planted hashes (every distance 0..d+1, chains, images
with several rows, differing bits spread over every band but one) and on real images (dev-set
emoji and re-encoded copies of some, hashed by the download stage's own code), every other rule
off."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from align_ray.filter import neardup, pipeline
from align_ray.filter.config import RULES, FilterConfig
from align_ray.filter.evalset import image_phash
from tests.conftest import DEV_SET
from tests.filter import crafted
from tests.filter.test_pipeline import read_dir

OTHER_RULES = [r for r in RULES if r != neardup.RULE]


def test_bands_cover_the_64_bits():
    for d in range(17):
        b = neardup.bands(d)
        assert len(b) == d + 1 and sum(w for _, w in b) == 64
        assert [s for s, _ in b] == list(np.cumsum([0] + [w for _, w in b])[:-1])
        assert max(w for _, w in b) - min(w for _, w in b) <= 1


def _flip(h: int, bits: list[int]) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def _brute(images: list[tuple[str, int]], first: dict[str, int], d: int) -> dict[str, int]:
    """image -> the smallest first key among the images within d bits with a smaller one."""
    out = {}
    for a, ha in images:
        near = [first[b] for b, hb in images
                if b != a and bin(ha ^ hb).count("1") <= d and first[b] < first[a]]
        if near:
            out[a] = min(near)
    return out


def _candidates(images: dict[str, int], d: int) -> dict[str, int]:
    """image -> the images it shares a band with, summed over its bands (what the search
    compares it with)."""
    out = dict.fromkeys(images, 0)
    for shift, width in neardup.bands(d):
        mask = (1 << width) - 1
        for a, ha in images.items():
            out[a] += sum(1 for b, hb in images.items()
                          if b != a and (ha >> shift) & mask == (hb >> shift) & mask)
    return out


def _verdicts(out) -> dict[str, tuple[str | None, str]]:
    kept = read_dir(out, "parquet")
    dropped = read_dir(out, "dropped", "0*.parquet")
    v = {k: (None, "") for k in kept.column("key").to_pylist()}
    v.update({k: (r, d) for k, r, d in zip(dropped.column("key").to_pylist(),
                                           dropped.column("reason").to_pylist(),
                                           dropped.column("detail").to_pylist())})
    return v


def _check(c: crafted.Corpus, images: dict[str, int], d: int, out, stats: dict) -> dict:
    """Every row's verdict is the brute-force one; returns the brute-force matches."""
    rows_of: dict[str, list[str]] = {}
    for r in c.rows:
        rows_of.setdefault(r["url"].rsplit("/", 1)[1], []).append(r["key"])
    return _check_rows(rows_of, images, d, out, stats)


def _check_rows(rows_of: dict[str, list[str]], images: dict[str, int], d: int, out,
                stats: dict) -> dict:
    """``rows_of``: image -> its row keys; ``images``: image -> its pHash."""
    first = {img: min(int(k) for k in keys) for img, keys in rows_of.items()}
    want = _brute(list(images.items()), first, d)
    cands = _candidates(images, d)
    got = _verdicts(out)
    assert len(got) == sum(len(k) for k in rows_of.values())
    # every row, kept or dropped, carries its image's candidate count
    counted = {k: c for part in (read_dir(out, "parquet"), read_dir(out, "dropped", "0*.parquet"))
               for k, c in zip(part.column("key").to_pylist(),
                               part.column(neardup.CANDIDATES).to_pylist())}
    assert counted == {k: cands[img] for img, keys in rows_of.items() for k in keys}
    for img, keys in rows_of.items():
        for k in keys:
            if img in want:
                reason, detail = got[k]
                assert reason == neardup.RULE, (img, k, got[k])
                assert detail == (f"pHash within {d} bits of the image of key "
                                  f"{want[img]:014d} ({cands[img]} candidates compared)"), detail
            else:
                assert got[k] == (None, ""), (img, k, got[k])
    nd = stats["near_duplicate"]
    assert nd["images"] == len(images) and nd["distance"] == d
    assert nd["images_with_an_earlier_near_duplicate"] == len(want)
    assert nd["candidates_per_image"] == {"mean": round(sum(cands.values()) / len(images), 3),
                                          "max": max(cands.values())}
    assert stats["stages"]["filter"]["dropped"] == (
        {neardup.RULE: sum(len(rows_of[i]) for i in want)} if want else {})
    return want


def _run_crafted(c: crafted.Corpus, images: dict[str, int], d: int, tmp_path, *,
                 shard_size: int, partitions: int) -> tuple[dict, dict]:
    """Write ``c`` as a download stage, filter it with only ``near_duplicate`` on, check every
    verdict against brute force; returns (stats, the brute-force matches)."""
    stage = tmp_path / "stage"
    crafted.write_stage1(c, stage, shard_size=shard_size)
    cfg = FilterConfig(input=str(stage), output=str(tmp_path / "out"), disabled_rules=OTHER_RULES,
                       near_dup_distance=d, num_partitions=partitions, write_webdataset=False)
    stats = pipeline.run(cfg)
    return stats, _check(c, images, d, tmp_path / "out", stats)


def test_band_search_equals_brute_force_on_planted_hashes(ray_cluster, tmp_path):
    d = 4
    rng = np.random.default_rng(7)
    c, images = crafted.Corpus(), {}

    def add(img: str, h: int, texts: int = 1):
        images[img] = h
        for t in range(texts):
            c.add(img, f"caption {img} {t}", None, phash=h)

    bases = [int(x) for x in rng.integers(0, 2**63, size=40, dtype=np.int64)]
    # a copy before its base in key order: the base is the one dropped
    add("early-copy", _flip(bases[10], [1, 2, 3]))
    for i, h in enumerate(bases):
        add(f"base{i}", h, texts=1 + i % 3)             # some images carry several rows
    # every distance 0..d+1 from base0..base5, the copy after its base
    for dist in range(d + 2):
        add(f"copy{dist}", _flip(bases[dist], list(range(0, 64, 64 // max(dist, 1)))[:dist]))
    # a chain a ~ b ~ c with a, c further apart than d: b and c both go (c is close to b)
    a = bases[20]
    add("chain-b", _flip(a, [0, 13, 26, 39]))
    add("chain-c", _flip(a, [0, 13, 26, 39, 52, 60, 61, 62]))
    # d bits differing, one in each band but the last: only that band's bucket finds the pair
    shifts = [s for s, _ in neardup.bands(d)]
    add("spread", _flip(bases[30], [s + 1 for s in shifts[:-1]]))
    # d + 1 bits, one per band: no bucket in common, and not within d anyway
    add("spread-too-far", _flip(bases[31], [s + 1 for s in shifts]))
    stats, want = _run_crafted(c, images, d, tmp_path, shard_size=25, partitions=3)
    assert {"copy0", "copy1", "copy2", "copy3", "copy4", "base10", "chain-b", "chain-c",
            "spread"} <= set(want)
    assert not {"copy5", "spread-too-far", "early-copy", "base0", "base20"} & set(want)
    assert "near_duplicate (pHash <= 4 bits" in stats["report"]
    # an identical copy meets its base in every band
    assert stats["near_duplicate"]["candidates_per_image"]["max"] >= d + 1
    # filtered again (its output as input): nothing more goes, and nd_candidates is renewed,
    # not doubled
    again = pipeline.run(FilterConfig(input=str(tmp_path / "out"), output=str(tmp_path / "again"),
                                      disabled_rules=OTHER_RULES, near_dup_distance=d,
                                      write_webdataset=False))
    assert again["stages"]["filter"]["dropped"] == {}
    kept = read_dir(tmp_path / "again", "parquet")
    assert kept.column_names.count(neardup.CANDIDATES) == 1


def _reencode(data: bytes, size: int, quality: int) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.skipif(not DEV_SET.exists(), reason="needs the shared dev set")
def test_real_images_reencoded_copies_are_found(ray_cluster, tmp_path):
    """200 dev-set emoji and JPEG re-encodings (q 75) of 8 of them, after them in key
    order: every copy is dropped against its original, and the whole verdict is the
    brute-force one over the same hashes (natural look-alikes among the emoji included)."""
    d = 6
    dev = pq.read_table(DEV_SET, columns=["image", "text"]).slice(0, 200).to_pylist()
    c, images = crafted.Corpus(), {}
    for i, r in enumerate(dev):
        images[f"dev{i}"] = image_phash(r["image"])
        c.add(f"dev{i}", r["text"], None, phash=images[f"dev{i}"])
    for i in range(0, 200, 25):
        img = f"copy-of-dev{i}"
        images[img] = image_phash(_reencode(dev[i]["image"], 64, 75))
        c.add(img, dev[i]["text"] + " again", None, phash=images[img])
    stats, want = _run_crafted(c, images, d, tmp_path, shard_size=50, partitions=2)
    for i in range(0, 200, 25):
        assert f"copy-of-dev{i}" in want, (i, bin(images[f"dev{i}"] ^ images[f"copy-of-dev{i}"]))
    # emoji that differ only in skin tone or a detail are near-duplicates by pHash too; the
    # brute force above decided those, and most of the 200 stay
    assert len(want) < 100


def test_noisy_web_reencodings_are_found(ray_cluster, web, tmp_path):
    """The built-in noisy web through ``align-ray data``: its ``near_dup`` rows are earlier
    images re-served smaller (85-97 %) and re-encoded (JPEG q 60-85); the filter's verdict on
    every downloaded row is the brute-force one over the stage's own pHashes, and the
    re-encodings within d bits of their source go."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    d = 6
    rows = web.url_rows(200, noise=True)
    src = web.write_url_list(tmp_path / "urls.parquet", rows)
    stage = tmp_path / "web"
    proc = subprocess.run(
        [sys.executable, "-m", "align_ray.cli", "data", "--input", str(src), "--output",
         str(stage), "--allow-cidr", "127.0.0.0/8", "--image-size", "64", "--shard-size", "50",
         "--url-col", "url", "--text-col", "caption", "--timeout-total", "10", "--retries", "1",
         "--ray-address", ray_cluster.get_runtime_context().gcs_address],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_dir(stage, "parquet")
    rows_of: dict[str, list[str]] = {}
    images: dict[str, int] = {}
    for key, sha, ph in zip(got.column("key").to_pylist(), got.column("sha256").to_pylist(),
                            got.column("phash").to_pylist()):
        rows_of.setdefault(sha, []).append(key)
        images[sha] = ph
    cfg = FilterConfig(input=str(stage), output=str(tmp_path / "out"), disabled_rules=OTHER_RULES,
                       near_dup_distance=d, num_partitions=2, write_webdataset=False)
    stats = pipeline.run(cfg)
    want = _check_rows(rows_of, images, d, tmp_path / "out", stats)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["near_duplicate"] == \
        stats["near_duplicate"]
    # the planted re-encodings: each came after its source, and most land within d bits
    noise = {f"{i:014d}": r["noise"] for i, r in enumerate(rows)}
    reencoded = [sha for sha, keys in rows_of.items()
                 if any(noise.get(k) == "near_dup" for k in keys)]
    found = [sha for sha in reencoded if sha in want]
    assert len(reencoded) >= 4 and len(found) >= len(reencoded) // 2, (len(found), len(reencoded))
    print(f"noisy web: {len(images)} images, {len(want)} with an earlier near-duplicate; "
          f"{len(found)} of {len(reencoded)} re-encodings within {d} bits")


def test_bad_distance_is_refused():
    with pytest.raises(ValueError, match="near_dup_distance must be in 0..16"):
        FilterConfig(near_dup_distance=17)
    assert not FilterConfig().enabled(neardup.RULE)
    assert FilterConfig(near_dup_distance=0).enabled(neardup.RULE)
