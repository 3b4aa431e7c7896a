"""The sample generator and the ALIGN-style noise, without a server."""

from __future__ import annotations

import io
import re

from PIL import Image

from align_ray.web.noise import NOISE_KINDS, SHARED_ALTS, plan_pairs
from align_ray.web.synth import COLORS, SHAPES, image_size, jpeg_bytes, render, sample_spec


def test_sample_spec_is_pure_and_caption_names_its_attributes() -> None:
    for idx in range(50):
        spec = sample_spec(idx, seed=1)
        assert spec == sample_spec(idx, seed=1)
        assert spec["color"] != spec["background"] and 1 <= spec["count"] <= 4
        noun = spec["shape"] if spec["count"] == 1 else SHAPES[spec["shape"]]
        assert f"{spec['color']} {noun}" in spec["caption"]
    assert [sample_spec(i, 1) for i in range(20)] != [sample_spec(i, 2) for i in range(20)]


def test_flat_render_paints_background_and_shape_colours() -> None:
    spec = sample_spec(5, seed=0)
    img = render(spec, 200, 150)
    assert img.size == (200, 150) and img.mode == "RGB"
    counts = {rgb: n for n, rgb in img.getcolors(maxcolors=1 << 16)}
    assert max(counts, key=counts.get) == COLORS[spec["background"]]
    assert counts[COLORS[spec["color"]]] > 100
    assert jpeg_bytes(img) == jpeg_bytes(render(spec, 200, 150))


def test_photo_like_jpegs_weigh_like_web_photos() -> None:
    spec = sample_spec(2, seed=0)
    photo = jpeg_bytes(render(spec, 800, 600, photo_like=True))
    flat = jpeg_bytes(render(spec, 800, 600))
    assert 80_000 < len(photo) < 250_000 and len(flat) < 40_000
    assert Image.open(io.BytesIO(photo)).size == (800, 600)


def test_image_size_is_deterministic_and_in_range() -> None:
    sizes = [image_size(i, 0, (128, 512)) for i in range(100)]
    assert sizes == [image_size(i, 0, (128, 512)) for i in range(100)]
    assert all(128 <= side <= 512 for size in sizes for side in size) and len(set(sizes)) > 50


def plan(n: int, noise: bool = True) -> list:
    return plan_pairs(list(range(n)), 0, spec=lambda i: sample_spec(i, 0),
                      size=lambda i: image_size(i, 0, (128, 512)), noise=noise)


def test_plan_is_prefix_stable_and_covers_every_kind() -> None:
    pairs = plan(500)
    assert plan(200) == pairs[:200]
    assert {p.noise for p in pairs} == set(NOISE_KINDS)
    assert {p.noise for p in plan(100, noise=False)} == {"clean"}


def test_noisy_alt_texts_look_like_the_web() -> None:
    by_kind: dict[str, list] = {}
    for pair in plan(800):
        by_kind.setdefault(pair.noise, []).append(pair)
    assert all(re.fullmatch(r"[\w\- ]+\.(jpe?g|JPG|png)", p.caption) for p in by_kind["filename_alt"])
    assert {p.caption for p in by_kind["shared_alt"]} <= set(SHARED_ALTS) and len(by_kind["shared_alt"]) > 10
    for pair in by_kind["keyword_stuffing"]:
        spec = sample_spec(int(re.search(r"/img/(\d+)", pair.path).group(1)), 0)
        assert pair.caption.startswith(f"{spec['color']} {spec['shape']} {spec['color']} {spec['shape']}")
    english = {"the", "with", "at", "on", "background", "picture"}
    assert all(not english & set(p.caption.split()) for p in by_kind["non_english"])
    assert all(re.search(r"\?w=\d+&h=\d+$", p.path) for p in by_kind["tiny"] + by_kind["extreme_aspect"])
    assert all("copy=" in p.path for p in by_kind["dup_image"])
    assert all(re.search(r"\?w=\d+&h=\d+&q=\d+$", p.path) for p in by_kind["near_dup"])
