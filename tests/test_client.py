"""``AlignClient``'s replays against a real HTTP server on 127.0.0.1 that fails on cue: a
connection dropped before the answer, 500s, a 503 with ``Retry-After``, a 400."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from align_ray.client import AlignClient, APIError


class Scripted:
    """Answers each request with the next entry of ``script`` ("drop", or a status code), then
    200 with one 2-d embedding per text; counts the requests it got."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                step = outer.script.pop(0) if outer.script else 200
                if step == "drop":          # as a dying replica's connection does
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if step == 200:
                    out = {"embeddings": [[1.0, 0.0]] * len(body["texts"]), "dim": 2}
                else:
                    out = {"detail": f"scripted {step}"}
                data = json.dumps(out).encode()
                self.send_response(step)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if step == 503:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(*script):
        servers.append(Scripted(list(script)))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_a_dropped_connection_and_500s_are_replayed(scripted):
    srv = scripted("drop", 500)
    emb = AlignClient(srv.url, timeout=10).embed_text(["a", "b"])
    assert emb.shape == (2, 2) and srv.requests == 3


def test_the_replays_are_bounded_and_the_last_answer_is_the_error(scripted):
    srv = scripted(500, 502, 500, 500)
    with pytest.raises(APIError) as e:
        AlignClient(srv.url, timeout=10, retries=2).embed_text(["a"])
    assert e.value.status == 500 and "scripted 500" in e.value.message
    assert srv.requests == 3


def test_a_503_waits_for_its_retry_after(scripted):
    srv = scripted(503)
    t0 = time.monotonic()
    AlignClient(srv.url, timeout=10).embed_text(["a"])
    assert time.monotonic() - t0 >= 0.9 and srv.requests == 2


def test_a_bad_request_is_never_replayed(scripted):
    srv = scripted(400)
    with pytest.raises(APIError) as e:
        AlignClient(srv.url, timeout=10).embed_text(["a"])
    assert e.value.status == 400 and srv.requests == 1


def test_retries_0_sends_once(scripted):
    srv = scripted("drop")
    with pytest.raises(requests.ConnectionError):
        AlignClient(srv.url, timeout=10, retries=0).embed_text(["a"])
    assert srv.requests == 1
