"""``workflows/end_to_end.py`` as a user runs it (a subprocess starting its own local Ray at this
machine's CPU count): a serve section that cannot fit that Ray is refused before any stage
runs, instead of after the training, with Serve then waiting for ever."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import yaml

from tests.conftest import REPO


def test_a_serve_section_that_cannot_fit_the_local_ray_is_refused_before_the_data_stage(tmp_path):
    run_yaml = tmp_path / "run.yaml"
    # one shard per CPU and more, at 0.5 CPU each, beside encoders and Router: never fits
    run_yaml.write_text(yaml.safe_dump({"serve": {"index_shards": os.cpu_count() * 2}}))
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "workflows" / "end_to_end.py"), "--smoke",
                           "--config", str(run_yaml), "--output", str(out),
                           "--ray-address", "local"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "end_to_end: error: serve: the app needs" in proc.stderr, proc.stderr[-2000:]
    assert "IndexShard0 0.5" in proc.stderr
    assert "[data]" not in proc.stdout and not (out / "data").exists()
    print(f"refused in {took:.0f} s")


def test_an_output_root_it_cannot_write_is_refused_before_ray_starts(tmp_path):
    """A wrong bucket or endpoint, or here a local root under a regular file: exit 2 naming
    the root, before Ray (the first write used to come after the data stage's Ray start, and
    failed with a traceback, twice: the stage's record and then the final one)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, str(REPO / "workflows" / "end_to_end.py"), "--smoke",
                           "--output", str(blocker / "run"), "--ray-address", "local"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"end_to_end: error: cannot write the run record under {blocker / 'run'}" \
        in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "[data]" not in proc.stdout
