"""The server's guards, each tested against the real server process over real sockets: control only
with the admin token, scoring with an API key where keys are set, the Host and Origin checks,
slow clients (408), the connection cap (503 with Retry-After), the memory budget (413 before
decoding, 503 when busy) and TLS."""

from __future__ import annotations

import io
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from serving import RunningServer

TOKEN = "admin-0123456789abcdef0123"
KEYS = {"line-1": "key-line-one-0123456789", "line-2": "key-line-two-9876543210"}
RELOAD = "/v2/repository/models/bottle/load"
PREDICT = "/v2/models/bottle/predict"


@pytest.fixture(scope="module")
def good_png(data_root) -> bytes:
    return (data_root / "mvtec_ad" / "bottle" / "test" / "good" / "000.png").read_bytes()


@pytest.fixture(scope="module")
def server(bottle_model_file, tmp_path_factory):
    """One plain server (no keys, no token) for the tests that do not change it."""
    running = RunningServer(bottle_model_file, log=tmp_path_factory.mktemp("guards") / "server.log")
    running.wait_ready()
    yield running
    running.stop()


def post_image(url: str, data: bytes, headers: dict[str, str] | None = None, **params) -> httpx.Response:
    return httpx.post(f"{url}{PREDICT}", files=[("file", ("part.png", data, "image/png"))], headers=headers or {}, params=params, timeout=60)


