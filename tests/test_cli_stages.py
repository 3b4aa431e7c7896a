"""Every ``align-ray`` stage as a user runs it: a subprocess, default flags, on a Ray cluster with
exactly 2 CPUs (``ray start --head --num-cpus=2``), whatever this machine has.  Each command
has a wall-clock bound; a hang fails the test with the command's last output instead of eating
CI's budget.  (The session fixture elsewhere starts Ray in-process; a fixture with more logical
CPUs than the smallest user machine once hid a resource deadlock in ``align-ray index``.)

The chain mirrors the README's newcomer sequence: data -> filter on the noisy web; train 20
steps -> eval -> index -> serve on the dev set, then one request to every endpoint.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.conftest import DEV_SET, REPO, free_port

pytestmark = pytest.mark.skipif(not DEV_SET.exists(), reason="needs the shared dev set")


def _ray_pids(marker: str) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(marker in a for a in (p.info["cmdline"] or [])):
            pids.append(p.info["pid"])
    return pids


@pytest.fixture(scope="module")
def ray2():
    """A 2-CPU Ray head started with ``ray start``; torn down by killing exactly its processes
    (found by its private temp dir), never with a machine-wide ``ray stop``."""
    temp = tempfile.mkdtemp(prefix="ray2-", dir="/tmp")
    port = free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", "--num-cpus=2", "--num-gpus=0", f"--port={port}",
                    f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, timeout=120, capture_output=True, env=os.environ.copy())
    yield f"127.0.0.1:{port}" if _listening(port) else _node_address(port)
    for pid in _ray_pids(temp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp, ignore_errors=True)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _node_address(port: int) -> str:
    import socket

    # Ray binds the GCS to the node's own address (not loopback) on some machines
    return f"{socket.gethostbyname(socket.gethostname())}:{port}"


def cli(*args: str, address: str, timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "align_ray.cli", *args, "--ray-address", address]
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-3000:]
        err = (e.stderr or b"")[-3000:] if isinstance(e.stderr, bytes) else (e.stderr or "")[-3000:]
        pytest.fail(f"{' '.join(args[:1])} did not finish in {timeout} s on a 2-CPU Ray\n"
                    f"stdout: {out}\nstderr: {err}")
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


def test_data_then_filter(ray2, web, work):
    rows = web.url_rows(60, noise=True)
    urls = web.write_url_list(work / "urls.parquet", rows)
    cli("data", "--input", str(urls), "--output", str(work / "dl"), "--allow-cidr", "127.0.0.0/8",
        address=ray2, timeout=180, cwd=work)
    stats = json.loads((work / "dl" / "stats.json").read_text())
    assert stats["input_rows"] == 60 == stats["output_rows"] + sum(stats["dropped"].values())
    cli("filter", "--input", str(work / "dl"), "--output", str(work / "flt"),
        address=ray2, timeout=180, cwd=work)
    fstats = json.loads((work / "flt" / "stats.json").read_text())
    assert fstats["input_rows"] == 60 == fstats["output_rows"] + sum(fstats["dropped"].values())


@pytest.fixture(scope="module")
def trained(ray2, work) -> dict:
    """The README's first command: 20 steps on the dev set, default flags otherwise, so also
    default workers.  One run serves the eval, index and serve tests below (a second training
    run here cost CI over a minute)."""
    t0 = time.monotonic()
    proc = cli("train", "--data", str(DEV_SET), "--image-col", "image", "--text-col", "alt_text",
               "--output", str(work / "run"), "--batch-size", "16", "--steps", "20",
               address=ray2, timeout=300, cwd=work)
    print(f"train: {time.monotonic() - t0:.0f} s")
    return {"model": work / "run" / "model",
            "summary": json.loads(proc.stdout.strip().splitlines()[-1])}


def test_train_default_workers_fit_two_cpus(trained):
    """Default workers (2 x 1 CPU) plus the data tasks would need 4 CPUs: the run is sized to
    the 2 the cluster has, instead of waiting for ever on its first batch."""
    summary = trained["summary"]
    assert summary["step"] == 20 and summary["global_batch"] == 32
    assert summary["samples_seen"] == 20 * 32


def test_eval(trained, work):
    proc = subprocess.run(
        [sys.executable, "-m", "align_ray.cli", "eval", "--model", str(trained["model"]), "--data",
         str(DEV_SET), "--image-col", "image", "--text-col", "text", "--max-rows", "200"],
        cwd=work, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["image_to_text"]["R@10"] >= 0 and result["n"] == 200


@pytest.fixture(scope="module")
def index(ray2, trained, work) -> Path:
    t0 = time.monotonic()
    cli("index", "--model", str(trained["model"]), "--data", str(DEV_SET), "--image-col", "image",
        "--text-col", "text", "--output", str(work / "index"), address=ray2, timeout=120, cwd=work)
    print(f"index: {time.monotonic() - t0:.0f} s")
    meta = json.loads((work / "index" / "index.json").read_text())
    assert meta["count"] + meta["dropped"] == 1540
    return work / "index"


@contextlib.contextmanager
def serving(*args: str, cwd: Path) -> Iterator[str]:
    """``align-ray serve ARGS`` as a subprocess: yields its base URL once it prints it (120 s at
    most), then SIGINT, and it must exit 0 within 60 s."""
    port = free_port()
    cmd = [sys.executable, "-m", "align_ray.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        base = None
        os.set_blocking(proc.stdout.fileno(), False)
        while base is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("serve did not come up in 120 s on a 2-CPU Ray:\n" + "".join(lines[-40:]))
            line = proc.stdout.readline()
            if not line:
                time.sleep(0.2)
                continue
            lines.append(line)
            if line.startswith("align-ray serve: http"):
                base = line.split()[2].rstrip("/")
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(60) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("serve did not stop within 60 s of SIGINT")


def test_index_and_serve_answer_every_endpoint(ray2, trained, index, work):
    with serving("--model", str(trained["model"]), "--index", str(index), "--ray-address", ray2,
                 cwd=work) as base:
        image = base64.b64encode(_first_image()).decode()
        post = lambda path, body: requests.post(base + path, json=body, timeout=60)  # noqa: E731
        assert requests.get(base + "/healthz", timeout=30).status_code == 200
        r = post("/v1/embed/text", {"texts": ["a red apple"]})
        assert r.status_code == 200 and len(r.json()["embeddings"][0]) > 0
        r = post("/v1/embed/image", {"images": [image]})
        assert r.status_code == 200, r.text
        r = post("/v1/search", {"text": "a red apple", "k": 5})
        assert r.status_code == 200 and len(r.json()["results"]) == 5, r.text
        hit = r.json()["results"][0]["id"]
        assert requests.get(f"{base}/v1/image/{hit}", timeout=30).status_code == 200
        r = post("/v1/classify", {"image": image, "labels": ["apple", "car"]})
        assert r.status_code == 200, r.text
        assert requests.get(base + "/", timeout=30).status_code == 200
        assert post("/v1/search", {"k": 5}).status_code == 422   # bad request: 4xx, not 5xx


def test_serve_a_published_align_answers_every_endpoint(ray2, work):
    """Issue 14's acceptance as its command line: ``align-ray serve --model HF_ALIGN_DIR`` (a
    transformers ``AlignModel`` + ``AlignProcessor`` saved with ``save_pretrained``, tiny and
    random here) answers every route, with the library's own embeddings.  The same model
    through the app's Python API, checked more closely: tests/serve/test_external_models.py."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from align_ray.model.transforms import decode_rgb
    from tests.model.external_models import assert_embeds_like, build_align, captions, png, reference

    model = build_align(work / "hf-align")
    texts = captions(6)
    images = [png(300 + i) for i in range(6)]
    pq.write_table(pa.table({"image": images, "text": texts}), work / "hf-pairs.parquet")
    cli("index", "--model", model, "--data", str(work / "hf-pairs.parquet"), "--output",
        str(work / "hf-index"), address=ray2, timeout=120, cwd=work)
    ref_img, ref_txt = reference(model, [decode_rgb(b) for b in images], texts)
    with serving("--model", model, "--index", str(work / "hf-index"), "--ray-address", ray2,
                 cwd=work) as base:
        def post(path: str, body: dict) -> object:
            r = requests.post(base + path, json=body, timeout=60)
            assert r.status_code == 200, (path, r.status_code, r.text[:500])
            return r.json()

        b64 = [base64.b64encode(b).decode() for b in images]
        assert requests.get(base + "/healthz", timeout=30).json()["status"] == "ok"
        assert_embeds_like(post("/v1/embed/text", {"texts": texts})["embeddings"], ref_txt, "text")
        assert_embeds_like(post("/v1/embed/image", {"images": b64})["embeddings"], ref_img, "image")
        hits = post("/v1/search", {"text": texts[2], "k": 3})["results"]
        brute = ref_img @ ref_txt[2]    # the top 3 of a brute force (near-ties may swap)
        np.testing.assert_allclose(brute[[h["id"] for h in hits]], np.sort(brute)[::-1][:3], atol=1e-4)
        thumb = requests.get(f"{base}/v1/image/{hits[0]['id']}", timeout=30)
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        labels = post("/v1/classify", {"image": b64[0], "labels": ["cat", "dog"]})["labels"]
        assert sorted(labels) == ["cat", "dog"]
        page = requests.get(base + "/", timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        (name,) = requests.get(base + "/indices-list", timeout=30).json()
        knn = post("/knn-service", {"text": texts[2], "modality": "image", "num_images": 3,
                                    "indice_name": name})
        assert [x["id"] for x in knn] == [h["id"] for h in hits]
        meta = post("/metadata", {"ids": [hits[0]["id"]], "indice_name": name})
        assert meta[0]["metadata"]["caption"] == texts[hits[0]["id"]]
        assert requests.post(base + "/v1/search", json={"k": 3}, timeout=60).status_code == 422


def _first_image() -> bytes:
    import pyarrow.parquet as pq

    return pq.read_table(DEV_SET, columns=["image"]).column("image")[0].as_py()


def test_a_closed_output_pipe_ends_the_command(ray2, work):
    """``align-ray train ... 2>&1 | head -3``: once ``head`` has its lines, the command ends
    (SIGPIPE, as ``cat`` does) instead of hanging on tqdm's write lock for ever."""
    cmd = [sys.executable, "-m", "align_ray.cli", "train", "--data", str(DEV_SET), "--image-col",
           "image", "--text-col", "alt_text", "--output", str(work / "piped"), "--steps", "3",
           "--batch-size", "8", "--ray-address", ray2]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    head = [proc.stdout.readline() for _ in range(3)]
    proc.stdout.close()                           # what `head -3` does once it has them
    try:
        rc = proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running 90 s after its output pipe closed; it had printed {head}")
    assert rc == -signal.SIGPIPE, rc


def test_serve_that_cannot_fit_the_machine_exits_2_at_once(trained, index, work):
    """On a local Ray of this machine's CPUs (2 in CI), two index shards at the default 0.5 CPU
    each do not fit beside the encoders and the Router: exit 2 naming the shares, no hang."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "align_ray.cli", "serve", "--model",
                           str(trained["model"]), "--index", str(index), "--index-shards",
                           str(os.cpu_count() * 2), "--port", str(free_port()),
                           "--ray-address", "local"],
                          cwd=work, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "IndexShard0 0.5" in proc.stderr and "index_shard: {num_cpus: 0.25}" in proc.stderr
    print(f"refused in {time.monotonic() - t0:.0f} s")


def test_serve_on_a_joined_cluster_that_never_places_a_replica_exits_3_saying_why(
        ray2, trained, index, work):
    """A joined cluster is not refused up front (an autoscaler may add nodes), but the start is
    bounded: a GPU image encoder on this CPU-only cluster gives up after ``--startup-timeout-s``,
    exit 3, naming the deployment, what it asks and what is free; the app is gone afterwards."""
    cfg = work / "gpu-serve.yaml"
    cfg.write_text("image_encoder: {num_gpus: 1, graceful_shutdown_timeout_s: 1}\n")
    cmd = [sys.executable, "-m", "align_ray.cli", "serve", "--model", str(trained["model"]),
           "--index", str(index), "--port", str(free_port()), "--config", str(cfg),
           "--startup-timeout-s", "5", "--ray-address", ray2]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "align-ray serve: error: the Serve app 'align' did not start in 5 s" in proc.stderr
    assert "ImageEncoder UPDATING" in proc.stderr and "ask 0.5 CPU, 1 GPU" in proc.stderr
    assert proc.stderr.rstrip().endswith(" 0 GPU"), proc.stderr[-2000:]
    assert re.search(r"\[serve\] app 'align' starting for \d s, waiting on: ImageEncoder",
                     proc.stdout), proc.stdout[-2000:]
