"""A REAL job submission: ``ray start --head`` (dashboard on, for the job API) in a subprocess,
``ray job submit --working-dir . -- python workflows/end_to_end.py --smoke --serve``, wait for
SUCCEEDED, check the outputs, query the Serve app the job left deployed, stop the cluster.

The cluster gets its own temp dir, HOME (with ``ray_bootstrap_config.yaml``: no cloud-metadata
probes) and ports.  It is stopped by killing exactly the processes whose command line names its
temp dir: ``ray stop`` would kill every Ray process of this user on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, free_port

VENV_BIN = str(Path(sys.executable).parent)
EXCLUDES = [".venv", ".venv-*", ".git", "out", "demo-output", ".pytest_cache", "**/__pycache__",
            "*.egg-info", ".ci-home"]


def _cluster_pids(temp: str, gcs: int = 0) -> list[int]:
    """Processes of the cluster: its temp dir, or (ray client server) its GCS port, on the
    command line."""
    marks = [temp] + ([f":{gcs} ", f":{gcs}\0"] if gcs else [])
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") + " "
        except OSError:
            continue
        if any(m in cmd for m in marks) and "--address" in cmd or temp in cmd:
            pids.append(int(d.name))
    return pids


def _stop_cluster(temp: str, gcs: int = 0) -> None:
    """SIGTERM, then SIGKILL, every process of this cluster (and nothing else)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _cluster_pids(temp, gcs)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _cluster_pids(temp, gcs) and time.time() < deadline:
            time.sleep(0.5)
    assert not _cluster_pids(temp, gcs), "cluster processes survived SIGKILL"


@pytest.fixture()
def head(tmp_path):
    """A real single-node cluster started with ``ray start --head``; yields (env, dashboard URL)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    temp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: unix socket paths are <108 chars
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(HOME=str(home), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}:{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    gcs, dash = free_port(), free_port()
    # every fixed default port gets a free one: other Ray clusters on this machine may hold
    # 52365 (the dashboard agent's HTTP port: the job API then answers "No available agent"),
    # 10001 (Ray Client), ...
    cmd = [f"{VENV_BIN}/ray", "start", "--head", f"--port={gcs}", "--num-cpus=4",
           "--include-dashboard=true", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    try:
        subprocess.run(cmd, env=env, check=True, timeout=240, capture_output=True, text=True)
        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:  # the job API is served by the dashboard, which comes up after `ray start`
            try:
                if requests.get(f"{url}/api/version", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "dashboard (job API) did not come up"
            time.sleep(1)
        yield env, url
    finally:
        _stop_cluster(temp, gcs)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_smoke(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from align_ray.client import AlignClient

    env, dashboard = head
    out = tmp_path / "run"
    port = free_port()
    sid = f"e2e-smoke-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": EXCLUDES}
    t0 = time.time()
    while True:
        proc = subprocess.run(
            [f"{VENV_BIN}/ray", "job", "submit", "--address", dashboard, "--submission-id", sid,
             "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "workflows/end_to_end.py", "--smoke", "--serve", "--port", str(port),
             "--output", str(out)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        log = proc.stdout + proc.stderr
        # the dashboard answers before the node's job agent has registered with it; the API
        # then says "No available agent to submit job, please try again later" (nothing created)
        if proc.returncode == 0 or "No available agent" not in log or time.time() - t0 > 120:
            break
        time.sleep(3)
    assert proc.returncode == 0, log[-6000:]
    assert JobSubmissionClient(dashboard).get_job_status(sid) == JobStatus.SUCCEEDED
    print(f"job {sid} SUCCEEDED in {time.time() - t0:.0f}s")
    assert "joined" in log                                 # plain ray.init() found the cluster

    # outputs: every stage ran, the report has the funnel, the curves and the example grid
    record = json.loads((out / "workflow.json").read_text())
    assert {n: s["status"] for n, s in record["stages"].items()} == {
        n: "ran" for n in ("data", "filter", "train", "eval", "index", "serve")}
    funnel = record["stages"]["filter"]["summary"]
    assert 0 < funnel["output_rows"] < funnel["input_rows"] == 300
    report = (out / "report.html").read_text()
    for part in ("Funnel", "kept by the ALIGN filters", "curves.png", "R@1",
                 "data:image/jpeg;base64,", "data:image/png;base64,"):
        assert part in report, part
    assert (out / "train" / "metrics.jsonl").stat().st_size > 0
    ev = json.loads((out / "train" / "eval.json").read_text())
    assert ev["n"] > 0 and 0 <= ev["text_to_image"]["R@1"] <= 1

    # --serve under a job: the app stays deployed on the cluster after the job ended
    url = record["stages"]["serve"]["summary"]["url"]
    assert url == f"http://127.0.0.1:{port}"
    client = AlignClient(url, timeout=60)
    assert client.healthz()["status"] == "ok"
    hits = client.search(text="a red circle", k=3)
    assert len(hits) == 3 and all(h["id"] >= 0 and "text" in h for h in hits)
    assert client.image(hits[0]["id"])[:2] == b"\xff\xd8"   # a JPEG thumbnail
