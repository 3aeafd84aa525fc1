"""System endpoints, brightness, security defaults, errors, access log, CLI and
environment, and graceful shutdown: against real servers over real sockets."""
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import engines
import localai
from conftest import ROOT
from test_http import BRIGHTNESS, Raw, get_level, request, set_level


@pytest.fixture
def start_server(start_server):
    """The shared factory, minus the first-start model import (these servers need no model)."""
    def start(*args, env=None):
        return start_server(*args, env=dict({"LOCALAI_NO_AUTO_IMPORT": "1"}, **(env or {})))
    return start


def get_json(server, path, headers=None):
    status, hdrs, body = request(server, "GET", path, headers=headers)
    return status, hdrs, json.loads(body) if body else None


def post_json(server, path, raw, headers=None):
    if not isinstance(raw, bytes):
        raw = json.dumps(raw).encode()
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    status, hdrs, body = request(server, "POST", path, raw, h)
    return status, hdrs, json.loads(body) if body else None


# ---------------------------------------------------------------------------
# system endpoints
# ---------------------------------------------------------------------------
def test_head_root_is_200_without_body(module_server):
    status, headers, body = request(module_server, "HEAD", "/")
    assert status == 200 and body == b""
    status, headers, body = request(module_server, "GET", "/")
    assert status == 200 and headers["content-type"][0].startswith("text/plain") and b"localai" in body


def test_status_shape(module_server):
    status, _, body = get_json(module_server, "/status")
    assert status == 200
    assert body == {"status": "Running", "message": "Server is currently running."}


def test_version_is_numeric_and_head_works(module_server):
    status, headers, body = get_json(module_server, "/api/version")
    assert status == 200 and re.fullmatch(r"\d+\.\d+\.\d+", body["version"])
    assert body["version"] == localai.VERSION
    status, hheaders, hbody = request(module_server, "HEAD", "/api/version")
    assert status == 200 and hbody == b"" and hheaders["content-length"] == headers["content-length"]


# ---------------------------------------------------------------------------
# brightness
# ---------------------------------------------------------------------------
def test_brightness_set_get_and_clamp(module_server):
    status, _, body = post_json(module_server, BRIGHTNESS, {"brightness": 0.8})
    assert status == 200 and body == {"requestedBrightness": 0.8, "appliedBrightness": 0.8}
    assert get_level(module_server) == 0.8
    status, _, body = post_json(module_server, BRIGHTNESS, {"brightness": 1.7})
    assert body == {"requestedBrightness": 1.7, "appliedBrightness": 1.0}
    status, _, body = post_json(module_server, BRIGHTNESS, {"brightness": -3})
    assert body == {"requestedBrightness": -3, "appliedBrightness": 0.0}
    assert get_level(module_server) == 0.0
    status, _, body = post_json(module_server, BRIGHTNESS, {"brightness": 1})
    assert status == 200 and body["appliedBrightness"] == 1.0


@pytest.mark.parametrize("raw", [
    b'{"brightness": NaN}', b'{"brightness": Infinity}', b'{"brightness": -Infinity}',
    b'{"brightness": 1e999}', b'{"brightness": -1e999}', b'{"brightness": true}',
    b'{"brightness": false}', b'{"brightness": "0.5"}', b'{"brightness": null}',
    b'{"brightness": [0.5]}', b'{"brightness": {"v": 1}}', b'{}', b'{"level": 0.5}',
    b'[0.5]', b'0.5', b'', b'{"brightness": 0.5', b'\xff\xfe',
    b'{"brightness": 1' + b'0' * 400 + b'}',           # an integer too big for a float
    b'[' * 30000 + b']' * 30000,                          # nesting deeper than the parser
], ids=lambda raw: repr(raw[:24]))
def test_brightness_rejects_non_finite_and_non_numbers(module_server, raw):
    set_level(module_server, 0.35)
    status, _, body = post_json(module_server, BRIGHTNESS, raw)
    assert status == 400 and isinstance(body["error"], str)
    assert get_level(module_server) == 0.35


def make_backlight(root, name, maximum, level):
    dev = root / name
    dev.mkdir(parents=True)
    (dev / "max_brightness").write_text("%d\n" % maximum)
    (dev / "brightness").write_text("%d\n" % level)
    return dev


