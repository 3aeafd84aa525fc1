"""The HTTP/1.1 wire, over real sockets against a real server on port 0.

Every rule of issue 2's "Wire" bullet: framing (Content-Length, chunked),
HTTP/1.0 and 1.1, keep-alive, pipelining in order, Expect: 100-continue, HEAD,
strict parsing (each framing error as raw bytes -> 400 and close), every limit at
the limit and one past it, the timeouts, request smuggling, many clients, and
clients that misbehave or vanish. The parser is also fed whole and byte by byte.
"""
import asyncio
import http.client
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import localai

BRIGHTNESS = "/api/services/screen/brightness"


@pytest.fixture
def start_server(start_server):
    """The shared factory, minus the first-start model import (these servers need no model)."""
    def start(*args, env=None):
        return start_server(*args, env=dict({"LOCALAI_NO_AUTO_IMPORT": "1"}, **(env or {})))
    return start


# ---------------------------------------------------------------------------
# helpers: a raw socket client that parses responses itself
# ---------------------------------------------------------------------------
class Raw:
    """A raw TCP client. read_response() parses one response strictly."""

    def __init__(self, server, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)
        return self

    def _more(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n:
            self._more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_response(self, head_only=False):
        """(status, headers dict lower-case -> list of values, body bytes)."""
        status_line = self._line()
        version, status, _ = status_line.decode("latin-1").split(" ", 2)
        assert version == "HTTP/1.1"
        headers = {}
        while True:
            line = self._line()
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        status = int(status)
        if head_only or status in (100, 204, 304):
            return status, headers, b""
        if headers.get("transfer-encoding") == ["chunked"]:
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    assert self._line() == b""
                    return status, headers, body
                body += self._exact(size)
                assert self._exact(2) == b"\r\n"
        if "content-length" in headers:
            return status, headers, self._exact(int(headers["content-length"][0]))
        while True:                       # HTTP/1.0 style: body until close
            try:
                self._more()
            except EOFError:
                body, self.buf = self.buf, b""
                return status, headers, body

    def closed_by_server(self, timeout=5):
        """True when the server closes the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def request(server, method, path, body=None, headers=None, version="HTTP/1.1"):
    """One request on a fresh raw connection: (status, headers, body)."""
    hdrs = {"Host": "127.0.0.1:%d" % server.port}
    hdrs.update(headers or {})
    if body is not None:
        hdrs.setdefault("Content-Length", str(len(body)))
    head = "%s %s %s\r\n" % (method, path, version) + "".join("%s: %s\r\n" % kv for kv in hdrs.items())
    c = Raw(server)
    try:
        c.send(head.encode("latin-1") + b"\r\n" + (body or b""))
        return c.read_response(head_only=(method == "HEAD"))
    finally:
        c.close()


def get_level(server):
    status, _, body = request(server, "GET", BRIGHTNESS)
    assert status == 200
    return json.loads(body)["brightness"]


def set_level(server, value):
    body = json.dumps({"brightness": value}).encode()
    status, _, resp = request(server, "POST", BRIGHTNESS, body, {"Content-Type": "application/json"})
    assert status == 200, resp
    return json.loads(resp)["appliedBrightness"]


def host(server):
    return b"Host: 127.0.0.1:%d\r\n" % server.port


def expect_400_close(server, raw_bytes, status=400):
    """Send raw bytes; expect exactly one error response with the status, then close."""
    c = Raw(server)
    try:
        c.send(raw_bytes)
        got, headers, body = c.read_response()
        assert got == status, (got, body)
        assert headers.get("connection") == ["close"]
        assert "error" in json.loads(body)
        assert c.closed_by_server()
        assert b"HTTP/1.1" not in c.buf           # nothing after the error response
    finally:
        c.close()


# ---------------------------------------------------------------------------
# basics: keep-alive, HTTP/1.0, HEAD, 404, 405
# ---------------------------------------------------------------------------
def test_keep_alive_reuses_one_connection(module_server):
    conn = http.client.HTTPConnection("127.0.0.1", module_server.port, timeout=10)
    conn.request("GET", "/status")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "Running"
    sock = conn.sock
    for _ in range(5):
        conn.request("GET", "/api/version")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "application/json"
        assert json.loads(r.read())["version"] == localai.VERSION
        assert conn.sock is sock                  # the same TCP connection every time
    conn.close()


def test_connection_close_is_honoured(module_server):
    c = Raw(module_server)
    c.send(b"GET /status HTTP/1.1\r\n" + host(module_server) + b"Connection: close\r\n\r\n")
    status, headers, body = c.read_response()
    assert status == 200 and headers["connection"] == ["close"]
    assert c.closed_by_server()


@pytest.mark.parametrize("value,version,stays", [
    ("keep-alive, close", "1.1", False), ("Close", "1.1", False), ("TE, close", "1.1", False),
    ("keep-alive", "1.1", True), ("upgrade", "1.1", True),
    ("Keep-Alive", "1.0", True), ("keep-alive, close", "1.0", False), ("te", "1.0", False),
])
def test_connection_header_is_a_token_list(module_server, value, version, stays):
    c = Raw(module_server)
    c.send(b"GET /status HTTP/%s\r\n%sConnection: %s\r\n\r\n" % (version.encode(), host(module_server),
                                                                   value.encode()))
    status, headers, _ = c.read_response()
    assert status == 200
    assert c.closed_by_server(timeout=1) is not stays
    c.close()


def test_http10_closes_and_http10_keep_alive_stays(module_server):
    c = Raw(module_server)
    c.send(b"GET /status HTTP/1.0\r\n\r\n")      # no Host needed in 1.0
    status, headers, body = c.read_response()
    assert status == 200 and json.loads(body)["status"] == "Running"
    assert c.closed_by_server()
    c = Raw(module_server)
    for _ in range(2):
        c.send(b"GET /api/version HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = c.read_response()
        assert status == 200 and headers["connection"] == ["keep-alive"]
        assert json.loads(body)["version"] == localai.VERSION
    c.close()


def test_head_has_get_headers_and_no_body(module_server):
    for path in ("/", "/api/version", "/status"):
        s1, h1, b1 = request(module_server, "GET", path)
        c = Raw(module_server)
        c.send(b"HEAD %s HTTP/1.1\r\n%s\r\n" % (path.encode(), host(module_server)))
        s2, h2, _ = c.read_response(head_only=True)
        assert s1 == s2 == 200
        assert h2["content-length"] == h1["content-length"] == [str(len(b1))]
        assert h2["content-type"] == h1["content-type"]
        # no body: the next response on the connection starts right away
        c.send(b"GET /api/version HTTP/1.1\r\n%s\r\n" % host(module_server))
        s3, _, b3 = c.read_response()
        assert s3 == 200 and json.loads(b3)["version"] == localai.VERSION
        c.close()


def test_unknown_path_is_404_in_each_shape(module_server):
    status, _, body = request(module_server, "GET", "/no/such/thing")
    assert status == 404 and isinstance(json.loads(body)["error"], str)
    status, _, body = request(module_server, "GET", "/v1/no-such-thing")
    err = json.loads(body)["error"]
    assert status == 404 and err["type"] == "not_found_error" and "message" in err


def test_wrong_method_is_405_with_allow(module_server):
    status, headers, body = request(module_server, "DELETE", BRIGHTNESS)
    assert status == 405
    allow = {m.strip() for m in headers["allow"][0].split(",")}
    assert {"GET", "HEAD", "POST", "OPTIONS"} <= allow and "DELETE" not in allow
    status, headers, body = request(module_server, "POST", "/status", b"{}")
    assert status == 405 and "GET" in headers["allow"][0] and "POST" not in headers["allow"][0]
    status, headers, body = request(module_server, "PUT", "/v1/models", b"{}")
    assert status == 405 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_response_before_body_is_read_closes(module_server):
    # 405 is decided before the body is read: the unread body must not be parsed
    # as the next request, so the server closes.
    c = Raw(module_server)
    smuggled = b"GET /api/version HTTP/1.1\r\n" + host(module_server) + b"\r\n"
    c.send(b"POST /status HTTP/1.1\r\n" + host(module_server)
           + b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    status, headers, _ = c.read_response()
    assert status == 405 and headers["connection"] == ["close"]
    assert c.closed_by_server() and b"HTTP/1.1" not in c.buf
    c.close()


def test_leading_empty_lines_are_ignored(module_server):
    c = Raw(module_server)
    c.send(b"\r\n\r\nGET /api/version HTTP/1.1\r\n" + host(module_server) + b"\r\n")
    status, _, body = c.read_response()
    assert status == 200 and json.loads(body)["version"] == localai.VERSION
    c.close()


# ---------------------------------------------------------------------------
# bodies: Content-Length, chunked, pipelining
# ---------------------------------------------------------------------------
def test_chunked_body_with_extensions_and_trailers(module_server):
    c = Raw(module_server)
    payload = b'{"brightness": 0.41}'
    c.send(b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + host(module_server)
           + b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
           + b"5;name=value\r\n" + payload[:5] + b"\r\n"
           + b"%X\r\n" % (len(payload) - 5) + payload[5:] + b"\r\n"
           + b"0\r\nX-Trailer: yes\r\n\r\n")
    status, headers, body = c.read_response()
    assert status == 200 and json.loads(body) == {"requestedBrightness": 0.41, "appliedBrightness": 0.41}
    assert "connection" not in headers            # still keep-alive after a chunked body
    c.send(b"GET " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + host(module_server) + b"\r\n")
    status, _, body = c.read_response()
    assert status == 200 and json.loads(body)["brightness"] == 0.41
    c.close()


def test_pipelined_requests_answer_in_order(module_server):
    c = Raw(module_server)
    h = host(module_server)
    p1 = b'{"brightness": 0.21}'
    p2 = b'{"brightness": 0.22}'
    c.send(b"GET /status HTTP/1.1\r\n" + h + b"\r\n"
           + b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + h + b"Content-Length: %d\r\n\r\n" % len(p1) + p1
           + b"GET " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + h + b"\r\n"
           + b"HEAD / HTTP/1.1\r\n" + h + b"\r\n"
           + b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + h + b"Transfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n" % len(p2) + p2 + b"\r\n0\r\n\r\n"
           + b"GET /nope HTTP/1.1\r\n" + h + b"\r\n"
           + b"GET /api/version HTTP/1.1\r\n" + h + b"\r\n")
    s, _, b = c.read_response()
    assert s == 200 and json.loads(b)["status"] == "Running"
    s, _, b = c.read_response()
    assert s == 200 and json.loads(b)["appliedBrightness"] == 0.21
    s, _, b = c.read_response()
    assert s == 200 and json.loads(b) == {"brightness": 0.21}
    s, h_, b = c.read_response(head_only=True)
    assert s == 200 and h_["content-type"][0].startswith("text/plain")
    s, _, b = c.read_response()
    assert s == 200 and json.loads(b)["appliedBrightness"] == 0.22
    s, _, b = c.read_response()
    assert s == 404
    s, _, b = c.read_response()
    assert s == 200 and json.loads(b)["version"] == localai.VERSION
    c.close()


# ---------------------------------------------------------------------------
# Expect: 100-continue
# ---------------------------------------------------------------------------
def test_expect_100_continue_sent_only_when_body_will_be_read(module_server):
    payload = b'{"brightness": 0.33}'
    c = Raw(module_server)
    c.send(b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + host(module_server)
           + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(payload))
    status, _, _ = c.read_response()
    assert status == 100                          # only now does the client send
    c.send(payload)
    status, _, body = c.read_response()
    assert status == 200 and json.loads(body)["appliedBrightness"] == 0.33
    c.close()


@pytest.mark.parametrize("head,status", [
    (b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\nContent-Length: 65537\r\n", 413),   # over the limit
    (b"POST /nowhere HTTP/1.1\r\nContent-Length: 10\r\n", 404),
    (b"POST /status HTTP/1.1\r\nContent-Length: 10\r\n", 405),
])
def test_expect_100_continue_refused_without_100(module_server, head, status):
    c = Raw(module_server)
    c.send(head + host(module_server) + b"Expect: 100-continue\r\n\r\n")
    got, headers, _ = c.read_response()
    assert got == status                          # the first thing sent is the final answer
    assert headers["connection"] == ["close"]
    assert c.closed_by_server() and b"100 Continue" not in c.buf
    c.close()


def test_unknown_expectation_is_417(module_server):
    c = Raw(module_server)
    c.send(b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + host(module_server)
           + b"Expect: something-else\r\nContent-Length: 2\r\n\r\n")
    status, _, _ = c.read_response()
    assert status == 417
    c.close()


# ---------------------------------------------------------------------------
# limits, each at the limit and one past it
# ---------------------------------------------------------------------------
def request_line_of(n):
    prefix, suffix = b"GET /", b" HTTP/1.1"
    return prefix + b"a" * (n - len(prefix) - len(suffix)) + suffix


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_request_line_limit(module_server, byte_by_byte):
    for size, status in ((localai.MAX_REQUEST_LINE, 404), (localai.MAX_REQUEST_LINE + 1, 414)):
        line = request_line_of(size)
        assert len(line) == size
        data = line + b"\r\n" + host(module_server) + b"\r\n"
        c = Raw(module_server)
        if byte_by_byte:
            # only the end of the line goes byte by byte (8 KiB of single sends is slow)
            c.send(data[:size - 50])
            for i in range(size - 50, len(data)):
                try:
                    c.send(data[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    break                         # the server answered 414 and closed
        else:
            c.send(data)
        got, _, _ = c.read_response()
        assert got == status, size
        c.close()


def header_block_of(server, n):
    """Header fields whose block (from the first field to the last value) is n bytes."""
    first = host(server)[:-2]
    pad = n - len(first) - 2 - len(b"X-Pad: ")
    return first + b"\r\nX-Pad: " + b"p" * pad


def test_header_block_limit(module_server):
    for size, status in ((localai.MAX_HEADER_BYTES, 200), (localai.MAX_HEADER_BYTES + 1, 431)):
        block = header_block_of(module_server, size)
        assert len(block) == size
        c = Raw(module_server)
        c.send(b"GET /status HTTP/1.1\r\n" + block + b"\r\n\r\n")
        got, _, _ = c.read_response()
        assert got == status, size
        c.close()


def test_header_block_limit_without_terminator_is_431_early(module_server):
    # a client that never ends its head is cut off once it is past the limit
    c = Raw(module_server)
    c.send(b"GET /status HTTP/1.1\r\n" + header_block_of(module_server, localai.MAX_HEADER_BYTES + 100))
    got, _, _ = c.read_response()
    assert got == 431
    c.close()


def test_header_count_limit(module_server):
    for count, status in ((localai.MAX_HEADER_COUNT, 200), (localai.MAX_HEADER_COUNT + 1, 431)):
        fields = host(module_server) + b"".join(b"X-F%d: v\r\n" % i for i in range(count - 1))
        c = Raw(module_server)
        c.send(b"GET /status HTTP/1.1\r\n" + fields + b"\r\n")
        got, _, _ = c.read_response()
        assert got == status, count
        c.close()


def padded_json(value, size):
    body = json.dumps({"brightness": value}).encode()
    return body + b" " * (size - len(body))


def test_body_limit_content_length(module_server):
    limit = localai.BODY_SMALL
    body = padded_json(0.44, limit)
    status, _, resp = request(module_server, "POST", BRIGHTNESS, body)
    assert status == 200 and json.loads(resp)["appliedBrightness"] == 0.44
    # one past the limit: 413 from the head alone; not a byte of the body is sent
    c = Raw(module_server)
    c.send(b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + host(module_server)
           + b"Content-Length: %d\r\n\r\n" % (limit + 1))
    got, headers, resp = c.read_response()
    assert got == 413 and headers["connection"] == ["close"]
    assert c.closed_by_server()
    c.close()
    assert get_level(module_server) == 0.44


def test_early_413_survives_a_client_that_sends_the_body_anyway(module_server):
    # No Expect: the client sends head and body at once. The server answers 413
    # without reading the body, then closes gently, so the answer is not lost
    # to a TCP reset caused by the unread bytes.
    for _ in range(3):
        c = Raw(module_server)
        body = b" " * (3 * localai.BODY_SMALL)
        c.send(b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + host(module_server)
               + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status, headers, _ = c.read_response()
        assert status == 413 and headers["connection"] == ["close"]
        assert c.closed_by_server()
        c.close()


def test_body_limit_chunked(module_server):
    limit = localai.BODY_SMALL
    for size, status in ((limit, 200), (limit + 1, 413)):
        body = padded_json(0.45 if status == 200 else 0.99, size)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                          for i in range(0, len(body), 1000))
        c = Raw(module_server)
        c.send(b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + host(module_server)
               + b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            c.send(chunks + b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        got, _, _ = c.read_response()
        assert got == status, size
        c.close()
    assert get_level(module_server) == 0.45


def chunked_with(size_line, trailer=b""):
    payload = b'{"brightness": 0.46}'
    assert size_line.startswith(b"%x" % len(payload))
    return (b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\n" + payload + b"\r\n0\r\n"
            + trailer + b"\r\n")


def test_chunk_size_line_limit(module_server):
    for size, status in ((localai.MAX_CHUNK_LINE, 200), (localai.MAX_CHUNK_LINE + 1, 400)):
        line = b"14;x=" + b"e" * (size - 5)
        assert len(line) == size
        for step in (None, 1):
            data = chunked_with(line)
            c = Raw(module_server)
            if step:
                head_end = data.index(b"\r\n\r\n") + 4
                c.send(data[:head_end])
                for i in range(head_end, len(data)):
                    try:
                        c.send(data[i:i + 1])
                    except (BrokenPipeError, ConnectionResetError):
                        break
            else:
                c.send(data)
            assert c.read_response()[0] == status, (size, step)
            c.close()


def test_trailer_limit(module_server):
    limit = localai.MAX_TRAILER_BYTES
    for size, status in ((limit, 200), (limit + 1, 400)):
        trailer = b"X-T: " + b"t" * (size - 5) + b"\r\n"
        c = Raw(module_server)
        c.send(chunked_with(b"14", trailer))
        assert c.read_response()[0] == status, size
        c.close()


def test_get_route_refuses_a_body(module_server):
    status, _, _ = request(module_server, "GET", "/status", b"x")
    assert status == 413
    status, _, _ = request(module_server, "GET", "/status", b"")   # Content-Length: 0 is fine
    assert status == 200


# ---------------------------------------------------------------------------
# framing errors as raw bytes: 400 and close
# ---------------------------------------------------------------------------
POST = b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n"
FRAMING_ERRORS = {
    "cl_and_te": (POST, b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "te_and_cl": (POST, b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    "duplicate_cl": (POST, b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}"),
    "cl_list": (POST, b"Content-Length: 2, 2\r\n\r\n{}"),
    "cl_not_a_number": (POST, b"Content-Length: abc\r\n\r\n"),
    "cl_negative": (POST, b"Content-Length: -1\r\n\r\n"),
    "cl_plus": (POST, b"Content-Length: +2\r\n\r\n{}"),
    "cl_hex": (POST, b"Content-Length: 0x2\r\n\r\n{}"),
    "cl_unicode_digit": (POST, b"Content-Length: \xb2\r\n\r\n{}"),
    "cl_huge": (POST, b"Content-Length: 9999999999999999999999\r\n\r\n"),
    "te_gzip": (POST, b"Transfer-Encoding: gzip\r\n\r\n"),
    "te_gzip_chunked": (POST, b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    "te_identity": (POST, b"Transfer-Encoding: identity\r\n\r\n"),
    "te_twice": (POST, b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "chunk_size_bad": (POST, b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"),
    "chunk_size_empty": (POST, b"Transfer-Encoding: chunked\r\n\r\n\r\n"),
    "chunk_size_negative": (POST, b"Transfer-Encoding: chunked\r\n\r\n-1\r\n"),
    "chunk_size_huge": (POST, b"Transfer-Encoding: chunked\r\n\r\n1000000000000000000\r\n"),
    "chunk_missing_crlf": (POST, b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n"),
    "chunk_bare_lf": (POST, b"Transfer-Encoding: chunked\r\n\r\n2\n{}\r\n0\r\n\r\n"),
    "obs_fold": (b"GET /status HTTP/1.1\r\n", b"X-A: b\r\n c\r\n\r\n"),
    "bare_cr_in_value": (b"GET /status HTTP/1.1\r\n", b"X-A: b\rc\r\n\r\n"),
    "bare_cr_line_end": (b"GET /status HTTP/1.1\r\n", b"X-A: b\r\r\n\r\n"),
    "nul_in_value": (b"GET /status HTTP/1.1\r\n", b"X-A: b\x00c\r\n\r\n"),
    "space_before_colon": (b"GET /status HTTP/1.1\r\n", b"X-A : b\r\n\r\n"),
    "no_colon": (b"GET /status HTTP/1.1\r\n", b"X-A b\r\n\r\n"),
    "duplicate_host": (b"GET /status HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n\r\n"),
}


@pytest.mark.parametrize("name", sorted(FRAMING_ERRORS))
def test_framing_error_is_400_and_close(module_server, name):
    line, rest = FRAMING_ERRORS[name]
    expect_400_close(module_server, line + host(module_server) + rest)


@pytest.mark.parametrize("data,status", [
    (b"GET /status HTTP/1.1\r\n\r\n", 400),                       # no Host on 1.1
    (b"GET  /status HTTP/1.1\r\nHost: a\r\n\r\n", 400),           # two spaces
    (b"GET /status\r\nHost: a\r\n\r\n", 400),                     # HTTP/0.9 style
    (b"G(T /status HTTP/1.1\r\nHost: a\r\n\r\n", 400),            # method not a token
    (b"GET /st\xffatus HTTP/1.1\r\nHost: a\r\n\r\n", 400),        # non-ASCII target
    (b"GET http://a/status HTTP/1.1\r\nHost: a\r\n\r\n", 400),    # absolute-form
    (b"GET /status HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET /status HTTP/1.1x\r\nHost: a\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\nHost: a\n\n", 400),                  # bare LF: answered at once
    (b"POST /api/services/screen/brightness HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
])
def test_malformed_heads(module_server, data, status):
    expect_400_close(module_server, data, status)


def test_server_survives_every_framing_error(module_server):
    assert request(module_server, "GET", "/status")[0] == 200


# ---------------------------------------------------------------------------
# the parser, fed whole and byte by byte (unit level: parse_head + Connection)
# ---------------------------------------------------------------------------
def parse_stream(data, step):
    """Run Connection.read_head/read_body over `data` fed `step` bytes at a time."""
    async def run():
        reader = asyncio.StreamReader()

        async def feed():
            for i in range(0, len(data), step):
                reader.feed_data(data[i:i + step])
                await asyncio.sleep(0)
            reader.feed_eof()
        feeder = asyncio.ensure_future(feed())
        conn = localai.Connection(reader, None)
        out = []
        try:
            while True:
                head = await conn.read_head()
                if head is None:
                    break
                req = localai.parse_head(head)
                framing, length = localai.body_framing(req)
                body = await conn.read_body(framing, length, 1 << 20)
                out.append((req.method, req.path, req.query, req.version, req.header_list, body))
        except localai.HTTPError as exc:
            out.append(("error", exc.status))
        finally:
            feeder.cancel()
        return out
    return asyncio.run(run())


PIPELINE = (b"POST /x?a=1&b=&a=2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nX-Sp:  v  v \t\r\n\r\nhello"
            b"\r\nGET /y HTTP/1.0\r\n\r\n"
            b"PUT /z HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: t\r\n\r\n")


def test_parser_whole_and_byte_by_byte_agree():
    whole = parse_stream(PIPELINE, len(PIPELINE))
    assert whole == [
        ("POST", "/x", {"a": ["1", "2"], "b": [""]}, "HTTP/1.1",
         [("host", "h"), ("content-length", "5"), ("x-sp", "v  v")], b"hello"),
        ("GET", "/y", {}, "HTTP/1.0", [], b""),
        ("PUT", "/z", {}, "HTTP/1.1", [("host", "h"), ("transfer-encoding", "chunked")],
         b"abc0123456789abcdef"),
    ]
    for step in (1, 2, 3, 7):
        assert parse_stream(PIPELINE, step) == whole, step


@pytest.mark.parametrize("name", sorted(FRAMING_ERRORS))
def test_parser_errors_whole_and_byte_by_byte(name):
    line, rest = FRAMING_ERRORS[name]
    data = line + b"Host: h\r\n" + rest
    whole = parse_stream(data, len(data))
    assert whole[-1] == ("error", 400)
    assert parse_stream(data, 1) == whole


def test_parser_limits_byte_by_byte():
    line = request_line_of(localai.MAX_REQUEST_LINE)
    assert parse_stream(line + b"\r\nHost: h\r\n\r\n", 1)[0][1] == "/" + "a" * (len(line) - 14)
    line = request_line_of(localai.MAX_REQUEST_LINE + 1)
    assert parse_stream(line + b"\r\nHost: h\r\n\r\n", 1) == [("error", 414)]
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(localai.MAX_HEADER_COUNT - 1))
    assert len(parse_stream(b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n", 1)[0][4]) == 100
    assert parse_stream(b"GET / HTTP/1.1\r\nHost: h\r\nX: y\r\n" + fields + b"\r\n", 1) == [("error", 431)]


def test_socket_request_one_byte_at_a_time(module_server):
    payload = b'{"brightness": 0.57}'
    data = (b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + host(module_server)
            + b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
            + b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"
            + b"GET " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + host(module_server) + b"\r\n")
    c = Raw(module_server)
    for i in range(len(data)):
        c.send(data[i:i + 1])
        time.sleep(0.001)
    status, _, body = c.read_response()
    assert status == 200 and json.loads(body)["appliedBrightness"] == 0.57
    status, _, body = c.read_response()
    assert status == 200 and json.loads(body)["brightness"] == 0.57
    c.close()


# ---------------------------------------------------------------------------
# request smuggling
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["CL.TE", "TE.CL"])
def test_smuggling_gets_one_400_and_nothing_runs(module_server, order):
    set_level(module_server, 0.77)
    h = host(module_server)
    hidden_body = b'{"brightness": 0.13}'
    hidden = (b"POST " + BRIGHTNESS.encode() + b" HTTP/1.1\r\n" + h
              + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(hidden_body) + hidden_body)
    body = b"0\r\n\r\n" + hidden
    cl, te = b"Content-Length: %d\r\n" % len(body), b"Transfer-Encoding: chunked\r\n"
    framing = cl + te if order == "CL.TE" else te + cl
    c = Raw(module_server)
    c.send(POST + h + framing + b"\r\n" + body)
    status, headers, _ = c.read_response()
    assert status == 400 and headers["connection"] == ["close"]
    assert c.closed_by_server()
    assert b"HTTP/1.1" not in c.buf                  # exactly one response
    c.close()
    time.sleep(0.2)
    assert get_level(module_server) == 0.77          # the hidden POST never ran


# ---------------------------------------------------------------------------
# many clients, slow clients, vanishing clients, timeouts
# ---------------------------------------------------------------------------
def test_fifty_concurrent_keep_alive_clients(module_server):
    n, rounds = 50, 10
    barrier = threading.Barrier(n)

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", module_server.port, timeout=30)
        conn.request("GET", "/status")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "Running"
        sock = conn.sock
        barrier.wait(30)                            # all 50 connections open at once
        for k in range(rounds):
            path = "/api/version" if (i + k) % 2 else "/status"
            conn.request("GET", path, headers={"X-Client": str(i)})
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 200
            assert body == ({"version": localai.VERSION} if path == "/api/version"
                            else {"status": "Running", "message": "Server is currently running."})
        assert conn.sock is sock
        conn.close()
        return i
    with ThreadPoolExecutor(n) as pool:
        assert sorted(pool.map(client, range(n))) == list(range(n))


def proc_counts(server):
    pid = server.proc.pid
    return len(os.listdir("/proc/%d/fd" % pid)), len(os.listdir("/proc/%d/task" % pid))


def wait_counts(server, want_fds, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fds, threads = proc_counts(server)
        if fds <= want_fds:
            return fds, threads
        time.sleep(0.1)
    return proc_counts(server)


def test_client_vanishing_mid_body_leaves_nothing(module_server):
    set_level(module_server, 0.61)                  # warm up the bridge thread
    get_level(module_server)
    fds0, threads0 = wait_counts(module_server, 10 ** 6, 0)
    fds0, threads0 = wait_counts(module_server, fds0)
    for i in range(20):
        c = Raw(module_server)
        if i % 3 == 0:
            c.send(POST + host(module_server) + b"Content-Length: 1000\r\n\r\n" + b'{"brightness": 0.1' + b" " * 50)
        elif i % 3 == 1:
            c.send(POST + host(module_server) + b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + b'{"brightn')
        else:
            c.send(POST + host(module_server) + b"Expect: 100-continue\r\nContent-Length: 30\r\n\r\n")
            assert c.read_response()[0] == 100
            c.send(b'{"brightness": 0.2')
        if i % 2:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()                                   # FIN, or RST for odd i
    fds, threads = wait_counts(module_server, fds0)
    assert fds <= fds0, (fds, fds0)
    assert threads <= threads0, (threads, threads0)
    assert get_level(module_server) == 0.61         # no partial body was applied
    assert request(module_server, "GET", "/status")[0] == 200


TIMEOUT_ENV = {"LOCALAI_HEADER_TIMEOUT": "1.5", "LOCALAI_BODY_IDLE_TIMEOUT": "1.5",
               "LOCALAI_KEEPALIVE_TIMEOUT": "1.5", "LOCALAI_SEND_STALL_TIMEOUT": "1.5"}


def test_slowloris_is_closed_within_header_timeout_while_others_are_served(start_server):
    server = start_server(env=TIMEOUT_ENV)
    slow = Raw(server)
    started = time.monotonic()
    slow.send(b"GET /status HTTP/1.1\r\n")
    served, closed_at = 0, None
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    slow.sock.settimeout(0.01)
    while time.monotonic() - started < 6:
        try:                                        # one byte of header every 0.2 s
            slow.send(b"X")
        except (BrokenPipeError, ConnectionResetError):
            closed_at = time.monotonic() - started
            break
        try:
            if slow.sock.recv(100) == b"":
                closed_at = time.monotonic() - started
                break
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed_at = time.monotonic() - started
            break
        conn.request("GET", "/status")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "Running"
        served += 1
        time.sleep(0.2)
    assert closed_at is not None, "slowloris connection was never closed"
    assert 1.3 <= closed_at <= 1.5 + 1.0, closed_at
    assert served >= 4                              # others were served meanwhile
    slow.close()
    conn.close()


def test_keep_alive_idle_timeout(start_server):
    server = start_server(env=TIMEOUT_ENV)
    c = Raw(server)
    c.send(b"GET /status HTTP/1.1\r\n" + host(server) + b"\r\n")
    assert c.read_response()[0] == 200
    started = time.monotonic()
    assert c.closed_by_server(timeout=5)
    assert 1.3 <= time.monotonic() - started <= 3.0
    c.close()


def test_body_idle_timeout(start_server):
    server = start_server(env=TIMEOUT_ENV)
    c = Raw(server)
    c.send(POST + host(server) + b"Content-Length: 20\r\n\r\n{\"bri")
    started = time.monotonic()
    assert c.closed_by_server(timeout=5)
    assert 1.3 <= time.monotonic() - started <= 3.0
    c.close()
    assert request(server, "GET", "/status")[0] == 200


def test_send_stall_timeout_drops_a_client_that_never_reads(start_server):
    server = start_server(env=TIMEOUT_ENV)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    one = b"GET /api/version HTTP/1.1\r\n" + host(server) + b"\r\n"
    # a send blocked longer than the server's 1.5 s stall timeout: the server stopped
    # reading us (a busy server that still reads, only slowly, takes bytes sooner)
    sock.settimeout(3)
    sent = 0
    started = time.monotonic()
    try:                                            # pipeline requests, read nothing
        while time.monotonic() - started < 30:
            sent += sock.send(one * 100)
    except socket.timeout:
        pass                                        # the server stopped reading us
    except (BrokenPipeError, ConnectionResetError):
        pass
    time.sleep(2.5)                                 # past the 1.5 s send-stall timeout
    sock.settimeout(5)
    received = b""
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += data
    except ConnectionResetError:
        pass
    sock.close()
    answered = received.count(b"HTTP/1.1 200 OK")
    assert answered < sent // len(one)              # dropped before answering everything
    assert request(server, "GET", "/status")[0] == 200


# ---------------------------------------------------------------------------
# streams and cancellation, through the real connection loop in this process
# (test routes are added to this process's route table only, never the product's)
# ---------------------------------------------------------------------------
class InProcess:
    """localai's connection loop on a real socket, in a thread of this process."""

    def __init__(self):
        config = localai.build_parser().parse_args(["--no-mdns"])
        self.app = localai.App(config)
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(
            lambda r, w: localai.serve_connection(self.app, r, w), "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def inproc(monkeypatch):
    events = {"closed": threading.Event(), "cancelled": threading.Event()}

    async def ticks(n, error=None, delay=0.0):
        try:
            for i in range(n):
                yield {"i": i}
                if delay:
                    await asyncio.sleep(delay)
            if error is not None:
                raise error
        finally:
            events["closed"].set()

    async def h_sse(req):
        return localai.sse_response(ticks(3))

    async def h_ndjson(req):
        return localai.ndjson_response(ticks(2, error=engines_module().BadInput("went wrong")))

    async def h_sse_late_error(req):
        return localai.sse_response(ticks(1, error=engines_module().BadInput("went wrong")))

    async def h_sse_early_error(req):
        return localai.sse_response(ticks(0, error=engines_module().NotFound("model 'x' not found")))

    async def h_endless(req):
        return localai.sse_response(ticks(10 ** 6, delay=0.02))

    def blocking_wait(cancel=None):
        if cancel.wait(20):
            events["cancelled"].set()
        return "finished"

    async def h_slow_plain(req):
        return localai.json_response({"r": await localai.run_blocking(blocking_wait)})

    async def flood():
        try:
            while True:
                events["produced"] = events.get("produced", 0) + 1
                yield {"pad": "x" * 1000}
        finally:
            events["closed"].set()

    async def h_flood(req):
        return localai.sse_response(flood())

    async def h_crash(req):
        raise RuntimeError("secret detail /home/user/.ssh")

    async def h_none(req):
        return None

    for path, h in {"/t/flood": h_flood, "/t/crash": h_crash, "/v1/t/none": h_none, "/t/sse": h_sse, "/t/ndjson": h_ndjson, "/v1/t/late": h_sse_late_error,
                    "/v1/t/early": h_sse_early_error, "/t/endless": h_endless, "/t/slow": h_slow_plain}.items():
        monkeypatch.setitem(localai.ROUTES, path, localai.Route({"GET": h}))
    server = InProcess()
    server.events = events
    yield server
    server.close()


def engines_module():
    import engines
    return engines


def test_sse_stream_is_chunked_and_keep_alive_survives(inproc):
    c = Raw(inproc)
    for _ in range(2):                       # twice on one connection: the stream ends cleanly
        c.send(b"GET /t/sse HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, headers, body = c.read_response()
        assert status == 200 and headers["transfer-encoding"] == ["chunked"]
        assert headers["content-type"] == ["text/event-stream"]
        assert body == b'data: {"i":0}\n\ndata: {"i":1}\n\ndata: {"i":2}\n\ndata: [DONE]\n\n'
    c.send(b"HEAD /t/sse HTTP/1.1\r\nHost: localhost\r\n\r\nGET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
    status, headers, _ = c.read_response(head_only=True)
    assert status == 200 and headers["content-type"] == ["text/event-stream"]
    status, _, body = c.read_response()       # no stray chunk after the HEAD response
    assert status == 200 and json.loads(body)["version"] == localai.VERSION
    c.close()


def test_ndjson_error_after_start_is_in_band(inproc):
    c = Raw(inproc)
    c.send(b"GET /t/ndjson HTTP/1.1\r\nHost: localhost\r\n\r\n")
    status, headers, body = c.read_response()
    assert status == 200 and headers["content-type"] == ["application/x-ndjson"]
    assert [json.loads(line) for line in body.splitlines()] == [{"i": 0}, {"i": 1}, {"error": "went wrong"}]
    c.send(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert c.read_response()[0] == 200
    c.close()


def test_sse_errors_before_and_after_the_first_event(inproc):
    status, _, body = request(inproc, "GET", "/v1/t/early")
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    status, _, body = request(inproc, "GET", "/v1/t/late")
    assert status == 200
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[0] == 'data: {"i":0}'
    assert json.loads(events[1][6:])["error"]["message"] == "went wrong"


def test_client_leaving_a_stream_closes_the_generator(inproc):
    c = Raw(inproc)
    c.send(b"GET /t/endless HTTP/1.1\r\nHost: localhost\r\n\r\n")
    while c.buf.count(b"data: ") < 3:
        c._more()
    assert not inproc.events["closed"].is_set()
    c.close()
    assert inproc.events["closed"].wait(5)      # the engine side was told at once


def test_client_leaving_cancels_a_blocking_call(inproc):
    c = Raw(inproc)
    c.send(b"GET /t/slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
    time.sleep(0.3)
    assert not inproc.events["cancelled"].is_set()
    c.close()
    assert inproc.events["cancelled"].wait(5)   # cancel= was set for the engine call
    assert request(inproc, "GET", "/api/version")[0] == 200


def test_unexpected_exception_is_500_logged_not_shown(inproc, caplog):
    with caplog.at_level(logging.ERROR, logger="localai"):
        c = Raw(inproc)
        c.send(b"GET /t/crash HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, headers, first = c.read_response()
        assert status == 500 and json.loads(first) == {"error": "internal server error"}
        assert b"secret" not in first and b"Traceback" not in first
        c.send(b"GET /v1/t/none HTTP/1.1\r\nHost: localhost\r\n\r\n")   # still keep-alive
        status, headers, body = c.read_response()
        assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
        c.close()
    assert b"secret" not in body and b"Traceback" not in body
    assert "Traceback" in caplog.text and "secret detail" in caplog.text and "h_none" in caplog.text


def test_stream_backpressure_pauses_the_producer(inproc):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", inproc.port))
    sock.sendall(b"GET /t/flood HTTP/1.1\r\nHost: localhost\r\n\r\n")
    time.sleep(1.0)                                  # read nothing: buffers fill, drain waits
    first = inproc.events.get("produced", 0)
    time.sleep(1.0)
    assert first > 10 and inproc.events["produced"] == first   # paused, not buffering forever
    assert not inproc.events["closed"].is_set()
    got = 0
    sock.settimeout(5)
    # reading lets it go on: what the kernel buffered (its send buffer grows to a few
    # MB) drains first, then the producer must move
    while inproc.events["produced"] == first and got < 64_000_000:
        got += len(sock.recv(1 << 16))
    assert inproc.events["produced"] > first, got
    sock.close()
    assert inproc.events["closed"].wait(5)


def test_iterate_blocking_bounds_what_waits_for_a_slow_consumer():
    """A blocking producer (an engine) runs at most STREAM_BUFFER_ITEMS ahead of a
    consumer that stopped reading, and stops when the consumer closes."""
    produced = []
    finished = threading.Event()

    def engine(cancel=None):
        try:
            for i in range(100_000):
                if cancel.is_set():
                    return
                produced.append(i)
                yield b"x" * 1024
        finally:
            finished.set()

    async def scenario():
        it = localai.iterate_blocking(engine)
        first = await it.__anext__()
        await asyncio.sleep(0.5)                 # the client reads nothing for a while
        ahead = len(produced)
        await it.aclose()                        # the client leaves
        return first, ahead

    first, ahead = asyncio.run(scenario())
    assert first == b"x" * 1024
    assert ahead <= localai.STREAM_BUFFER_ITEMS + 2, ahead
    assert finished.wait(5), "the producer did not stop after the consumer closed"
    assert len(produced) <= localai.STREAM_BUFFER_ITEMS + 2
