"""Worker nodes die mid-stage on a real multi-node cluster (tests/multinode/cluster.py).

Each test SIGKILLs a worker node's raylet and its whole process tree at a chosen moment, as a
crash or a spot reclaim would, and checks that nothing is lost, or that the stage fails with a
clear message instead of hanging:

* mid-download: the stage completes, ``input_rows == output_rows + sum(dropped)``, every key
  once, every shard file whole and named by its marker;
* mid-training: Ray Train restores the group from the last checkpoint (a replacement node
  joins), and the step count, ``samples_seen`` and the bad-image count are exact;
* mid-filter: every row once, kept or dropped with the reason the rules give;
* mid-index: the index holds every row once, in corpus order;
* mid-score: every row once, scored as the model scores it;
* too few nodes left: ``align-ray train`` exits 3 within its start timeout, naming what the
  worker group waits for;
* elastic: the group shrinks to the nodes left and grows back when a node joins, with the same
  global batch.

Stages run as their own driver processes (the CLI, or tests/multinode/train_driver.py for the
rank-aware kill); the test process never joins Ray.  The run directories are on this box's one
disk, which every "node" shares: a stand-in for the shared storage URI, checked separately.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import DEV_SET, REPO
from tests.data.test_pipeline import accounting
from tests.multinode.conftest import ensure

pytestmark = pytest.mark.skipif(not DEV_SET.exists(), reason="needs the shared dev set")


def _start(args: list[str], cluster, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env={**cluster.env, **env},
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the stage exited ({proc.returncode}) before {what}:\n"
                        f"{log.read_text()[-3000:]}")
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"no {what} after {timeout} s:\n{log.read_text()[-3000:]}")


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the stage hung for {timeout} s after the kill:\n{log.read_text()[-3000:]}")
    return out


def _kill_mid_run(cluster, proc: subprocess.Popen, log: Path, folder: Path, pattern: str,
                  title: str, what: str, finish_s: float) -> tuple:
    """Once ``folder`` holds a ``pattern`` file and a worker node runs a process whose title
    has ``title``, SIGKILL that node, add a replacement of its type (what an autoscaler does
    for a lost node) and wait for the stage to succeed: (the node, files there at the kill)."""
    def ready():
        written = list(folder.glob(pattern)) if folder.exists() else []
        nodes = [n for n in cluster.node_of_title(title) if n.type != "head"]
        return nodes if written and nodes else None

    victim = _wait_for(ready, proc, log, 240, what)[0]
    at_kill = len(list(folder.glob(pattern)))
    cluster.kill(victim)
    cluster.add(victim.type)
    _finish(proc, log, finish_s)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return victim, at_kill


def test_download_survives_losing_a_download_node(cluster, web, tmp_path):
    ensure(cluster, cpu_worker=1, gpu_train=2)
    # 80 rows in 16 shards; each image answers after 0.6 s and an actor fetches 2 at a time,
    # so a shard takes ~2 s and the 2 download actors need ~15 s: time to kill one mid-run
    rows = [{"url": f"{web.base_url}/fault/delay_headers/{i}?s=0.6",
             "caption": web.store.spec(i)["caption"], "noise": "clean", "fault": None}
            for i in range(70)]
    rows += web.url_rows(10, noise=True)          # noisy rows: some are dropped, with reasons
    src = web.write_url_list(tmp_path / "urls.parquet", rows)
    out, log = tmp_path / "out", tmp_path / "data.log"
    proc = _start(["-m", "align_ray.cli", "data", "--input", str(src), "--output", str(out),
                   "--shard-size", "5", "--processes", "2", "--threads", "2",
                   "--shards-per-actor", "1", "--image-size", "64", "--timeout-total", "10",
                   "--timeout-read", "5", "--retries", "1", "--retry-backoff", "0.1",
                   "--allow-cidr", "127.0.0.0/8", "--ray-address", cluster.address],
                  cluster, log)
    markers = out / "_shards"
    victim = _wait_for(
        lambda: (len(list(markers.glob("*.json"))) >= 2
                 and cluster.node_of_title("MapBatches(ShardDownloader)")), proc, log, 120,
        "two finished shards and a download actor")[0]
    done_at_kill = len(list(markers.glob("*.json")))
    cluster.kill(victim)
    cluster.add(victim.type)                      # what an autoscaler does for a lost node
    _finish(proc, log, 180)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert done_at_kill < 16, "the run finished before the kill: nothing was tested"

    keys = [f"00000{i:09d}" for i in range(len(rows))]
    samples, dropped = accounting(out, keys)      # every key once; rows add up; complete
    assert len(samples) >= 70                     # every delayed image arrived despite the kill
    # no half-written shard: every file is whole and named by its shard's marker
    live = set()
    for m in markers.glob("*.json"):
        info = json.loads(m.read_text())
        live |= {*info["parts"], info["dropped_file"]}
        n = sum(pq.read_metadata(out / p).num_rows for p in info["parts"] if p.endswith(".parquet"))
        assert n == info["output_rows"], m.name
        for p in info["parts"]:
            if p.endswith(".tar"):
                with tarfile.open(out / p) as tar:
                    assert len(tar.getnames()) == 3 * info["output_rows"], p
    on_disk = {f"{d}/{f.name}" for d in ("parquet", "webdataset", "dropped")
               for f in (out / d).iterdir()}
    assert on_disk == live


def test_filter_survives_losing_a_node_while_it_writes(cluster, tmp_path):
    """``align-ray filter`` (global plan: Ray task shuffles whose blocks live on the worker
    nodes, then per-partition writer tasks) with the node of a writer killed after the first
    shard is written.  Ray reruns the lost tasks and rebuilds lost shuffle blocks from lineage:
    every row ends up once, in the output or in ``dropped/`` with the reason the rules give."""
    import random

    from tests.filter import crafted

    ensure(cluster, cpu_worker=1, gpu_train=2)
    rng, corpus, want = random.Random(0), crafted.Corpus(), {}
    words = [f"w{i}" for i in range(400)]
    for i in range(4000):   # rules decided by each row alone, so the reasons are known
        n_words, w = rng.randint(2, 8), rng.choice([150, 300, 900])
        corpus.add(f"img{i}", " ".join(rng.choice(words) for _ in range(n_words)), None, w=w,
                   h=300)
        want[corpus.rows[-1]["key"]] = ("image_too_small" if w == 150 else "aspect_ratio"
                                        if w == 900 else "too_few_tokens" if n_words < 3
                                        else None)
    stats1 = crafted.write_stage1(corpus, tmp_path / "stage", shard_size=50)
    out, log = tmp_path / "out", tmp_path / "filter.log"
    proc = _start(["-m", "align_ray.cli", "filter", "--input", str(tmp_path / "stage"),
                   "--output", str(out), "--ray-address", cluster.address], cluster, log)
    victim, done_at_kill = _kill_mid_run(cluster, proc, log, out / "_shards", "*.json",
                                         "_apply_groups", "a written shard and a writer task",
                                         300)
    assert done_at_kill < 80, "the run had written every shard before the kill"
    download_drops = pq.read_table(tmp_path / "stage" / "dropped").column("key").to_pylist()
    keys = list(want) + download_drops
    samples, dropped = accounting(out, keys)      # every key once; rows add up; complete
    assert stats1["dropped"] == {"http_404": 160}
    got = {k: (dropped[k]["reason"] if k in dropped else None) for k in want}
    assert got == want
    assert all(dropped[k]["reason"] == "http_404" for k in keys[len(want):])
    print(f"filter: node {victim.name} killed after {done_at_kill} of 80 shards; "
          f"{len(samples)} kept, {len(dropped)} dropped, each as the rules say")


def test_index_survives_losing_an_encoder_node(cluster, tiny_model, tmp_path):
    """``align-ray index`` with 2 encoder actors on worker nodes; the node of one of them dies
    after the first shard file is written.  Ray Data restarts the actor and reruns its blocks:
    the index holds every row exactly once, in corpus order (ids follow the input)."""
    ensure(cluster, cpu_worker=1, gpu_train=2)
    dev = pq.read_table(DEV_SET, columns=["image", "text"])
    src = tmp_path / "corpus.parquet"             # the dev set: ~48 shard files, the kill
    pq.write_table(dev, src)                      # comes after the first
    out, log = tmp_path / "index", tmp_path / "index.log"
    proc = _start(["-m", "align_ray.cli", "index", "--model", tiny_model, "--data", str(src),
                   "--image-col", "image", "--text-col", "text", "--output", str(out),
                   "--concurrency", "2", "--num-cpus", "1", "--batch-size", "32",
                   "--ray-address", cluster.address], cluster, log)
    shards = out / "shards"
    _, written_at_kill = _kill_mid_run(cluster, proc, log, shards, "*.parquet", "_EmbedBatch",
                                       "a shard file and an encoder actor", 420)
    manifest = json.loads((out / "index.json").read_text())
    total = dev.num_rows
    assert manifest["count"] + manifest["dropped"] == total
    assert manifest["dropped"] == 0               # every dev image decodes
    meta = pq.read_table(out / "metadata.parquet", columns=["id", "text"])
    assert meta.column("id").to_pylist() == list(range(total))
    assert meta.column("text").to_pylist() == dev.column("text").to_pylist()
    written = len(list(shards.glob("*.parquet")))
    assert written_at_kill < written, "the run had finished writing before the kill"
    print(f"index: node killed after {written_at_kill} of {written} shard files; "
          f"{manifest['count']} rows, in order")


def test_score_survives_losing_a_scorer_node(cluster, tiny_model, tmp_path):
    """``align-ray score`` with 2 scorer actors on worker nodes (one shard per call); the node
    of one dies after the first shard is scored.  Ray Data restarts the actor and reruns its
    shard: every row once, in the output or in ``dropped/``, and the rerun shard's scores are
    the model's own: the input is the same rows twice, and each pair of copies scores alike
    whichever actor, before or after the kill, scored it."""
    import numpy as np
    import pyarrow as pa

    ensure(cluster, cpu_worker=1, gpu_train=2)
    half = pq.read_table(DEV_SET, columns=["image", "text"]).slice(0, 300)
    n, per_shard = 2 * half.num_rows, 25
    shards, keys = n // per_shard, [f"{i:06d}" for i in range(n)]
    src = tmp_path / "corpus.parquet"             # a shard is a run of whole row groups
    pq.write_table(pa.concat_tables([half, half]).append_column("key", pa.array(keys)), src,
                   row_group_size=per_shard)
    out, log = tmp_path / "scored", tmp_path / "score.log"
    proc = _start(["-m", "align_ray.cli", "score", "--model", tiny_model, "--input", str(src),
                   "--output", str(out), "--shard-rows", str(per_shard), "--concurrency", "2",
                   "--num-cpus", "1", "--batch-size", "25", "--ray-address", cluster.address],
                  cluster, log)
    victim, done_at_kill = _kill_mid_run(cluster, proc, log, out / "_shards", "*.json",
                                         "ShardScorer", "a scored shard and a scorer actor", 420)
    assert done_at_kill < shards, "the run had scored every shard before the kill"
    samples, dropped = accounting(out, keys)      # every key once; rows add up; complete
    assert not dropped                            # every dev image decodes
    score = {k: r["pair_score"] for k, r in samples.items()}
    np.testing.assert_allclose([score[k] for k in keys[:n // 2]],
                               [score[k] for k in keys[n // 2:]], atol=1e-5)
    print(f"score: node {victim.name} killed after {done_at_kill} of {shards} shards")


@pytest.mark.timeout(900)   # a loaded CI box: up to 420 s to a registered checkpoint, 300 after
def test_training_survives_losing_a_train_workers_node(cluster, small_parquet, tmp_path):
    ensure(cluster, cpu_worker=1, gpu_train=2)
    progress, out, log = tmp_path / "progress", tmp_path / "run", tmp_path / "train.log"
    progress.mkdir()
    steps = 8
    proc = _start(["-m", "tests.multinode.train_driver", cluster.address, small_parquet,
                   str(out), str(progress), str(steps), "1.5"], cluster, log)

    def rank(r: int) -> dict | None:
        try:
            return json.loads((progress / f"rank{r}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def ready():
        # a checkpoint dir on disk is not enough: Ray Train registers it only after its
        # controller has collected every rank's report (a kill before that restarted the run
        # from step 0: found here); the manager's snapshot lists the registered ones
        r1 = rank(1)
        snap = out / "checkpoints" / "align" / "checkpoint_manager_snapshot.json"
        ok = snap.exists() and "step_0000000" in snap.read_text()
        return r1 if ok and r1 and r1["step"] >= 3 else None

    r1 = _wait_for(ready, proc, log, 420, "a checkpoint and rank 1 past it")
    victim = cluster.node_of_pid(r1["pid"])
    assert victim is not cluster.node_of_pid(rank(0)["pid"])   # one worker per node
    # the bad-image counter is a side actor: it must live with the driver, on the head
    assert [n.type for n in cluster.node_of_title("BadImageCounter")] == ["head"]
    cluster.kill(victim)
    (progress / "fast").touch()                   # no more pacing after the kill
    cluster.add(victim.type)
    stdout = _finish(proc, log, 300)
    assert proc.returncode == 0, log.read_text()[-4000:]
    s = json.loads(stdout.strip().splitlines()[-1])
    assert s["step"] == steps and s["global_batch"] == 8
    assert s["samples_seen"] == steps * s["global_batch"]
    assert s["restarts"] >= 1 and s["resumed_from_step"] >= 2
    assert s["bad_images_skipped"] == 1           # the count survived the node loss


def test_too_few_nodes_left_fails_clearly(cluster, small_parquet, tmp_path):
    """Two of the three worker nodes die and none replaces them: 2 workers x 1 CPU no longer
    fit, and ``align-ray train`` exits 3 with what it waits for instead of waiting for ever."""
    ensure(cluster, cpu_worker=1, gpu_train=2)
    out, log = tmp_path / "run", tmp_path / "train.log"
    timeout_s = 10
    proc = _start(["-m", "align_ray.cli", "train", "--data", small_parquet, "--image-col",
                   "image", "--text-col", "alt_text", "--output", str(out), "--workers", "2",
                   "--cpus-per-worker", "1", "--data-workers", "1", "--data-cpus", "0.5",
                   "--batch-size", "4", "--steps", "400", "--checkpoint-every", "2",
                   "--ray-address", cluster.address],
                  cluster, log, ALIGN_RAY_TRAIN_START_TIMEOUT_S=str(timeout_s))
    _wait_for(lambda: list((out / "checkpoints" / "align").glob("step_*")), proc, log, 240,
              "a checkpoint")
    victims = cluster.node_of_title("RayTrainWorker")
    assert len(victims) == 2
    for node in victims:
        cluster.kill(node)
    t0 = time.monotonic()
    _finish(proc, log, 180)
    waited = time.monotonic() - t0
    err = log.read_text()
    assert proc.returncode == 3, err[-3000:]
    assert "WAITS FOR 2 worker(s) x {1 CPU}" in err and "ALIGN_RAY_TRAIN_START_TIMEOUT_S" in err
    print(f"too few nodes: exit 3 after {waited:.0f} s (start timeout {timeout_s} s)")


def test_elastic_training_shrinks_to_the_nodes_left_and_grows_back_with_the_same_global_batch(
        cluster, small_parquet, tmp_path):
    """3 workers (one per ``gpu_train`` node), elastic down to 2: a node dies; the group goes on
    with 2 workers of 6 rows each instead of 3 of 4, so the global batch stays 12.  Then a
    ``gpu_train`` node joins again, and the group grows back to 3 workers of 4 rows (Ray Train
    checks the cluster every ``elastic_resize_interval_s`` while it runs).  The step count and
    ``samples_seen`` are exact across both resizes."""
    ensure(cluster, cpu_worker=1, gpu_train=3)
    progress, out, log = tmp_path / "progress", tmp_path / "run", tmp_path / "train.log"
    progress.mkdir()
    steps = 14
    proc = _start(["-m", "tests.multinode.train_driver", cluster.address, small_parquet,
                   str(out), str(progress), str(steps), "1.5", "elastic"], cluster, log)

    def rank(r: int) -> dict | None:
        try:
            return json.loads((progress / f"rank{r}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    snap = out / "checkpoints" / "align" / "checkpoint_manager_snapshot.json"

    def checkpointed(fragment: str) -> bool:
        return snap.exists() and fragment in snap.read_text()

    def ready():
        r2 = rank(2)
        ok = checkpointed("step_0000000")
        return r2 if ok and r2 and r2["step"] >= 3 and r2["world"] == 3 else None

    r2 = _wait_for(ready, proc, log, 480, "a checkpoint and 3 ranks past it")
    victim = cluster.node_of_pid(r2["pid"])
    assert victim.type == "gpu_train" and victim is not cluster.node_of_pid(rank(0)["pid"])
    cluster.kill(victim)                          # no replacement yet
    t_kill = time.monotonic()
    _wait_for(lambda: (rank(0) or {}).get("world") == 2, proc, log, 480, "a 2-worker group")
    shrink_s = time.monotonic() - t_kill
    # the 2-worker group trains on: a checkpoint of its own (named -r1: after one restart)
    _wait_for(lambda: checkpointed("-r1"), proc, log, 300, "a checkpoint of the 2-worker group")
    # hold the steps so the run is still going when the node is back, then add it
    (progress / "hold").touch()
    (progress / "rank2.json").unlink()
    t_add = time.monotonic()
    cluster.add("gpu_train")
    back = _wait_for(lambda: (r := rank(2)) and r["world"] == 3 and r, proc, log, 480,
                     "the group grown back to 3 workers")
    grow_s = time.monotonic() - t_add
    assert cluster.node_of_pid(back["pid"]).type == "gpu_train"
    (progress / "hold").unlink()
    (progress / "fast").touch()
    stdout = _finish(proc, log, 600)
    assert proc.returncode == 0, log.read_text()[-4000:]
    s = json.loads(stdout.strip().splitlines()[-1])
    assert (s["step"], s["global_batch"], s["samples_seen"]) == (steps, 12, steps * 12), s
    assert s["restarts"] >= 2, s
    text = log.read_text()
    assert "elastic: 2 of 3 workers share the global batch 12: 6 rows each" in text, text[-4000:]
    assert ((rank(0) or {}).get("world"), (rank(0) or {}).get("step")) == (3, steps), rank(0)
    print(f"elastic: 3 -> 2 workers {shrink_s:.0f} s after the kill, back to 3 {grow_s:.0f} s "
          f"after the node was added, {s['restarts']} restart(s)")