def test_brightness_drives_a_sysfs_backlight(start_server, tmp_path):
    root = tmp_path / "backlight"
    make_backlight(root, "acpi_video0", 0, 0)            # max 0: not a usable device
    dev = make_backlight(root, "intel_backlight", 1000, 500)
    server = start_server("--backlight-root", str(root))
    assert get_level(server) == 0.5
    assert set_level(server, 0.25) == 0.25
    assert (dev / "brightness").read_text().strip() == "250"
    (dev / "brightness").write_text("900\n")            # changed outside (a hotkey)
    assert get_level(server) == 0.9
    assert set_level(server, 7) == 1.0
    assert (dev / "brightness").read_text().strip() == "1000"
    assert (root / "acpi_video0" / "brightness").read_text().strip() == "0"


def test_a_failing_backlight_is_503_not_a_crash(start_server, tmp_path):
    root = tmp_path / "backlight"
    dev = root / "broken"
    (dev / "brightness").mkdir(parents=True)              # writing it fails (EISDIR)
    (dev / "max_brightness").write_text("100\n")
    server = start_server("--backlight-root", str(root))
    status, _, body = post_json(server, BRIGHTNESS, {"brightness": 0.5})
    assert status == 503 and "cannot set the screen brightness" in body["error"]
    assert str(tmp_path) not in body["error"]
    assert get_json(server, "/status")[0] == 200


def test_software_brightness_survives_restart(start_server, tmp_path):
    env = {"LOCALAI_STATE_DIR": str(tmp_path / "state"), "LOCALAI_BACKLIGHT_ROOT": str(tmp_path / "none")}
    server = start_server(env=env)
    assert set_level(server, 0.3) == 0.3
    assert server.stop() == 0
    server = start_server(env=env)
    assert get_level(server) == 0.3


# ---------------------------------------------------------------------------
# security: API key, Host check, Origin and CORS
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key_server(server_env, tmp_path_factory):
    from conftest import Server
    env = dict(server_env)
    env["LOCALAI_MODELS_DIR"] = str(tmp_path_factory.mktemp("empty-models"))
    env["LOCALAI_NO_AUTO_IMPORT"] = "1"
    server = Server(["--no-mdns", "--api-key", "s3cret-key"], env, str(tmp_path_factory.mktemp("cwd")))
    yield server
    server.stop()


def test_api_key_required_in_each_error_shape(key_server):
    status, headers, body = get_json(key_server, "/v1/models")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "www-authenticate" in headers
    status, _, body = get_json(key_server, BRIGHTNESS)
    assert status == 401 and isinstance(body["error"], str)
    status, _, body = get_json(key_server, "/api/version")
    assert status == 401
    status, _, body = get_json(key_server, "/v1/models", {"Authorization": "Bearer wrong"})
    assert status == 401
    status, _, body = get_json(key_server, "/v1/models", {"X-Api-Key": "s3cret-ke"})
    assert status == 401


def test_api_key_accepted_as_bearer_or_x_api_key(key_server):
    status, _, body = get_json(key_server, "/v1/models", {"Authorization": "Bearer s3cret-key"})
    assert status == 200 and body["object"] == "list"
    status, _, body = get_json(key_server, "/v1/models", {"Authorization": "bearer s3cret-key"})
    assert status == 200
    status, _, body = get_json(key_server, BRIGHTNESS, {"X-Api-Key": "s3cret-key"})
    assert status == 200 and 0 <= body["brightness"] <= 1


def test_no_100_continue_without_the_key(key_server):
    c = Raw(key_server)
    c.send(b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
           b"Expect: 100-continue\r\nContent-Length: 20\r\n\r\n")
    status, headers, body = c.read_response()
    assert status == 401 and headers["connection"] == ["close"] and b"100 Continue" not in c.buf
    c.close()
    c = Raw(key_server)
    c.send(b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\nHost: localhost\r\nX-Api-Key: s3cret-key\r\n"
           b"Expect: 100-continue\r\nContent-Length: 20\r\n\r\n")
    assert c.read_response()[0] == 100
    c.send(b'{"brightness": 0.5} ')
    assert c.read_response()[0] == 200
    c.close()


def test_public_routes_need_no_key(key_server):
    assert request(key_server, "HEAD", "/")[0] == 200
    status, _, body = get_json(key_server, "/status")
    assert status == 200 and body["status"] == "Running"


