"""Published dual encoders (HF ALIGN / CLIP / SigLIP dirs, ``open_clip:ARCH:CKPT``) behind the
Embedder API: our embeddings are the library's own, ``align-ray eval`` scores exactly what the
library's embeddings score, and malformed ``--model`` values exit 2 before any work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align_ray.cli import main
from align_ray.model.external import ExternalEmbedder
from align_ray.model.pretrained import check_model_spec, load_embedder
from align_ray.model.transforms import decode_rgb
from align_ray.train.evaluate import retrieval_metrics, zero_shot_classify
from tests.model.external_models import (SIZE, assert_embeds_like, build_open_clip, captions,  # noqa: F401
                                         external_spec, library_logits, png, reference)

N = 8
LABELS = ["cat", "dog", "car", "tree"]


@pytest.fixture(scope="module")
def rows() -> dict:
    return {"image": [png(i) for i in range(N)], "text": captions(N),
            "label": [LABELS[i % len(LABELS)] for i in range(N)]}


def test_embeddings_are_the_librarys_own(external_spec, rows):
    emb = load_embedder(external_spec)
    assert isinstance(emb, ExternalEmbedder) and emb.image_size == SIZE
    ref_img, ref_txt = reference(external_spec, [decode_rgb(b) for b in rows["image"]], rows["text"])
    img, txt = emb.embed_images(rows["image"], batch_size=3), emb.embed_texts(rows["text"], batch_size=3)
    assert img.shape == ref_img.shape == txt.shape == ref_txt.shape == (N, emb.dim)
    assert_embeds_like(img, ref_img, "image")
    assert_embeds_like(txt, ref_txt, "text")
    # Serve's path: preprocess in one place, the forward pass on the stacked pixels in another
    pixels = emb.preprocess(rows["image"])
    packing = getattr(emb.model, "packing", None)     # SigLIP 2: one packed NaFlex vector
    assert pixels.shape == ((N, packing.size) if packing else (N, 3, SIZE, SIZE))
    np.testing.assert_allclose(emb.embed_pixels(pixels), img, atol=1e-5)
    assert check_model_spec(external_spec) == emb.dim


def _large_jpeg(seed: int) -> bytes:
    """A JPEG 8x the model's input side (SIZE): large enough for a DCT draft at 1/4 or 1/8."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(8 * SIZE + 16, 8 * SIZE, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_a_large_jpeg_embeds_as_the_library_embeds_it(external_spec, rows):
    """A user of the library decodes every pixel and hands the image to its processor; our
    decode must not start from a smaller DCT draft (other pixels, another embedding)."""
    import io

    from PIL import Image

    jpegs = [_large_jpeg(100 + i) for i in range(4)]
    emb = load_embedder(external_spec)
    ref, _ = reference(external_spec, [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs],
                       rows["text"][:4])
    for ours in (emb.embed_images(jpegs), emb.embed_pixels(emb.preprocess(jpegs))):
        assert (ours * ref).sum(1).min() >= 0.9999
    # the draft the test guards against gives another embedding (else it could not fail)
    drafted = np.stack([emb.transform(decode_rgb(j, draft=emb.image_size)) for j in jpegs])
    assert (emb.embed_pixels(drafted) * ref).sum(1).min() < 0.9999


def test_temperature_reproduces_the_librarys_logits(external_spec, rows):
    """/v1/classify scores cosine / temperature: the library's own logits, less SigLIP's bias
    (a softmax over labels does not see a constant bias)."""
    logits, cos, bias = library_logits(external_spec, [decode_rgb(b) for b in rows["image"][:3]],
                                       rows["text"][:4])
    temperature = float(load_embedder(external_spec).model.temperature)
    np.testing.assert_allclose(cos / temperature, logits - bias, rtol=1e-4, atol=1e-4)


class _Ref:
    """The library's own text embeddings, in the shape zero_shot_classify wants."""

    def __init__(self, spec: str, image) -> None:
        self.spec, self.image = spec, image

    def embed_texts(self, texts):
        return reference(self.spec, [self.image], list(texts))[1]


