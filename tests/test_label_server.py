"""The labelling page's HTTP API, on a real server (port 0, in a thread), hit with urllib."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from lora_rlhf.labeling import LabelSession
from lora_rlhf.labeling.server import LabelServer


def write_candidates(path, n=3, k=3):
    rows = [{"id": f"p{i}", "prompt": f"prompt {i}", "responses": [f"r{i}.{j}" for j in range(k)]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Client:
    def __init__(self, server: LabelServer):
        self.base = f"http://127.0.0.1:{server.port}"

    def call(self, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        req = urllib.request.Request(self.base + path, data=data, headers={**hdrs, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as res:
                return res.status, res.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, path, body=None, **kw):
        status, data = self.call(path, body, **kw)
        return status, json.loads(data)


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(out=None, default_labeler=None):
        session = LabelSession.open(write_candidates(tmp_path / "c.jsonl"), out or tmp_path / "r.jsonl")
        server = LabelServer(session, "127.0.0.1", 0, default_labeler=default_labeler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server, Client(server)

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_page_next_submit_and_progress(serve, tmp_path):
    server, client = serve(default_labeler="alice")
    assert server.url == f"http://127.0.0.1:{server.port}/?labeler=alice"
    status, page = client.call("/")
    assert status == 200 and b"rank responses" in page and b'"labeler": "alice"' in page  # config injected
    assert b"http://" not in page and b"https://" not in page  # no external resources (no CDN)

    status, nxt = client.json("/api/next?labeler=alice")
    assert status == 200
    assert nxt == {"item": {"id": "p0", "prompt": "prompt 0", "responses": ["r0.0", "r0.1", "r0.2"]},
                   "progress": {"done": 0, "total": 3}}
    status, res = client.json("/api/submit", {"labeler": "alice", "id": "p0", "ranks": [3, 1, 2],
                                              "flags": {"0": ["untruthful"]}})
    assert status == 200 and res["recorded"] is True
    assert res["item"]["id"] == "p1" and res["progress"] == {"done": 1, "total": 3}  # the next item comes back
    status, res = client.json("/api/submit", {"labeler": "alice", "id": "p1", "skipped": True})
    assert status == 200 and res["progress"]["done"] == 2

    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(x["id"], x.get("ranks"), x.get("skipped"), x["flags"]) for x in lines] == [
        ("p0", [3, 1, 2], None, {"0": ["untruthful"]}), ("p1", None, True, {})]

    status, stats = client.json("/api/stats")
    assert status == 200 and stats["labelers"]["alice"]["labeled"] == 1 and stats["labelers"]["alice"]["skipped"] == 1


def test_duplicate_submission_is_refused_and_restart_resumes(serve, tmp_path):
    _, client = serve()
    client.json("/api/submit", {"labeler": "bob", "id": "p0", "ranks": [1, 2, 3]})
    status, res = client.json("/api/submit", {"labeler": "bob", "id": "p0", "ranks": [3, 2, 1]})
    assert status == 409 and res["recorded"] is False
    # A second server on the same file (a restart, or another process) continues where bob stopped.
    _, client2 = serve(out=tmp_path / "r.jsonl")
    assert client2.json("/api/next?labeler=bob")[1]["item"]["id"] == "p1"
    assert client2.json("/api/next?labeler=carol")[1]["item"]["id"] == "p0"
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("body, match", [
    ({"labeler": "bob", "id": "p0", "ranks": [1, 1, 1]}, "all responses are tied"),
    ({"labeler": "bob", "id": "p0", "ranks": [1, 2]}, "ranks must be 3 positive integers"),
    ({"labeler": "bob", "id": "zzz", "ranks": [1, 2, 3]}, "no prompt with id"),
    ({"labeler": "", "id": "p0", "ranks": [1, 2, 3]}, "labeler name"),
    ({"labeler": "bob\n", "id": "p0", "ranks": [1, 2, 3]}, "labeler name"),  # not a second, different "bob"
    ({"labeler": "bob", "id": "p0", "ranks": [1, 2, 3], "flags": {"0": ["spam"]}}, "flag labels"),
])
def test_bad_submissions_get_400_and_write_nothing(serve, tmp_path, body, match):
    _, client = serve()
    status, res = client.json("/api/submit", body)
    assert status == 400 and match in res["error"]
    assert not (tmp_path / "r.jsonl").exists()


def test_request_guards(serve, tmp_path):
    _, client = serve()
    # A cross-site form can only send text/plain etc.; JSON needs a preflight this server never grants.
    status, _ = client.call("/api/submit", raw=b'{"labeler": "bob", "id": "p0", "ranks": [1, 2, 3]}',
                            headers={"Content-Type": "text/plain"})
    assert status == 415
    # DNS rebinding: a foreign Host header is refused.
    assert client.call("/api/next?labeler=bob", headers={"Host": "evil.example:80"})[0] == 403
    assert client.call("/api/submit", raw=b"[1, 2]")[0] == 400
    assert client.call("/nope")[0] == 404
    assert not (tmp_path / "r.jsonl").exists()


def test_concurrent_labelers_over_http_on_two_servers(serve, tmp_path):
    # Two servers (think: two processes) on one rankings file; 'sam' works in both at once, so the two race
    # for the same prompts; alice and bob label alongside.
    (_, a), (_, b) = serve(), serve(out=tmp_path / "r.jsonl")

    def work(client, name):
        while (item := client.json(f"/api/next?labeler={name}")[1]["item"]) is not None:
            client.json("/api/submit", {"labeler": name, "id": item["id"], "ranks": [1, 2, 3]})

    threads = [threading.Thread(target=work, args=args) for args in ((a, "alice"), (b, "bob"), (a, "sam"), (b, "sam"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted((x["labeler"], x["id"]) for x in lines) == sorted(
        (name, f"p{i}") for name in ("alice", "bob", "sam") for i in range(3))


def test_malformed_and_stalled_requests_get_an_answer_not_a_dropped_connection(serve, tmp_path):
    import socket

    server, _ = serve()
    host, port = server.server_address[:2]
    request = (f"POST /api/submit HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               "Content-Length: abc\r\n\r\n{}").encode()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(4096):  # the server answers, then closes: the body's end was unknown
            response += chunk
    assert response.startswith(b"HTTP/1.1 400") and b"body must be" in response
    # A client that announces more than it sends is cut off after the read timeout, not held forever.
    from lora_rlhf.labeling import server as server_module

    assert server_module._Handler.timeout == server_module.READ_TIMEOUT <= 60
    assert not (tmp_path / "r.jsonl").exists()


def test_a_submission_that_cannot_be_saved_says_so(serve, tmp_path, monkeypatch):
    server, client = serve()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(server.session, "submit", disk_full)
    status, res = client.json("/api/submit", {"labeler": "bob", "id": "p0", "ranks": [1, 2, 3]})
    assert status == 507 and "No space left on device" in res["error"] and "free disk space" in res["fix"]


def test_a_burst_of_concurrent_submissions_is_answered_in_full(serve, tmp_path):
    """200 labelers submitting at once lost 16-34 % to timeouts and resets: the listen backlog was
    socketserver's 5. Each of 100 simultaneous connections gets its answer, and each judgement is saved once."""
    import socket

    server, _ = serve()
    port = server.port
    n = 100
    start = threading.Barrier(n)
    answers: list[bytes | str] = [b""] * n

    def submit(i: int) -> None:
        body = json.dumps({"labeler": f"labeler{i}", "id": "p0", "ranks": [1, 2, 3]}).encode()
        request = (f"POST /api/submit HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        start.wait()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(request)
                while chunk := sock.recv(65536):
                    answers[i] += chunk
        except OSError as e:  # a timeout or a reset: the submission is lost to the labeler
            answers[i] = repr(e)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    lost = [a for a in answers if not (isinstance(a, bytes) and a.startswith(b"HTTP/1.1 200"))]
    assert not lost, f"{len(lost)} of {n} lost, e.g. {lost[0]!r}"
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted(x["labeler"] for x in lines) == sorted(f"labeler{i}" for i in range(n))


def test_a_body_nested_too_deep_gets_400_not_a_dropped_connection(serve, tmp_path):
    _, client = serve()
    status, res = client.json("/api/submit", raw=b"[" * 100_000 + b"]" * 100_000)  # 200 kB: under the size limit
    assert status == 400 and "nested too deep" in res["error"]
    status, res = client.json("/api/submit", raw=b'{"a": ' * 100_000 + b"1" + b"}" * 100_000)
    assert status == 400
    assert client.json("/api/next?labeler=bob")[0] == 200  # the server still answers
    assert not (tmp_path / "r.jsonl").exists()
