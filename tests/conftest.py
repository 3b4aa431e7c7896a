"""Session-wide fixtures: one real local Ray cluster, the built-in noisy web, a real S3 server.

Environment first (before anything starts Ray): Ray's dashboard probes cloud metadata
addresses unless HOME holds a ``ray_bootstrap_config.yaml`` naming a local provider, so tests
run with such a HOME; token auth is off; S3 settings are exported so Ray workers inherit them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# No packet leaves loopback: a model named as a Hugging Face hub name is read from the hub cache
# only (set before huggingface_hub is imported; subprocesses and Ray workers inherit it)
os.environ["HF_HUB_OFFLINE"] = "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_port() -> int:
    """A free port that nothing else on the box will be handed by the OS in the meantime.

    ``free_port`` returns an ephemeral port, which the OS may give to the next process that
    binds port 0 (every Ray node opens dozens): fine for a server bound at once, but SeaweedFS
    binds its ports a few minutes after they are chosen, and a port taken in between makes it
    exit at once ("port ... is not available").  So these come from between Ray's worker range
    (10002-19999) and the OS's ephemeral range, where only an explicit bind can land.
    """
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        port = random.randint(20000, max(20001, low - 1))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


if not Path(os.environ.get("HOME", "/nonexistent"), "ray_bootstrap_config.yaml").exists():
    _home = tempfile.mkdtemp(prefix="align-ray-home-")
    Path(_home, "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    os.environ["HOME"] = _home
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "300")
S3_PORT = quiet_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="testkey",
                  AWS_SECRET_ACCESS_KEY="testsecret", AWS_REGION="us-east-1")
REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The read-only shared folder (dev data set, KubeRay CRDs): $ALIGN_RAY_SHARED, or a
    ``shared/`` inside or next to the checkout, or the workplace's /work/shared."""
    env = os.environ.get("ALIGN_RAY_SHARED")
    for cand in ([Path(env)] if env else []) + [REPO / "shared", REPO.parent / "shared",
                                                Path("/work/shared")]:
        if (cand / "data").is_dir() or (cand / "kuberay").is_dir():
            return cand
    return REPO.parent / "shared"


SHARED = shared_dir()
DEV_SET = SHARED / "data" / "emoji_noto_dev.parquet"



@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session.  It has 4 logical CPUs because a Serve
    app lives for the whole session next to in-session Train fits; 2-CPU behaviour, as users
    run it, is tested by tests/test_cli_stages.py on a ``ray start --num-cpus=2`` head."""
    import ray
    import ray.data

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", _temp_dir=temp)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def web():
    """The built-in noisy web on 127.0.0.1 (a real threaded HTTP server)."""
    from align_ray.web.faults import png_bomb_bytes
    from align_ray.web.server import NoisyWeb

    png_bomb_bytes()  # built once (~2.5 s) up front, so its first request is not a slow one
    with NoisyWeb(seed=0) as server:
        yield server


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS ``weed mini``) on 127.0.0.1; yields boto3 client."""
    import boto3
    from botocore.config import Config

    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the SeaweedFS binary `weed` is missing: install the dev extras")
    data = tmp_path_factory.mktemp("weed")
    # Every bucket is a SeaweedFS collection with volumes of its own, and by default the volume
    # count is capped at free disk / volume size: on a runner with a few GB free, a later bucket
    # got "no free volumes left" (a 500 on its first PUT).  Volumes are sparse files, so an
    # explicit cap and small volumes cost nothing here.
    # Every port is explicit, free and outside the OS's ephemeral range (``quiet_port``): the
    # defaults (master 9333, volume 8080, filer 8888, ...) collide with anything else on the box
    # that holds them, and weed exits at once on a taken port (so it gets two more tries).  Telemetry is off: by default the
    # master reports to telemetry.seaweedfs.com, and no packet may leave loopback.
    log = data / "weed.log"
    for attempt in range(3):
        ports = [f"-{name}={quiet_port()}" for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port.grpc", "webdav.port", "admin.port", "admin.port.grpc",
            "debug.port", "s3.debug.port")]
        with log.open("a") as out:
            proc = subprocess.Popen(
                [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                 f"-s3.port={S3_PORT}", "-master.telemetry=false", *ports,
                 "-volume.max=1000", "-master.volumeSizeLimitMB=64"],
                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        # short probes: whatever else holds a taken port may accept and never answer
        probe = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], config=Config(
            connect_timeout=2, read_timeout=2, retries={"max_attempts": 1}))
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            try:
                probe.list_buckets()
                break
            except Exception:  # noqa: BLE001 - still starting
                time.sleep(0.3)
        else:
            proc.kill()
            proc.wait()
            if attempt < 2 and time.time() < deadline:
                continue  # it exited at once: most likely a port taken since; try other ports
            tail = log.read_text(errors="replace")[-2000:]
            pytest.fail(f"SeaweedFS did not start (exit {proc.returncode}); its log ends:\n{tail}")
        break
    yield boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