def test_eval_cli_scores_the_librarys_embeddings(external_spec, rows, tmp_path, capsys):
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.table(rows), path)
    assert main(["eval", "--model", external_spec, "--data", str(path), "--classify-col", "label",
                 "--batch-size", "3"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pil = [decode_rgb(b) for b in rows["image"]]
    ref_img, ref_txt = reference(external_spec, pil, rows["text"])
    want = retrieval_metrics(ref_img, ref_txt)
    assert got["n"] == N and got["image_to_text"] == want["image_to_text"]
    assert got["text_to_image"] == want["text_to_image"]
    assert got["zero_shot"] == zero_shot_classify(_Ref(external_spec, pil[0]), ref_img, rows["label"])


@pytest.fixture(scope="module")
def eval_parquet(rows, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("eval") / "eval.parquet"
    pq.write_table(pa.table(rows), path)
    return str(path)


def _exit_2(args: list[str], capsys, *expect: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    for e in expect:
        assert e in err, err


@pytest.mark.parametrize("command", ["eval", "index", "serve"])
def test_malformed_hf_dirs_exit_2(command, eval_parquet, tmp_path_factory, capsys):
    from tests.model.external_models import build_clip, build_siglip

    base = tmp_path_factory.mktemp("bad")
    clip, siglip = build_clip(base / "clip"), build_siglip(base / "siglip")
    extra = {"eval": ["--data", eval_parquet], "index": ["--data", eval_parquet, "--output",
                                                         str(base / "idx")], "serve": []}[command]

    unknown = shutil.copytree(clip, base / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "blip"}))
    _exit_2([command, "--model", str(unknown), *extra], capsys, "unknown model_type 'blip'", "'clip'")

    no_weights = shutil.copytree(clip, base / "no-weights")
    (no_weights / "model.safetensors").unlink()
    _exit_2([command, "--model", str(no_weights), *extra], capsys, "no weights file", "model.safetensors")

    other = shutil.copytree(clip, base / "other-arch")
    shutil.copy(base / "siglip" / "model.safetensors", other / "model.safetensors")
    _exit_2([command, "--model", str(other), *extra], capsys, "CLIPModel")
    assert siglip  # the donor of the wrong weights

    _exit_2([command, "--model", str(base / "nothing-here"), *extra], capsys, "not a saved model")
    # a hub name not in the hub cache, offline (tests/conftest.py): said so
    _exit_2([command, "--model", "no-such-org/no-such-model", *extra], capsys,
            "as a Hugging Face hub name its config.json could not be had")


@pytest.mark.parametrize("command", ["eval", "index", "serve"])
def test_malformed_open_clip_specs_exit_2(command, eval_parquet, tmp_path_factory, capsys):
    base = tmp_path_factory.mktemp("bad-oc")
    spec = build_open_clip(base / "oc")
    _, cfg, ckpt = spec.split(":")
    extra = {"eval": ["--data", eval_parquet], "index": ["--data", eval_parquet, "--output",
                                                         str(base / "idx")], "serve": []}[command]
    _exit_2([command, "--model", "open_clip:no-such-arch", *extra], capsys,
            "unknown open_clip architecture 'no-such-arch'")
    _exit_2([command, "--model", f"open_clip:{cfg}:{base / 'missing.pt'}", *extra], capsys,
            "missing.pt does not exist")
    wider = base / "tiny-clip-wider.json"
    oc = json.loads(open(cfg).read())
    wider.write_text(json.dumps({**oc, "text_cfg": {**oc["text_cfg"], "width": 48}}))
    _exit_2([command, "--model", f"open_clip:{wider}:{ckpt}", *extra], capsys,
            "checkpoint does not fit open_clip architecture tiny-clip-wider")


def test_resolve_spec_survives_the_builders_abspath(tmp_path, monkeypatch):
    """index.build and Serve's build_app os.path.abspath --model as if it were a directory; the
    open_clip: spec must come out whole, with absolute paths (actors may have another cwd)."""
    import os

    from align_ray.model.external import resolve_spec

    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    spec = "open_clip:cfg/tiny.json:ckpt/tiny.pt"
    want = f"open_clip:{cwd}/cfg/tiny.json:{cwd}/ckpt/tiny.pt"
    assert resolve_spec(spec) == want
    assert resolve_spec(os.path.abspath(spec)) == want
    assert resolve_spec(os.path.abspath("open_clip:hf-hub:org/repo")) == "open_clip:hf-hub:org/repo"
    assert resolve_spec("open_clip:ViT-B-32") == "open_clip:ViT-B-32"
    os.makedirs("runs/model")
    assert resolve_spec("runs/model") == f"{cwd}/runs/model"          # a local dir wins
    assert resolve_spec("org/model") == "org/model"                    # else a hub name
    assert resolve_spec("runs/r1/model") == f"{cwd}/runs/r1/model"    # a path, never a name
    assert resolve_spec("s3://bucket/model") == "s3://bucket/model"


def test_a_hub_name_loads_from_the_hub_cache(rows):
    """``--model ORG/NAME``: a Hugging Face hub name, read through the hub cache (offline here:
    the test puts a snapshot where huggingface_hub keeps one, as a download would)."""
    import uuid

    from pathlib import Path

    from huggingface_hub import constants

    from align_ray.model.external import resolve_spec
    from tests.model.external_models import build_clip

    name = f"align-ray-test/tiny-clip-{uuid.uuid4().hex[:8]}"
    repo = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    try:
        local = build_clip(repo / "snapshots" / rev)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(rev)
        assert resolve_spec(name) == name
        assert check_model_spec(name) == load_embedder(local).dim
        texts = rows["text"][:4]
        np.testing.assert_allclose(load_embedder(name).embed_texts(texts),
                                   load_embedder(local).embed_texts(texts), atol=1e-6)
    finally:
        shutil.rmtree(repo, ignore_errors=True)
