"""The whole workflow as a user runs it on a cluster (issue 15 part 2): ``ray job submit --
python workflows/end_to_end.py`` on a multi-node cluster whose nodes share **no local disk**.

Every node (the head too) runs in its own mount namespace with a private tmpfs for its Ray temp
dir, ``TMPDIR`` and ``HOME`` (tests/multinode/cluster.py ``private_disks``).  The job's working
directory is unpacked into each node's own temp dir, so its working directories differ too.  A
stage that hands the next one a local path (a temp file, a path relative to its working
directory, a cache under ``HOME``) then fails with a missing file, as on separate machines.
Everything goes through ``s3://`` on the test SeaweedFS server: the run config, every stage's
output and the report.  The first test shows that the isolation is real.  The run includes
round 2 (``--bootstrap``: score -> filter2 -> train2 -> eval2), whose model is the one served.

While the job runs, the test samples, once a second, which node runs which stage's processes.
This is the node timeline that BENCHMARKS.md shows.  The run must place training on 2 nodes
and nothing on the CPU-0 head.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from tests.conftest import REPO, free_port
from tests.multinode.cluster import LocalCluster
VENV_BIN = str(Path(sys.executable).parent)
# what `ray job submit --working-dir .` leaves out of the upload
EXCLUDES = [".venv", ".venv-*", ".git", "out", "demo-output", ".pytest_cache", "**/__pycache__",
            "*.egg-info", ".ci-home"]
BUCKET = "jobs"
# process titles of each stage's work (Ray names a worker process after its actor class)
STAGE_TITLES = {"data": "ShardDownloader", "train": "RayTrainWorker", "index": "_EmbedBatch",
                "serve": "ServeReplica:"}


@pytest.fixture(scope="module")
def isolated(s3):
    """A head (CPU 0, with the job API) + cpu_worker + two gpu_train nodes, no disk shared."""
    c = LocalCluster(private_disks=True)
    # the resubmitted job uploads the same working dir: Ray skips the upload of a package the
    # GCS holds, and deletes it when the first job's pin expires (600 s after upload, shorter
    # than the first job on a slow box): the second job then failed RUNTIME_ENV_SETUP_FAILURE
    # ("Failed to download runtime_env file package", CI 2026-12-06). Ray's own knob: pin longer
    c.env["RAY_RUNTIME_ENV_TEMPORARY_REFERENCE_EXPIRATION_S"] = "7200"
    try:
        c.start_head(dashboard=True)
        for typ in ("cpu_worker", "gpu_train", "gpu_train"):
            c.add(typ)
        deadline = time.monotonic() + 120
        while True:  # the job API comes up after `ray start` returns
            try:
                if requests.get(f"{c.dashboard}/api/version", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the dashboard (job API) did not come up"
            time.sleep(1)
        s3.create_bucket(Bucket=BUCKET)
        yield c
    finally:
        c.shutdown()


ISOLATION_PROBE = """
import json, os, sys, tempfile
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=0)
def write():
    fd, path = tempfile.mkstemp(prefix="probe-")   # this node's TMPDIR
    os.write(fd, b"x"); os.close(fd)
    return path, ray.get_runtime_context().get_node_id(), os.getcwd()

@ray.remote(num_cpus=0)
def look(path):
    return os.path.exists(path), ray.get_runtime_context().get_node_id()