def test_openai_client_with_api_key(key_server):
    import openai
    ok = openai.OpenAI(base_url=key_server.url + "/v1", api_key="s3cret-key", max_retries=0)
    assert ok.models.list().object == "list"
    bad = openai.OpenAI(base_url=key_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("host,status", [
    ("evil.example", 403), ("evil.example:11434", 403), ("127.0.0.1.evil.example", 403),
    ("localhost.evil.example", 403),
    ("127.0.0.1", 200), ("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("LOCALHOST", 200),
    ("[::1]:{port}", 200), ("192.168.1.20:{port}", 200), ("app.localhost", 200),
    ("{hostname}", 200), ("{hostname}.local:{port}", 200),
])
def test_host_header_guards_against_dns_rebinding(module_server, host, status):
    value = host.format(port=module_server.port, hostname=socket.gethostname())
    c = Raw(module_server)
    c.send(b"GET /status HTTP/1.1\r\nHost: " + value.encode() + b"\r\n\r\n")
    got, _, body = c.read_response()
    c.close()
    assert got == status, value
    if status == 403:
        assert json.loads(body) == {"error": "host not allowed"}


def test_extra_allowed_hosts(start_server):
    server = start_server("--allowed-hosts", "ai.home.arpa")
    c = Raw(server)
    c.send(b"GET /status HTTP/1.1\r\nHost: ai.home.arpa:%d\r\n\r\n" % server.port)
    assert c.read_response()[0] == 200
    c.close()


def cors(headers):
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


def test_foreign_origin_is_403_without_cors(module_server):
    for origin in ("http://evil.example", "null", "http://localhost.evil.example", "https://127.0.0.1.nip.io"):
        status, headers, body = get_json(module_server, "/status", {"Origin": origin})
        assert status == 403 and body == {"error": "origin not allowed"}, origin
        assert cors(headers) == {}


def test_local_origin_gets_cors_headers(module_server):
    for origin in ("http://localhost", "http://localhost:3000", "http://127.0.0.1:8080", "https://[::1]:5173"):
        status, headers, body = get_json(module_server, "/status", {"Origin": origin})
        assert status == 200, origin
        assert headers["access-control-allow-origin"] == [origin]
        assert "Origin" in headers["vary"][0]


def test_preflight(module_server):
    status, headers, _ = request(module_server, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204
    assert headers["access-control-allow-origin"] == ["http://localhost:3000"]   # exactly one
    assert "POST" in headers["access-control-allow-methods"][0]
    assert headers["access-control-allow-headers"] == ["authorization, content-type"]
    assert int(headers["access-control-max-age"][0]) > 0
    status, headers, _ = request(module_server, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 403 and cors(headers) == {}


def test_preflight_needs_no_key_but_the_request_does(key_server):
    status, headers, _ = request(key_server, "OPTIONS", "/v1/models", headers={
        "Origin": "http://localhost:8080", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert status == 204 and headers["access-control-allow-origin"] == ["http://localhost:8080"]
    status, headers, _ = request(key_server, "GET", "/v1/models", headers={"Origin": "http://localhost:8080"})
    assert status == 401 and headers["access-control-allow-origin"] == ["http://localhost:8080"]


def test_allowed_origins_flag_and_env(start_server):
    server = start_server(env={"LOCALAI_ALLOWED_ORIGINS": "https://app.example"})
    assert get_json(server, "/status", {"Origin": "https://app.example"})[0] == 200
    assert get_json(server, "/status", {"Origin": "http://localhost"})[0] == 403
    server = start_server("--allowed-origins", "*")
    status, headers, _ = get_json(server, "/status", {"Origin": "http://anything.example"})
    assert status == 200 and headers["access-control-allow-origin"] == ["http://anything.example"]


# ---------------------------------------------------------------------------
# the one error mapper
# ---------------------------------------------------------------------------
def fake_request(path):
    return localai.parse_head(b"POST %s HTTP/1.1\r\nHost: h" % path.encode())


def raised(exc):
    try:
        raise exc
    except Exception as caught:
        return caught


def test_unexpected_exception_is_500_without_details(caplog):
    exc = raised(RuntimeError("secret detail /home/user/.ssh/id_rsa"))
    with caplog.at_level(logging.ERROR, logger="localai"):
        resp = localai.error_response(exc, fake_request("/api/chat"))
        v1 = localai.error_response(exc, fake_request("/v1/chat/completions"))
    assert resp.status == 500 and json.loads(resp.body) == {"error": "internal server error"}
    err = json.loads(v1.body)["error"]
    assert v1.status == 500 and err["type"] == "server_error" and err["message"] == "internal server error"
    for body in (resp.body, v1.body):
        assert b"secret" not in body and b"Traceback" not in body and b".ssh" not in body
    logged = caplog.text
    assert "Traceback" in logged and "secret detail" in logged and "RuntimeError" in logged


def test_engine_errors_map_to_statuses():
    req = fake_request("/v1/audio/speech")
    resp = localai.error_response(engines.Busy("queue full", retry_after=7), req)
    assert resp.status == 503 and ("Retry-After", "7") in resp.headers
    resp = localai.error_response(engines.NotFound("model 'x' not found", param="model"), req)
    err = json.loads(resp.body)["error"]
    assert resp.status == 404 and err["type"] == "not_found_error" and err["param"] == "model"
    resp = localai.error_response(engines.BadInput("bad voice"), fake_request("/api/chat"))
    assert resp.status == 400 and json.loads(resp.body) == {"error": "bad voice"}
    resp = localai.error_response(engines.TooLarge("too big"), req)
    assert resp.status == 413
    resp = localai.error_response(engines.EngineError("base class"), req)
    assert resp.status == 500


def test_http_error_405_carries_allow():
    resp = localai.error_response(localai.HTTPError(405, "no"), fake_request("/status"))
    assert resp.status == 405 and dict(resp.headers)["Allow"].split(", ") == ["GET", "HEAD", "OPTIONS"]


# ---------------------------------------------------------------------------
# access log
# ---------------------------------------------------------------------------
def test_access_log_line_per_request_without_bodies(start_server):
    server = start_server()
    marker = "0.123456789"
    post_json(server, BRIGHTNESS, b'{"brightness": %s, "note": "SECRET-BODY"}' % marker.encode())
    request(server, "GET", "/status?token=SECRET-QUERY")
    request(server, "GET", "/missing")
    time.sleep(0.3)
    out = server.output()
    assert re.search(r'127\.0\.0\.1 "POST /api/services/screen/brightness HTTP/1\.1" 200 \d+ [\d.]+ms', out)
    assert re.search(r'"GET /status HTTP/1\.1" 200 61 [\d.]+ms', out)
    assert re.search(r'"GET /missing HTTP/1\.1" 404 \d+ [\d.]+ms', out)
    assert "SECRET" not in out and marker not in out


def test_log_level_warning_silences_the_access_log(start_server):
    server = start_server(env={"LOCALAI_LOG_LEVEL": "warning"})
    assert request(server, "GET", "/status")[0] == 200
    time.sleep(0.3)
    assert '"GET /status' not in server.output()


# ---------------------------------------------------------------------------
# CLI, environment, banner
# ---------------------------------------------------------------------------
def test_help_is_instant_and_documents_env():
    out = subprocess.run([sys.executable, str(ROOT / "localai.py"), "--help"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0
    for name in ("HOST", "PORT", "NO_MDNS", "MODELS_DIR", "MODEL", "API_KEY", "ALLOWED_ORIGINS", "LOG_LEVEL",
                 "ALLOWED_HOSTS", "STATE_DIR", "BACKLIGHT_ROOT"):
        assert "LOCALAI_" + name in out.stdout
    flat = " ".join(out.stdout.split())
    assert "LOCALAI_HEADER_TIMEOUT (10)" in flat and "LOCALAI_DRAIN_TIMEOUT (10)" in flat
    # "instant": importing the server pulls in no engine library
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.argv=['x','--help'];\n"
                            "import localai\n"
                            "heavy = {'mlx', 'mlx_lm', 'mlx_vlm', 'vosk', 'zeroconf', 'numpy', 'pyttsx3',\n"
                            "         'transformers', 'tokenizers', 'aiohttp', 'ifaddr'}\n"
                            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"],
                           capture_output=True, text=True, cwd=str(ROOT), timeout=30)
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr


def test_defaults_and_env_variables(monkeypatch):
    for name in list(os.environ):
        if name.startswith("LOCALAI_"):
            monkeypatch.delenv(name)
    config = localai.build_parser().parse_args([])
    assert (config.host, config.port, config.no_mdns, config.api_key) == ("0.0.0.0", 11434, False, None)
    env = {"LOCALAI_HOST": "127.0.0.2", "LOCALAI_PORT": "8089", "LOCALAI_NO_MDNS": "1",
           "LOCALAI_MODELS_DIR": "/m", "LOCALAI_MODEL": "smollm2", "LOCALAI_API_KEY": "k",
           "LOCALAI_ALLOWED_ORIGINS": "https://a.example", "LOCALAI_LOG_LEVEL": "debug",
           "LOCALAI_ALLOWED_HOSTS": "h.example", "LOCALAI_STATE_DIR": "/s", "LOCALAI_BACKLIGHT_ROOT": "/b"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    c = localai.build_parser().parse_args([])
    assert (c.host, c.port, c.no_mdns, c.models_dir, c.model, c.api_key, c.allowed_origins, c.log_level,
            c.allowed_hosts, c.state_dir, c.backlight_root) == (
        "127.0.0.2", 8089, True, "/m", "smollm2", "k", "https://a.example", "debug", "h.example", "/s", "/b")
    c = localai.build_parser().parse_args(["--port", "9000", "--api-key", "other"])
    assert (c.port, c.api_key) == (9000, "other")                 # flags beat the environment


@pytest.mark.parametrize("name,value,says", [("LOCALAI_PORT", "abc", "--port"),
                                              ("LOCALAI_LOG_LEVEL", "verbose", "LOCALAI_LOG_LEVEL")])
def test_bad_environment_is_a_usage_error(name, value, says):
    out = subprocess.run([sys.executable, str(ROOT / "localai.py"), "--no-mdns"], capture_output=True,
                         text=True, timeout=30, env=dict(os.environ, **{name: value}))
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr


def test_api_key_from_environment(start_server):
    server = start_server(env={"LOCALAI_API_KEY": "from-env"})
    assert get_json(server, "/api/version")[0] == 401
    assert get_json(server, "/api/version", {"X-Api-Key": "from-env"})[0] == 200


def test_banner_shows_lan_urls(start_server):
    server = start_server("--host", "0.0.0.0")
    assert wait_for(lambda: "on this machine" in server.output())
    out = server.output()
    assert "http://127.0.0.1:%d" % server.port in out
    for addr in localai.lan_addresses():
        assert "http://%s:%d" % (addr, server.port) in out
        assert "http://%s:%d/v1" % (addr, server.port) in out


def test_port_in_use_is_a_clear_error(module_server):
    out = subprocess.run([sys.executable, str(ROOT / "localai.py"), "--host", "127.0.0.1", "--port",
                          str(module_server.port), "--no-mdns"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, LOCALAI_MODELS_DIR="/nonexistent-models-dir-for-test"))
    assert out.returncode == 1 and "cannot listen" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------
# shutdown
# ---------------------------------------------------------------------------
def wait_for(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def refused(server):
    try:
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        return False
    except OSError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_in_flight_upload_finish_then_exits_0(start_server, sig):
    server = start_server()
    idle = Raw(server)                                     # an idle keep-alive connection
    idle.send(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert idle.read_response()[0] == 200
    up = Raw(server)
    payload = b'{"brightness": 0.66}'
    up.send(b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + payload[:5] + b"\r\n")
    time.sleep(0.3)
    server.proc.send_signal(sig)
    assert wait_for(lambda: "shutting down" in server.output())
    assert wait_for(lambda: refused(server), 5)           # stops accepting at once
    assert idle.closed_by_server(timeout=5)                # idle connections are let go
    time.sleep(0.5)                                       # the upload is slow, but in flight
    assert server.proc.poll() is None
    rest = payload[5:]
    up.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
    status, headers, body = up.read_response()
    assert status == 200 and json.loads(body)["appliedBrightness"] == 0.66
    assert headers["connection"] == ["close"]
    assert server.proc.wait(10) == 0


def test_drain_timeout_bounds_shutdown(start_server):
    server = start_server(env={"LOCALAI_DRAIN_TIMEOUT": "1"})
    up = Raw(server)
    up.send(b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: 100\r\n\r\n{")                # never finished
    time.sleep(0.3)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert time.monotonic() - started < 6
    assert up.closed_by_server(timeout=2)
