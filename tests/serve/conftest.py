"""Fixtures for the serve tests: a tiny saved model, a small corpus with planted duplicates and
one broken image, its index (built with Ray Data), and ONE Serve app for the whole package
(started on a free 127.0.0.1 port, access log off, 0.5 CPU per replica; shut down at the end),
and one headless browser."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import DEV_SET, free_port

EMOJI = str(DEV_SET)
N_BASE = 40            # distinct emoji pairs in the corpus
DUP_IMAGES = (3, 5)    # these rows' images reappear (re-encoded) with another caption
DUP_TEXTS = (7, 9)     # these rows' captions reappear on another image


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def _reencode(data: bytes) -> bytes:
    from align_ray.model.transforms import decode_rgb

    out = io.BytesIO()
    decode_rgb(data).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _corpus_rows() -> list[dict]:
    if os.path.exists(EMOJI):
        t = pq.read_table(EMOJI, columns=["image", "text"]).slice(0, N_BASE).to_pylist()
    else:  # a fallback with the same shape, for machines without the shared data set
        t = [{"image": _png(i), "text": f"synthetic picture number {i}"} for i in range(N_BASE)]
    rows = [{"image": r["image"], "text": r["text"], "url": f"http://example.invalid/{i}.png"}
            for i, r in enumerate(t)]
    for j, src in enumerate(DUP_IMAGES):
        rows.append({"image": _reencode(rows[src]["image"]), "text": f"another caption {j} for a copy",
                     "url": f"http://example.invalid/dup-image-{j}.jpg"})
    for j, src in enumerate(DUP_TEXTS):
        rows.append({"image": _png(1000 + j), "text": rows[src]["text"].upper() + "  ",
                     "url": f"http://example.invalid/dup-text-{j}.png"})
    rows.append({"image": b"this is not an image", "text": "broken row",
                 "url": "http://example.invalid/broken"})
    return rows


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    rows = _corpus_rows()
    d = tmp_path_factory.mktemp("corpus")
    path = d / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)
    return {"path": str(path), "rows": rows}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus) -> str:
    """A random-init tiny dual encoder (64 px, 2-layer BERT, dim 128) saved with save_pretrained.

    A random tower maps every input to almost the same feature vector (all cosines ~0.9999), which
    would make every retrieval check a coin toss.  So the two projections are standardised on the
    corpus (W /= feature std, b = -W @ feature mean): still an untrained model, but its embeddings
    spread out (cosines -0.6..0.7) and each image is its own unique nearest neighbour.
    """
    import torch

    from align_ray.model import DualEncoder, Embedder, ModelConfig, save_pretrained, train_wordpiece
    from align_ray.model.tokenizer import tokenize

    torch.manual_seed(0)
    cfg = ModelConfig.tiny(vocab_size=2000)
    rows = corpus["rows"][:N_BASE]
    texts = [r["text"] for r in rows]
    tok = train_wordpiece(texts + ["a photo of a dog", "a cat", "red", "blue"],
                          vocab_size=cfg.vocab_size, max_length=cfg.max_length)
    model = DualEncoder(cfg, len(tok)).eval()
    pixels = torch.as_tensor(Embedder(model, tok, model.cfg).preprocess([r["image"] for r in rows]))
    with torch.no_grad():
        feats_img = model.image_tower(pixels)
        feats_txt = model.text_tower(**tokenize(tok, texts, cfg.max_length)).last_hidden_state[:, 0]
        for proj, feats in ((model.image_proj, feats_img), (model.text_proj, feats_txt)):
            proj.weight.div_(feats.std(0).clamp_min(1e-6))
            proj.bias.copy_(-(proj.weight @ feats.mean(0)))
    out = tmp_path_factory.mktemp("model") / "model"
    save_pretrained(model, tok, cfg, out)
    return str(out)


@pytest.fixture(scope="session")
def embedder(tiny_model):
    from align_ray.model import Embedder

    return Embedder.load(tiny_model)


@pytest.fixture(scope="session")
def index_dir(ray_cluster, tiny_model, corpus, tmp_path_factory) -> str:
    from align_ray.serve import index
    from align_ray.serve.config import IndexConfig

    out = tmp_path_factory.mktemp("index") / "idx"
    index.build(IndexConfig(model=tiny_model, data=corpus["path"], output=str(out), batch_size=16,
                            concurrency=1, num_cpus=0.5, thumb_size=64))
    return str(out)


ANN_ROWS, ANN_DIM = 6000, 128      # ANN_DIM: the tiny model's embed_dim


def clustered_pairs(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit "image" embeddings and "captions" near their image, like a trained
    model's space (the ANN tests' corpus)."""
    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    centers = rng.standard_normal((max(8, n // 100), dim))
    image = unit(centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, dim)))
    return image, unit(image + 0.25 * rng.standard_normal((n, dim)))


def _ann_index(out, kind: str, seed: int) -> str:
    """A synthetic index dir of ``ANN_ROWS`` clustered vectors (captions near their image, as a
    trained model places them) with a tuned ``kind`` ANN index: big enough that a narrow
    nprobe / ef loses recall, which the 48-row model index (exact, far below ``exact_below``)
    cannot show."""
    import json

    from align_ray.serve import ann
    from align_ray.serve.config import AnnConfig

    image, text = clustered_pairs(ANN_ROWS, ANN_DIM, seed)
    out.mkdir(parents=True)
    np.save(out / "image_embeddings.npy", image)
    np.save(out / "text_embeddings.npy", text)
    pq.write_table(pa.table({"id": np.arange(ANN_ROWS), "text": [f"row {i}" for i in range(ANN_ROWS)],
                             "url": [f"http://example.invalid/{i}" for i in range(ANN_ROWS)]}),
                   out / "metadata.parquet")
    manifest = {"format": 1, "count": ANN_ROWS, "dim": ANN_DIM, "modalities": ["image", "text"]}
    manifest["ann"] = ann.build(str(out), manifest, AnnConfig(kind=kind, exact_below=1,
                                                              recall_queries=200))
    (out / "index.json").write_text(json.dumps(manifest))
    return str(out)


@pytest.fixture(scope="session")
def ann_indexes(tmp_path_factory) -> dict[str, str]:
    """Named index dirs served beside the main one: ``hnsw`` and ``ivf``."""
    root = tmp_path_factory.mktemp("ann")
    return {"hnsw": _ann_index(root / "hnsw", "hnsw", 1), "ivf": _ann_index(root / "ivf", "ivf", 2)}


TEST_LIMITS = dict(max_body_bytes=1 << 20, max_image_bytes=256 << 10, max_texts=16,
                   max_text_chars=200, max_images=4, max_pixels=4_000_000, max_k=100,
                   max_labels=8, max_templates=3)


@pytest.fixture(scope="package")
def serve_app(ray_cluster, tiny_model, index_dir, ann_indexes):
    """One running app for the package: yields (AlignClient, ServeConfig).  It serves the
    model's index (the default) and the synthetic ``ann_indexes`` by name."""
    from ray import serve

    from align_ray.client import AlignClient
    from align_ray.serve import app
    from align_ray.serve.config import ServeConfig

    # 0.1 CPU per replica: the app lives for the whole session on a Ray with the machine's real
    # CPU count (2 in CI), and the in-session index builds still need whole CPUs for their tasks
    enc = dict(min_replicas=1, max_replicas=1, num_cpus=0.1, max_batch_size=8,
               batch_wait_timeout_s=0.01, max_ongoing_requests=16, target_ongoing_requests=4)
    cfg = ServeConfig.from_dict(dict(model=tiny_model, index=index_dir, indexes=ann_indexes,
                                     port=free_port(),
                                     image_encoder=enc, text_encoder=enc, limits=TEST_LIMITS,
                                     router={"num_cpus": 0.1}, app_name="align-test",
                                     # clip-retrieval's image_url queries fetch from the
                                     # tests' own 127.0.0.1 server; other private ranges stay refused
                                     # (a 3 s deadline: test_knn_service's slow host)
                                     url_fetch={"allow_cidr": ["127.0.0.1/32"], "timeout_total": 3}))
    url = app.start(cfg)
    try:
        yield AlignClient(url, timeout=60, retries=0), cfg
    finally:
        serve.shutdown()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="package")
def browser(tmp_path_factory):
    """Real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium;
    it may only resolve 127.0.0.1 and runs with background networking off."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("headless Chromium is required: apt-get install -y chromium chromium-driver")
    os.environ["SE_OFFLINE"] = "true"          # Selenium Manager must never download anything
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--disable-extensions",
                "--disable-domain-reliability", "--window-size=1200,900",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)