path, node, cwd = ray.get(write.options(resources={"cpu_worker": 0.01}).remote())
same = ray.get(look.options(resources={"cpu_worker": 0.01}).remote(path))
other = ray.get(look.options(resources={"gpu_train": 0.01}).remote(path))
here = os.path.exists(path)
print(json.dumps({"path": path, "node": node, "same": same, "other": other, "driver": here}))
"""


def test_nodes_share_no_local_disk(isolated):
    """The control: a file one node writes to its temp dir does not exist on another node
    (nor for the driver on the head), but does on its own node; the test process sees none."""
    cmd, env = isolated.on_node(isolated.nodes[0], [sys.executable, "-c", ISOLATION_PROBE,
                                                   isolated.address])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["path"].startswith(str(isolated.root / "p" / "cpu_worker-1")), r
    assert not Path(r["path"]).exists() and Path(isolated.root / "p").exists()
    assert r["same"] == [True, r["node"]], r
    assert r["other"][0] is False and r["other"][1] != r["node"], r
    # nor does the driver, on the head
    assert r["driver"] is False, r


def _sample(cluster: LocalCluster) -> dict[str, list[str]]:
    """{stage: [node names running its processes]} right now."""
    seen: dict[str, set[str]] = {s: set() for s in STAGE_TITLES}
    for node in cluster.nodes:
        if node.killed:
            continue
        for pid in cluster._tree(node):
            try:
                title = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                continue
            for stage, frag in STAGE_TITLES.items():
                if frag in title:
                    seen[stage].add(node.name)
    return {s: sorted(n) for s, n in seen.items() if n}


@pytest.mark.timeout(1500)
def test_job_submit_runs_the_workflow_s3_only(isolated, s3):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from align_ray.client import AlignClient

    # the run config lives on S3 too: the head has no copy of anything the test process wrote
    port = free_port()
    s3.put_object(Bucket=BUCKET, Key="conf/run.yaml", Body=yaml.safe_dump(
        {"serve": {"proxy_location": "HeadOnly", "port": port}}).encode())
    t0 = time.monotonic()
    timeline: list[dict] = []
    client = JobSubmissionClient(isolated.dashboard)
    sid, status = _run_job(isolated, client, f"e2e-mn-{uuid.uuid4().hex[:8]}",
                           ["python", "workflows/end_to_end.py", "--smoke", "--serve",
                            "--bootstrap", "--config", f"s3://{BUCKET}/conf/run.yaml",
                            "--output", f"s3://{BUCKET}/run"], 900,
                           lambda: timeline.append({"t": round(time.monotonic() - t0, 1),
                                                    **_sample(isolated)}))
    logs = client.get_job_logs(sid)
    assert status == JobStatus.SUCCEEDED, _why(client, sid)
    timeline.append({"t": round(time.monotonic() - t0, 1), **_sample(isolated)})
    print("node timeline (s since submit: stage -> nodes):")
    last = None
    for row in timeline:   # only the changes
        now = {k: v for k, v in row.items() if k != "t"}
        if now != last:
            print(f"  {row['t']:7.1f}  {json.dumps(now)}")
            last = now

    # every stage ran and wrote to S3; nothing on any node's disk was needed across nodes
    record = json.loads(s3.get_object(Bucket=BUCKET, Key="run/workflow.json")["Body"].read())
    print("stage seconds:", {n: round(s.get("seconds") or 0) for n, s in record["stages"].items()})
    assert {n: s["status"] for n, s in record["stages"].items()} == {
        n: "ran" for n in ("data", "filter", "train", "eval", "score", "filter2", "train2",
                           "eval2", "index", "serve")}, record
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix="run/") for o in page.get("Contents", [])}
    assert {"run/train/model/model.safetensors", "run/train/metrics.jsonl", "run/train/eval.json",
            "run/index/index.json", "run/report.html", "run/round2/scored/stats.json",
            "run/round2/train/model/model.safetensors", "run/round2/eval2.json"} <= keys
    assert any(k.startswith("run/train/checkpoints/") for k in keys)
    assert "joined" in logs                      # plain ray.init() found the cluster

    # placement: training on two worker nodes; nothing of any stage on the CPU-0 head
    nodes = {stage: set() for stage in STAGE_TITLES}
    for row in timeline:
        for stage in STAGE_TITLES:
            nodes[stage].update(row.get(stage, ()))
    assert len(nodes["train"]) >= 2, nodes
    assert all(nodes[s] for s in ("train", "serve")), nodes
    assert not any("head" in n for s in nodes.values() for n in s), nodes

    # the driver's own node timeline (workflow/nodes.py): the same picture from the GCS
    per = record["nodes"]["per_stage"]
    print("workflow.json nodes.per_stage:", json.dumps(per))
    assert per["train"]["busy_nodes"] >= 2 and per["data"]["busy_nodes"] >= 2, per
    assert all(p["alive_min"] == 4 for p in per.values()), per   # nobody lost a node here

    # the report, on S3: the funnel, the curves, the retrieval figures, the example grid
    report = s3.get_object(Bucket=BUCKET, Key="run/report.html")["Body"].read().decode()
    for part in ("Funnel", "Nodes per stage", "kept by the ALIGN filters", "curves.png", "R@1",
                 "data:image/jpeg;base64,", "data:image/png;base64,"):
        assert part in report, part
    funnel = record["stages"]["filter"]["summary"]
    assert 0 < funnel["output_rows"] < funnel["input_rows"] == 300
    data = json.loads(s3.get_object(Bucket=BUCKET, Key="run/data/stats.json")["Body"].read())
    assert data["complete"] and data["input_rows"] == 300
    filt = json.loads(s3.get_object(Bucket=BUCKET, Key="run/filtered/stats.json")["Body"].read())
    assert filt["input"] == f"s3://{BUCKET}/run/data"
    index = json.loads(s3.get_object(Bucket=BUCKET, Key="run/index/index.json")["Body"].read())
    round2 = record["stages"]["filter2"]["summary"]["output_rows"]   # the round-2 rows are indexed
    assert index["count"] == round2 - index["dropped"]
    ev = json.loads(s3.get_object(Bucket=BUCKET, Key="run/train/eval.json")["Body"].read())
    assert ev["n"] > 0 and 0 <= ev["text_to_image"]["R@1"] <= 1

    # round 2: every downloaded row scored, round 1's rules + the score rule, the same budget,
    # both models on round 1's held-out rows, and the round-2 model indexed over its rows
    scored = record["stages"]["score"]["summary"]
    assert scored["input_rows"] == scored["output_rows"] == data["output_rows"]
    f2 = record["stages"]["filter2"]["summary"]
    assert 0 < f2["output_rows"] < funnel["output_rows"] and f2["dropped"]["score_keep_fraction"]
    assert f2["input_rows"] == f2["output_rows"] + sum(f2["dropped"].values())
    assert record["stages"]["train2"]["summary"]["step"] == record["config"]["train"]["steps"]
    ev2 = json.loads(s3.get_object(Bucket=BUCKET, Key="run/round2/eval2.json")["Body"].read())
    assert ev2["round1"]["n"] == ev2["round2"]["n"] == ev["n"]   # the same held-out rows
    assert index["model"] == f"s3://{BUCKET}/run/round2/train/model"
    assert "Round 2" in report

    # the app the job left deployed answers, from replicas on worker nodes
    url = record["stages"]["serve"]["summary"]["url"]
    assert url == f"http://127.0.0.1:{port}"
    client = AlignClient(url, timeout=60, retries=0)
    assert client.healthz()["status"] == "ok"
    hits = client.search(text="a red circle", k=3)
    assert len(hits) == 3 and all(h["id"] >= 0 and "text" in h for h in hits)
    assert client.image(hits[0]["id"])[:2] == b"\xff\xd8"   # a JPEG thumbnail
    app = record["stages"]["serve"]["summary"]["app"]
    for name in ("Router", "TextEncoder", "ImageEncoder"):
        placed = isolated.node_of_title(f"ServeReplica:{app}:{name}")
        assert placed and all(n.type != "head" for n in placed), (name, placed)


def _why(client, sid: str) -> str:
    """Ray's own record of how a job ended, then its log's tail: the record says why a job
    failed before its driver printed anything (a CI run saw one fail 6 s after submission
    with an empty log and no other clue)."""
    info = client.get_job_info(sid)
    return (f"{info.status} {info.error_type} exit code {info.driver_exit_code}: {info.message}\n"
            f"{client.get_job_logs(sid)[-6000:]}")


def _package_lost(client, sid: str) -> bool:
    """Ray's own intermittent start failure (ray-project/ray#36703, open): the job's working-dir
    package is missing from the GCS when a node's runtime-env agent fetches it, seconds after a
    successful upload, and the job fails RUNTIME_ENV_SETUP_FAILURE before our code runs."""
    info = client.get_job_info(sid)
    return ("RUNTIME_ENV_SETUP_FAILURE" in str(info.error_type)
            and "Failed to download runtime_env file package" in (info.message or ""))


def _run_job(cluster: LocalCluster, client, sid: str, entrypoint: list[str], timeout_s: float,
             tick=None):
    """Submit, wait for the end; (submission id, status).  A job that Ray failed before it
    started (:func:`_package_lost`) is submitted once more under a new id, as README
    "Troubleshooting" tells users to; any other failure, or a second one, stands."""
    from ray.job_submission import JobStatus

    for attempt in (1, 2):
        _submit(cluster, sid, entrypoint)
        deadline = time.monotonic() + timeout_s
        while (status := client.get_job_status(sid)) not in (
                JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.monotonic() < deadline, client.get_job_logs(sid)[-6000:]
            if tick:
                tick()
            time.sleep(1)
        if attempt == 2 or status != JobStatus.FAILED or not _package_lost(client, sid):
            return sid, status
        print(f"ray lost job {sid}'s working-dir package before it started (ray#36703); "
              "submitting it again:", _why(client, sid)[:400])
        sid += "-again"
    raise AssertionError("unreachable")


def _submit(cluster: LocalCluster, sid: str, entrypoint: list[str]) -> None:
    cmd = [f"{VENV_BIN}/ray", "job", "submit", "--no-wait", "--address", cluster.dashboard,
           "--submission-id", sid, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--", *entrypoint]
    t0 = time.monotonic()
    while True:
        proc = subprocess.run(cmd, env=cluster.env, cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        # the dashboard answers before the head's job agent registered ("No available agent")
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr \
                or time.monotonic() - t0 > 120:
            break
        time.sleep(3)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_a_resubmitted_job_skips_what_s3_holds(isolated, s3):
    """Resume across jobs: a second submission (new driver, new working-directory copies)
    finds every completed stage through the storage URI alone and skips it."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    first = json.loads(s3.get_object(Bucket=BUCKET, Key="run/workflow.json")["Body"].read())
    client = JobSubmissionClient(isolated.dashboard)
    sid, status = _run_job(isolated, client, f"e2e-mn-rerun-{uuid.uuid4().hex[:8]}",
                           ["python", "workflows/end_to_end.py", "--smoke",
                            "--stages", "data,filter,train,eval,index",
                            "--output", f"s3://{BUCKET}/run"], 600)
    assert status == JobStatus.SUCCEEDED, _why(client, sid)
    record = json.loads(s3.get_object(Bucket=BUCKET, Key="run/workflow.json")["Body"].read())
    assert {n: s["status"] for n, s in record["stages"].items()} == {
        "data": "skipped", "filter": "skipped", "train": "skipped", "eval": "ran",
        "index": "skipped"}
    # against the first job, not a fixed bound: a loaded box slows both jobs alike, and a fixed
    # bound failed a rerun that skipped every stage as it should
    assert record["seconds"] < 0.4 * first["seconds"], (record["seconds"], first["seconds"])