def flat_png(width: int, height: int, mode: str = "L") -> bytes:
    """A one-colour PNG: tiny on the wire, ``width * height`` pixels when decoded."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 90).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def raw_exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``request`` bytes on a new connection and read until the server closes it: (answer, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# Control: reload only with the admin token


def test_reload_over_http_is_off_without_an_admin_token(server):
    reply = httpx.post(f"{server.url}{RELOAD}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert reply.status_code == 403
    assert reply.json() == {
        "error": "reloading over HTTP is off: start the server with --admin-token-file (or $PATCHCORE_ADMIN_TOKEN) to allow it, or send the server SIGHUP"
    }


def test_reload_needs_the_whole_admin_token(bottle_model_file, start_server, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    running = start_server(bottle_model_file, "--admin-token-file", str(token_file))
    refused = {"error": "reloading needs the admin token: send 'Authorization: Bearer <token>'"}
    # none, another, a prefix (a comparison on a prefix would pass it), a longer one, another scheme, a short prefix
    for authorization in (None, "Bearer wrong-token-0123456789", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}", f"Bearer {TOKEN[:8]}"):
        headers = {} if authorization is None else {"Authorization": authorization}
        reply = httpx.post(f"{running.url}{RELOAD}", headers=headers, timeout=60)
        assert reply.status_code == 401, authorization
        assert reply.json() == refused
        assert reply.headers["www-authenticate"] == 'Bearer realm="patchcore-admin"'
    reply = httpx.post(f"{running.url}{RELOAD}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert reply.status_code == 200 and reply.json()["loaded"] is True
    assert reply.json()["message"].startswith("loaded bottle.safetensors (sha256 ")


def test_a_bad_key_file_stops_the_server_with_one_line(bottle_model_file, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("line-1 key-line-one-0123456789\nline-2 short\n")
    done = subprocess.run([sys.executable, "-m", "patchcore.cli", "serve", str(bottle_model_file), "--api-key-file", str(keys), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"patchcore: error: '{keys}', line 2: a token must be at least 16 printable characters without spaces (e.g. openssl rand -hex 16)"
    )


# ---------------------------------------------------------------------------------------------
# Scoring: an API key where keys are configured


def test_scoring_and_metadata_need_a_key_when_keys_are_set(bottle_model_file, start_server, tmp_path, good_png):
    keys = tmp_path / "keys.txt"
    keys.write_text("# one key a line camera\n\n" + "".join(f"{name} {key}\n" for name, key in KEYS.items()))
    running = start_server(bottle_model_file, "--api-key-file", str(keys))
    assert httpx.get(f"{running.url}/v2").json()["api_key_required"] is True
    # open: health, readiness, the page
    assert httpx.get(f"{running.url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{running.url}/").status_code == 200
    missing = {"error": "this server needs an API key: send 'Authorization: Bearer <key>'"}
    unknown = {"error": "unknown API key"}
    for authorization, expected in ((None, missing), ("Bearer key-unknown-0123456789", unknown), (f"Bearer {KEYS['line-1'][:-1]}", unknown), (f"Token {KEYS['line-1']}", missing)):
        headers = {} if authorization is None else {"Authorization": authorization}
        for reply in (post_image(running.url, good_png, headers), httpx.get(f"{running.url}/v2/models/bottle", headers=headers)):
            assert reply.status_code == 401, authorization
            assert reply.json() == expected
            assert reply.headers["www-authenticate"] == 'Bearer realm="patchcore"'
    for key in KEYS.values():
        reply = post_image(running.url, good_png, {"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200 and reply.json()["results"][0]["is_anomalous"] is False
    assert httpx.get(f"{running.url}/v2/models/bottle", headers={"Authorization": f"Bearer {KEYS['line-2']}"}).status_code == 200


def test_scoring_is_open_without_keys(server, good_png):
    assert httpx.get(f"{server.url}/v2").json()["api_key_required"] is False
    assert post_image(server.url, good_png).status_code == 200


# ---------------------------------------------------------------------------------------------
# Host and Origin


def test_a_foreign_host_is_refused_and_the_own_names_answered(server):
    for path in ("/v2", "/v2/models/bottle", "/"):  # DNS rebinding would read the metadata through any of these
        reply = httpx.get(f"{server.url}{path}", headers={"Host": "rebind.attacker.example"})
        assert reply.status_code == 400
        assert reply.json() == {"error": "host 'rebind.attacker.example' is not served here; the server's --allowed-hosts lists the names it answers to"}
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "LOCALHOST"):
        assert httpx.get(f"{server.url}/v2", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_names_and_domains(bottle_model_file, start_server):
    running = start_server(bottle_model_file, "--allowed-hosts", "plant.example", "*.line.example", "127.0.0.1")
    for host, status in (("plant.example:8443", 200), ("cam-3.line.example", 200), ("line.example", 400), ("localhost", 400), ("plant.example.evil", 400)):
        assert httpx.get(f"{running.url}/v2", headers={"Host": host}).status_code == status, host


def test_cross_origin_state_changing_requests_are_refused(server, good_png):
    refused = {"error": "cross-origin request refused: this server takes state-changing requests only from its own page or from clients that are not browsers"}
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": f"http://127.0.0.1:{server.port + 1}"}, {"Sec-Fetch-Site": "cross-site"}):
        reply = post_image(server.url, good_png, headers)
        assert reply.status_code == 403, headers
        assert reply.json() == refused
        assert httpx.post(f"{server.url}{RELOAD}", headers=headers).status_code == 403  # before any credential is looked at
    # the page's own origin, and clients that are not browsers (no Origin), are served
    assert post_image(server.url, good_png, {"Origin": f"http://127.0.0.1:{server.port}", "Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert post_image(server.url, good_png, {"Origin": f"http://localhost:{server.port}", "Host": f"localhost:{server.port}"}).status_code == 200
    assert post_image(server.url, good_png).status_code == 200
    # reading is not changing: a browser keeps a cross-origin answer from the page that asked
    assert httpx.get(f"{server.url}/v2/models/bottle", headers={"Origin": "http://evil.example"}).status_code == 200


def test_metadata_names_the_model_without_its_place_and_docs_need_no_cdn(server, bottle_model_file):
    reply = httpx.get(f"{server.url}/v2/models/bottle")
    assert reply.json()["patchcore"]["model_file"] == "bottle.safetensors"
    assert str(bottle_model_file.parent) not in reply.text
    assert str(bottle_model_file.parent) not in httpx.get(f"{server.url}/metrics").text
    assert httpx.get(f"{server.url}/docs").status_code == 404  # Swagger UI would load from a CDN
    assert httpx.get(f"{server.url}/openapi.json").status_code == 200


# ---------------------------------------------------------------------------------------------
# Slow clients and the connection cap


def test_headers_that_arrive_too_slowly_get_408(bottle_model_file, start_server):
    running = start_server(bottle_model_file, "--header-timeout", "1")
    # Never finished, and trickled a byte at a time: both are cut off at the deadline.
    answer, seconds = raw_exchange(running.port, b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and 0.9 <= seconds < 5
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"error": "the request's headers did not arrive within 1 s"}
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        received = b""
        for byte in b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
            sock.setblocking(False)
            try:
                received += sock.recv(4096)
            except BlockingIOError:
                pass
            sock.setblocking(True)
            if received:
                break
    assert received.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 3
    # a client that is quick enough is served on the same server
    assert httpx.get(f"{running.url}/v2/health/ready").status_code == 200


def test_a_body_that_arrives_too_slowly_gets_408(bottle_model_file, start_server, good_png):
    running = start_server(bottle_model_file, "--read-timeout", "1")
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: {len(good_png)}\r\n\r\n".encode()
    answer, seconds = raw_exchange(running.port, head + good_png[:1000])
    assert answer.startswith(b"HTTP/1.1 408 ") and 0.9 <= seconds < 5, answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"error": "the request body did not arrive within 1 s"}


def test_connections_beyond_the_limit_get_503_with_retry_after(bottle_model_file, start_server):
    running = start_server(bottle_model_file, "--max-connections", "3")
    held = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(3)]
    try:
        time.sleep(0.3)
        answer, _ = raw_exchange(running.port, b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"\r\nretry-after: 1" in head
        assert json.loads(body) == {"error": "the server has 3 connections open, its limit; retry shortly"}
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{running.url}/v2/health/ready").status_code == 200


# ---------------------------------------------------------------------------------------------
# The memory budget


def test_an_image_that_could_never_fit_gets_413_before_it_is_decoded(bottle_model_file, start_server):
    running = start_server(bottle_model_file, "--max-memory-mb", "64", "--max-image-pixels", "100000000")
    bomb = flat_png(8000, 8000)  # 64 MP of one gray: about 60 KB, 448 MB as RGB and more to score
    before = peak_rss_bytes(running.process.pid)
    reply = post_image(running.url, bomb)
    assert reply.status_code == 413
    assert reply.json()["error"] == (
        "request needs 759 MB of memory to decode, score and answer, more than one request may hold (48 MB, --max-request-memory-mb); "
        "send fewer or smaller images per request"
    )
    # refused from the header: decoding it would have taken hundreds of megabytes
    assert peak_rss_bytes(running.process.pid) - before < 100 * 2**20


def test_a_busy_budget_answers_503_with_retry_after_and_then_serves(bottle_model_file, start_server, good_png):
    running = start_server(bottle_model_file, "--max-memory-mb", "100", "--read-timeout", "4")
    # A client that announces a 30 MB body and sends it slowly holds 60 MB of the budget (the
    # body and the copies parsing makes): a large request, reserved before its body is read.
    holder = threading.Thread(target=raw_exchange, args=(running.port, f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 30000000\r\n\r\n".encode() + b"x" * 1000))
    holder.start()
    time.sleep(0.5)
    try:
        reply = post_image(running.url, good_png)  # 38 MB for a 900 x 900 image: large too, and 60 + 38 > 75
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "1"
        assert reply.json() == {"error": "the server is busy with other requests (its memory budget is in use); retry shortly"}
        assert httpx.get(f"{running.url}/v2/health/ready").status_code == 200  # readiness answers throughout
    finally:
        holder.join()  # the slow body's 408 gives its reservation back
    assert post_image(running.url, good_png).status_code == 200
    metrics = httpx.get(f"{running.url}/metrics").text
    assert 'patchcore_admission_refusals_total{reason="busy"} 1.0' in metrics
    assert "patchcore_memory_reserved_bytes 0.0" in metrics


# ---------------------------------------------------------------------------------------------
# TLS


def test_tls_with_a_certificate_and_key(bottle_model_file, start_server, tmp_path, good_png):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    running = start_server(bottle_model_file, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), wait=False)
    url = f"https://127.0.0.1:{running.port}"
    trusted = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", verify=trusted, timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and running.process.poll() is None, running.log.read_text()
        time.sleep(0.2)
    reply = httpx.post(f"{url}{PREDICT}", files=[("file", ("part.png", good_png, "image/png"))], verify=trusted, timeout=60)
    assert reply.status_code == 200 and reply.json()["results"][0]["is_anomalous"] is False
    assert f"at https://127.0.0.1:{running.port}/" in running.log.read_text()
    with pytest.raises(httpx.TransportError):  # plain HTTP is not answered on a TLS port
        httpx.get(f"http://127.0.0.1:{running.port}/v2/health/ready", timeout=5).raise_for_status()


def test_a_request_refused_for_its_content_is_answered_after_the_delay(bottle_model_file, start_server, good_png):
    """A client sending what can never be scored is slowed to one request a delay, so that
    repeating it back to back cannot keep the server busy; a scored image is never held."""
    running = start_server(bottle_model_file, "--refusal-delay", "1.5")
    started = time.monotonic()
    refused = post_image(running.url, b"not an image")
    assert refused.status_code == 415 and time.monotonic() - started >= 1.5
    started = time.monotonic()
    mixed = httpx.post(f"{running.url}{PREDICT}", files=[("file", ("a.png", good_png, "image/png")), ("file", ("b.png", b"text", "image/png"))], timeout=60)
    assert mixed.status_code == 200 and time.monotonic() - started < 1.5  # something scored: not held
    immediate = start_server(bottle_model_file, "--refusal-delay", "0")
    started = time.monotonic()
    assert post_image(immediate.url, b"not an image").status_code == 415 and time.monotonic() - started < 1.0
