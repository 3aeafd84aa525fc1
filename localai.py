#!/usr/bin/env python3
"""localai: a local AI server for every device on your network.

One command starts an HTTP/1.1 server that speaks two dialects:

  * OpenAI (``/v1/...``): chat and text completions, models, speech-to-text,
    text-to-speech; any OpenAI SDK works with ``base_url=http://HOST:11434/v1``.
  * Ollama (``/api/...``): chat, generate, tags, show, ps, version; the ollama
    client and Open WebUI work with ``http://HOST:11434``.

Language and vision models run on MLX (mlx-lm, mlx-vlm), speech-to-text on vosk,
text-to-speech on pyttsx3/espeak-ng. The server announces itself on the LAN with
Bonjour (zeroconf).

Usage
    python localai.py                      serve on 0.0.0.0:11434
    python localai.py --port 8080 --api-key SECRET --no-mdns
    python localai.py import FILE.gguf [--name NAME]
    python localai.py pull mlx-community/REPO
    python localai.py pull-speech LANG
    python localai.py list
    python localai.py --help

    curl http://localhost:11434/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Routes: see ROUTES (section 12) and ../shared/API.md. System routes: HEAD|GET /,
GET /status, GET|HEAD /api/version, GET|POST /api/services/screen/brightness.

Security: binds 0.0.0.0 (the LAN can reach it, as the seed wants). Optional
``--api-key`` (Bearer or X-Api-Key; ``HEAD /`` and ``/status`` stay public). The
Host header must name this machine (DNS-rebinding guard); requests carrying an
``Origin`` outside ``--allowed-origins`` get 403 and no CORS headers. Image URLs
and file paths are off unless enabled. Bodies, prompts and audio are never logged.

Design: this file imports only the standard library at import time (so
``--help`` is instant and a missing engine package is a 503 on that engine's
routes, never a crash). Engines live in ``engines/``, know nothing of HTTP, and do
their blocking work off the event loop. Data flows one way:
socket -> read_request -> ROUTES -> handler -> write_response / stream -> socket.
Exactly one place, ``error_response``, turns exceptions into responses.

Sections
    1. Imports            2. Constants and limits     3. Errors
    4. HTTP/1.1 wire      5. Responses and streams    6. Multipart
    7. Validation         8. Model handlers           9. Image inputs
   10. Chat and completion handlers                   11. Audio handlers
   12. System handlers and the route table            13. Engine bridge
   14. Security checks   15. Connection loop          16. CLI and main
"""

# ============================================================================
# 1. IMPORTS (standard library only)
# ============================================================================
import argparse
import asyncio
import contextvars
import email.utils
import functools
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs

import engines  # the shared error vocabulary (stdlib only)

VERSION = "0.1.0"
log = logging.getLogger("localai")
access_log = logging.getLogger("localai.access")

# ============================================================================
# 2. CONSTANTS AND LIMITS (one place; each says why)
# ============================================================================
DEFAULT_PORT = 11434                 # Ollama's port: clients look there first
MAX_REQUEST_LINE = 8 * 1024          # 414 past this (nginx/h11 use 8 KiB)
MAX_HEADER_BYTES = 32 * 1024         # whole header block; 431 past this
MAX_HEADER_COUNT = 100               # header fields; 431 past this (h11, aiohttp: 100)
MAX_CHUNK_LINE = 1024                # chunk-size line incl. extensions
MAX_TRAILER_BYTES = 8 * 1024         # trailer block after the last chunk


def _seconds(name, default):
    """A timeout constant; LOCALAI_<NAME> may override it (tests use short ones)."""
    try:
        value = float(os.environ.get("LOCALAI_" + name, default))
    except ValueError:
        return default
    return value if 0 < value < 86400 else default


HEADER_TIMEOUT = _seconds("HEADER_TIMEOUT", 10.0)          # whole head must arrive in this (slowloris)
BODY_IDLE_TIMEOUT = _seconds("BODY_IDLE_TIMEOUT", 10.0)    # max silence while a body is arriving
KEEPALIVE_TIMEOUT = _seconds("KEEPALIVE_TIMEOUT", 5.0)     # idle keep-alive connections close after this
SEND_STALL_TIMEOUT = _seconds("SEND_STALL_TIMEOUT", 30.0)  # a client that reads nothing this long is dropped
DRAIN_TIMEOUT = _seconds("DRAIN_TIMEOUT", 10.0)            # on shutdown, in-flight requests get this long
TIMEOUT_TICK = 0.1                   # read timeouts are enforced to within this (see reap_timeouts)
LINGER_TIMEOUT = 2.0                 # after an early answer, swallow input this long before closing
LINGER_BYTES = 1024 * 1024           # ...or this much (Apache's lingering close, bounded)
READ_CHUNK = 64 * 1024               # socket read size
PIPELINE_BUFFER = 64 * 1024          # bytes read ahead while a handler runs
BRIDGE_THREADS = 64                  # threads waiting on engines (engines bound their own work)
STREAM_BUFFER_ITEMS = 64             # output of a thread-driven stream (TTS, vision) waiting for a slow client

KIB, MIB = 1024, 1024 * 1024
BODY_SMALL = 64 * KIB                # control routes (brightness, show)
BODY_CHAT = 20 * MIB                 # chat/generate: base64 images need room
BODY_SPEECH = 256 * KIB              # 4096 characters of input plus JSON
BODY_TRANSCRIPTION = 30 * MIB        # the seed's route limit for uploads

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
    417: "Expectation Failed", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
    503: "server_error",
}

# ============================================================================
# 3. ERRORS
# ============================================================================
class HTTPError(Exception):
    """An error with the HTTP status to send. Raise it anywhere in a handler."""

    def __init__(self, status, message, *, param=None, code=None, headers=(), close=False):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = list(headers)
        self.close = close  # the connection cannot be reused (framing is lost)


# Engine errors -> HTTP status (engines/__init__.py documents the vocabulary).
ENGINE_STATUS = [(engines.BadInput, 400), (engines.NotFound, 404),
                 (engines.TooLarge, 413), (engines.Busy, 503), (engines.Unavailable, 503)]


# ============================================================================
# 4. HTTP/1.1 WIRE
# ============================================================================
# Theory of operation. Each connection is one asyncio task running
# `serve_connection`. It owns a byte buffer fed from the StreamReader; requests
# are parsed from that buffer strictly one after another, so pipelined requests
# are answered in order. A head is read under HEADER_TIMEOUT (from its first
# byte; the wait for that byte is the keep-alive timeout), parsed strictly
# (RFC 9112: CRLF only, no obs-fold, no whitespace before the colon, one Host,
# one Content-Length, chunked as the only transfer coding, never both). The route
# is found before the body is read, so its body limit applies while reading
# (413 before a byte is buffered when Content-Length says too much). While a
# handler runs, a watcher keeps reading: EOF means the client left, which cancels
# a non-streaming handler and closes a stream (a handler that answers without
# waiting never gets a watcher: see run_handler). Read timeouts are deadlines that
# one task, reap_timeouts, enforces for every connection. After an answer sent
# without reading the body (413, 400...) the connection closes gently
# (lingering_close), so the client reads the answer instead of a TCP reset.
# Timeouts are named constants; LOCALAI_<NAME> overrides them (tests use short ones).

TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# The same grammar as compiled patterns: the parser is on every request's path,
# and one regex call per line is several times faster than a Python byte loop.
# The head is decoded as latin-1 once (one byte, one character), then matched as text.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
TOKEN_RE = re.compile(_TOKEN)
TARGET_BAD_RE = re.compile(r"[^\x21-\x7e]")           # controls, space, DEL, non-ASCII
FIELD_RE = re.compile("(" + _TOKEN + r"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)")  # RFC 9110 5.5
# Every field line of a header block at once: anchored at line starts, so a line
# that does not match (obs-fold, bad name, control character) is simply missing.
FIELD_LINES_RE = re.compile(r"^(" + _TOKEN + r"):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*\r?$", re.M)
DIGITS_RE = re.compile(r"[0-9]{1,15}")                   # Content-Length (ASCII digits only)
VERSION_RE = re.compile(r"HTTP/[0-9]\.[0-9]")             # RFC 9112 2.3


class Request:
    """One parsed request. `body` is filled in after the route is known."""

    def __init__(self, method, target, version, header_list):
        self.method, self.target, self.version = method, target, version
        self.header_list = header_list                       # [(lower name, value)]
        self.headers = {}
        for name, value in header_list:                      # repeated fields join (RFC 9110 5.3)
            self.headers[name] = self.headers[name] + ", " + value if name in self.headers else value
        path, _, query = target.partition("?")   # origin-form only: "//x" is a path, not a host
        self.path = path
        self.query = parse_qs(query, keep_blank_values=True) if query else {}
        self.body = b""
        self.app = None
        self.gone = None              # asyncio.Event: the client has disconnected
        self.path_param = None        # the tail of a prefix route (/v1/models/{id})
        self.client = ""

    @property
    def is_v1(self):
        return self.path.startswith("/v1/") or self.path == "/v1"

    def json_body(self):
        """The body as a JSON object, strictly: no NaN/Infinity, no overflow to inf."""
        if not self.body:
            raise HTTPError(400, "request body must be a JSON object")
        try:
            value = json.loads(self.body, parse_constant=_reject_constant, parse_float=_finite_float)
        except UnicodeDecodeError:
            raise HTTPError(400, "request body is not valid UTF-8")
        except ValueError as exc:
            raise HTTPError(400, "invalid JSON: %s" % exc)
        except RecursionError:
            raise HTTPError(400, "invalid JSON: nested too deeply")
        if not isinstance(value, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return value


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number %s is out of range" % text[:32])
    return value


def parse_head(head):
    """Parse a request head (bytes, without the final CRLFCRLF) into a Request.

    Raises HTTPError(400/414/431/505, close=True) on anything malformed."""
    crlf = head.count(b"\r\n")                     # = the number of header fields
    if head.count(b"\r") != crlf:
        raise HTTPError(400, "bare CR in request head", close=True)
    if head.count(b"\n") != crlf:
        raise HTTPError(400, "bare LF in request head", close=True)
    text = head.decode("latin-1")
    line_end = text.find("\r\n")
    request_line = text if line_end < 0 else text[:line_end]
    if len(request_line) > MAX_REQUEST_LINE:
        raise HTTPError(414, "request line too long", close=True)
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HTTPError(400, "malformed request line", close=True)
    method, target, version = parts
    if not TOKEN_RE.fullmatch(method):
        raise HTTPError(400, "malformed method", close=True)
    if version != "HTTP/1.1" and version != "HTTP/1.0":
        if VERSION_RE.fullmatch(version):                # well-formed, just not ours
            raise HTTPError(505, "HTTP version not supported", close=True)
        raise HTTPError(400, "malformed HTTP version", close=True)
    if TARGET_BAD_RE.search(target):
        raise HTTPError(400, "malformed request target", close=True)
    if not (target.startswith("/") or (method == "OPTIONS" and target == "*")):
        raise HTTPError(400, "request target must be an absolute path", close=True)
    if crlf > MAX_HEADER_COUNT:
        raise HTTPError(431, "too many header fields", close=True)
    if len(text) - len(request_line) - 2 > MAX_HEADER_BYTES:
        raise HTTPError(431, "request header block too large", close=True)
    header_list = []
    if crlf:
        block = text[line_end + 2:]
        fields = FIELD_LINES_RE.findall(block)
        if len(fields) != crlf:
            _field_error(block)
        header_list = [(name.lower(), value) for name, value in fields]
    req = Request(method, target, version, header_list)
    host = req.headers.get("host")               # repeated fields were joined by ", "
    if host is None:
        if version == "HTTP/1.1":
            raise HTTPError(400, "a Host header is required", close=True)
    elif ", " in host and sum(name == "host" for name, _ in header_list) > 1:
        raise HTTPError(400, "exactly one Host header is allowed", close=True)
    return req


def _field_error(block):
    """Say which rule a header block breaks (the slow path of parse_head)."""
    for line in block.split("\r\n"):
        if FIELD_LINES_RE.fullmatch(line):
            continue
        if line[:1] in (" ", "\t"):
            raise HTTPError(400, "obsolete line folding is not allowed", close=True)
        if FIELD_RE.match(line):
            raise HTTPError(400, "invalid character in header value", close=True)
        raise HTTPError(400, "malformed header field", close=True)
    raise HTTPError(400, "malformed header block", close=True)


def body_framing(req):
    """Return ("none", 0), ("length", n) or ("chunked", None); strict (RFC 9112 6).

    Repeated fields arrive joined by ", " in req.headers, so a duplicate
    Content-Length or a list of codings fails the checks below."""
    length = req.headers.get("content-length")
    coding = req.headers.get("transfer-encoding")
    if length is None and coding is None:
        return "none", 0
    if length is not None and coding is not None:
        raise HTTPError(400, "Content-Length with Transfer-Encoding is not allowed", close=True)
    if coding is not None:
        if req.version == "HTTP/1.0" or coding.lower() != "chunked":
            raise HTTPError(400, "only the chunked transfer coding is supported", close=True)
        return "chunked", None
    if not DIGITS_RE.fullmatch(length):
        raise HTTPError(400, "invalid Content-Length", close=True)
    return "length", int(length)


class Connection:
    """The read side of one connection: a buffer over a StreamReader."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.buf = bytearray()
        self.eof = False
        self.unread = False       # we answered without reading all input: close gently
        self.deadline = None      # monotonic time by which the pending read must complete
        self.timed_out = False
        self.task = None          # the task reading (set by serve_connection)

    async def _fill(self, timeout):
        # Reads are on every request's path, so they carry no timer of their own
        # (wait_for costs a task, asyncio.timeout a timer, per read): they set a
        # deadline that `reap_timeouts` enforces for all connections at once.
        self.deadline = time.monotonic() + timeout
        try:
            data = await self.reader.read(READ_CHUNK)
        except asyncio.CancelledError:
            if self.timed_out:
                asyncio.current_task().uncancel()
                raise asyncio.TimeoutError from None
            raise
        finally:
            self.deadline = None
        if not data:
            self.eof = True
        self.buf += data
        return bool(data)

    async def read_head(self):
        """The next request head, or None on a clean close between requests."""
        deadline = None
        while True:
            while self.buf[:2] == b"\r\n":         # RFC 9112 2.2: ignore empty lines before a request
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                return head
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                if len(self.buf) > MAX_REQUEST_LINE + 1:            # + a CR whose LF is coming
                    raise HTTPError(414, "request line too long", close=True)
            elif line_end > MAX_REQUEST_LINE:
                raise HTTPError(414, "request line too long", close=True)
            elif len(self.buf) - line_end - 2 > MAX_HEADER_BYTES + 3:  # + a partial CRLFCRLF
                raise HTTPError(431, "request header block too large", close=True)
            if self.buf.count(b"\n") != self.buf.count(b"\r\n"):  # would never end: say so now
                raise HTTPError(400, "bare LF in request head", close=True)
            if not self.buf:
                timeout = KEEPALIVE_TIMEOUT
            else:
                deadline = deadline or time.monotonic() + HEADER_TIMEOUT
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise asyncio.TimeoutError
            if self.eof or not await self._fill(timeout):
                if self.buf:
                    raise HTTPError(400, "connection closed mid-request", close=True)
                return None

    async def read_exact(self, n, limit_left=None):
        while len(self.buf) < n:
            if self.eof or not await self._fill(BODY_IDLE_TIMEOUT):
                raise ConnectionResetError("client closed mid-body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_line(self, limit):
        """A CRLF-terminated line of at most `limit` bytes (chunk sizes, trailers)."""
        while True:
            end = self.buf.find(b"\r\n")
            if end > limit or (end < 0 and len(self.buf) > limit + 1):   # + a CR whose LF is coming
                raise HTTPError(400, "chunk framing line too long", close=True)
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if self.eof or not await self._fill(BODY_IDLE_TIMEOUT):
                raise ConnectionResetError("client closed mid-body")

    async def read_body(self, framing, length, limit):
        if framing == "length":
            if length > limit:
                raise HTTPError(413, "request body too large (limit %d bytes)" % limit, close=True)
            return await self.read_exact(length)
        if framing == "none":
            return b""
        body = bytearray()                                     # chunked (RFC 9112 7.1)
        while True:
            line = await self.read_line(MAX_CHUNK_LINE)
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not size_text or len(size_text) > 15 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
                raise HTTPError(400, "invalid chunk size", close=True)
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > limit:
                raise HTTPError(413, "request body too large (limit %d bytes)" % limit, close=True)
            body += await self.read_exact(size)
            if await self.read_exact(2) != b"\r\n":
                raise HTTPError(400, "chunk data not followed by CRLF", close=True)
        trailer_bytes = 0
        while True:                                            # trailers: read and drop
            line = await self.read_line(MAX_TRAILER_BYTES)
            if not line:
                return bytes(body)
            trailer_bytes += len(line)
            if trailer_bytes > MAX_TRAILER_BYTES or b":" not in line:
                raise HTTPError(400, "invalid chunked trailer", close=True)


async def reap_timeouts(conns):
    """One timer for every connection: each TIMEOUT_TICK, a read past its deadline
    is cancelled (its _fill turns that into TimeoutError and the connection closes)."""
    while True:
        await asyncio.sleep(TIMEOUT_TICK)
        now = time.monotonic()
        for conn in list(conns):
            if conn.deadline is not None and now >= conn.deadline and not conn.timed_out and conn.task:
                conn.timed_out = True
                conn.task.cancel()


# ============================================================================
# 5. RESPONSES AND STREAMS
# ============================================================================
class Response:
    def __init__(self, status=200, body=b"", content_type="application/json", headers=()):
        self.status, self.body, self.content_type = status, body, content_type
        self.headers = list(headers)


class StreamResponse:
    """A body produced over time: written with chunked transfer coding.

    `chunks` is an async iterator of bytes; `on_error(exc) -> bytes` renders an
    error raised after the stream started (sent in-band, then the stream ends)."""

    def __init__(self, content_type, chunks, status=200, headers=(), on_error=None):
        self.status, self.content_type, self.chunks = status, content_type, chunks
        self.headers = list(headers)
        self.on_error = on_error
        self.first = None          # the first chunk, taken before the head is sent


_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # json.dumps with
# non-default options builds a new encoder per call; one shared encoder is the same output, faster


def json_bytes(obj):
    return _json_encoder.encode(obj).encode("utf-8")


def json_response(obj, status=200, headers=()):
    return Response(status, json_bytes(obj), "application/json", headers)


def text_response(text, status=200, content_type="text/plain; charset=utf-8", headers=()):
    return Response(status, text.encode("utf-8"), content_type, headers)


async def aclose_quietly(iterator):
    """Close an async iterator now (not at garbage collection), so engines stop."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


def sse_response(events):
    """Server-Sent Events as OpenAI sends them: data: {json} ... data: [DONE]."""
    async def chunks():
        try:
            async for event in events:
                yield b"data: " + json_bytes(event) + b"\n\n"
        finally:
            await aclose_quietly(events)
        yield b"data: [DONE]\n\n"
    return StreamResponse("text/event-stream", chunks(),
                          headers=[("Cache-Control", "no-cache")],
                          on_error=lambda exc: b"data: " + json_bytes(error_body(exc, True)) + b"\n\n")


def ndjson_response(objects):
    """Newline-delimited JSON, as Ollama streams."""
    async def chunks():
        try:
            async for obj in objects:
                yield json_bytes(obj) + b"\n"
        finally:
            await aclose_quietly(objects)
    return StreamResponse("application/x-ndjson", chunks(),
                          on_error=lambda exc: json_bytes(error_body(exc, False)) + b"\n")


_date_cache = [0, ""]


def http_date():
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date_cache[1]


_status_lines = {}


def head_bytes(status, headers):
    start = _status_lines.get(status)
    if start is None:
        start = _status_lines[status] = "HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Unknown"))
    return (start + "Date: " + http_date() + "\r\nServer: localai/" + VERSION + "\r\n"
            + "".join(["%s: %s\r\n" % kv for kv in headers]) + "\r\n").encode("latin-1")


async def drain(writer):
    """Wait until the client takes our bytes; a client that stalls is dropped."""
    transport = writer.transport
    if not transport.get_write_buffer_size() and not transport.is_closing():
        return                                  # all bytes went straight to the socket
    async with asyncio.timeout(SEND_STALL_TIMEOUT):
        await writer.drain()


# ============================================================================
# 6. MULTIPART
# ============================================================================
# A multipart/form-data parser (RFC 7578, RFC 2046 5.1) for uploads. The body is
# already in memory (the route limit bounds it), so parsing is a walk over it with
# bytes.find: each byte is looked at a bounded number of times (the delimiter is
# at most 74 bytes), so the work is linear in the body. Every limit is a named
# constant; every malformed input is an HTTPError 400 (413 for sizes), never an
# uncaught exception. The filename a client sends is returned as data only: the
# speech engine takes its extension and nothing else.
MULTIPART_MAX_BOUNDARY = 70          # RFC 2046 5.1.1: a boundary is 1 to 70 characters
MULTIPART_MAX_PARTS = 64             # a transcription form has ~8 fields (+ repeats); 400 past this
MULTIPART_MAX_PART_HEADERS = 16      # header lines per part (browsers send 2-3); 400 past this
MULTIPART_MAX_PART_HEADER_BYTES = 8 * KIB   # one part's header block; 400 past this
MULTIPART_MAX_FIELD_BYTES = 64 * KIB  # a non-file field (a prompt is ~224 tokens); 413 past this
MULTIPART_MAX_FILE_BYTES = 25 * MIB  # the seed's (and OpenAI's) 25 MB audio file limit; 413 past this
_BOUNDARY_CHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")


class UploadedFile:
    """A file part: `name` (the form field), `filename` (the client's, untrusted),
    `content_type` and `data` (bytes)."""

    def __init__(self, name, filename, content_type, data):
        self.name, self.filename, self.content_type, self.data = name, filename, content_type, data

    def __repr__(self):
        return "UploadedFile(%r, %r, %r, %d bytes)" % (self.name, self.filename, self.content_type, len(self.data))


def header_params(value):
    """Split 'type; a=1; b="x \\"y\\""' into ('type', {'a': '1', 'b': 'x "y"'}).

    Quoted strings honour backslash escapes; `name*=UTF-8''%xx` (RFC 5987/8187)
    is decoded and wins over the plain parameter. Malformed text -> ValueError."""
    main, _, rest = value.partition(";")
    params, ext, i, n = {}, {}, 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        if eq < 0:
            raise ValueError("parameter without a value")
        key = rest[i:eq].strip().lower()
        if not key or any(c in key for c in ' \t";'):
            raise ValueError("bad parameter name")
        i = eq + 1
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            out, i = [], i + 1
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(rest[i])
                i += 1
            if i >= n:
                raise ValueError("unterminated quoted string")
            i += 1
            val = "".join(out)
        else:
            end = rest.find(";", i)
            end = n if end < 0 else end
            val = rest[i:end].strip()
            i = end
        if key.endswith("*"):
            charset, _, encoded = val.partition("'")
            _lang, _, encoded = encoded.partition("'")
            from urllib.parse import unquote
            try:
                ext[key[:-1]] = unquote(encoded, encoding=charset or "utf-8", errors="strict")
            except (LookupError, UnicodeDecodeError):
                raise ValueError("bad extended parameter")
        else:
            params[key] = val
    params.update(ext)
    return main.strip().lower(), params


def multipart_boundary(content_type):
    """The boundary (bytes) of a multipart/form-data Content-Type, or HTTPError 400."""
    try:
        mime, params = header_params(content_type or "")
    except ValueError as exc:
        raise HTTPError(400, "malformed Content-Type: %s" % exc)
    if mime != "multipart/form-data":
        raise HTTPError(400, "Content-Type must be multipart/form-data")
    boundary = params.get("boundary", "").encode("latin-1", "replace")
    if not boundary:
        raise HTTPError(400, "multipart/form-data needs a boundary parameter")
    if len(boundary) > MULTIPART_MAX_BOUNDARY:
        raise HTTPError(400, "multipart boundary longer than %d characters" % MULTIPART_MAX_BOUNDARY)
    if not set(boundary) <= _BOUNDARY_CHARS or boundary.endswith(b" "):
        raise HTTPError(400, "multipart boundary has characters RFC 2046 does not allow")
    return boundary


def _part_headers(block):
    """A part's header lines -> dict (lower-case names). 400 on anything odd."""
    lines = block.split(b"\r\n") if block else []
    if len(lines) > MULTIPART_MAX_PART_HEADERS:
        raise HTTPError(400, "a multipart part has more than %d headers" % MULTIPART_MAX_PART_HEADERS)
    headers = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or not set(name) <= TOKEN_CHARS:
            raise HTTPError(400, "malformed multipart part header")
        try:
            text = value.decode("utf-8")      # browsers send UTF-8 filenames raw (HTML5)
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        key = name.decode("ascii").lower()
        if key in headers:
            raise HTTPError(400, "repeated multipart part header %s" % key)
        headers[key] = text.strip(" \t")
    return headers


def parse_multipart(body, content_type):
    """Parse a multipart/form-data body.

    Returns (fields, files): `fields` maps a name to its list of str values,
    `files` maps a name to its list of UploadedFile, both in body order (the
    handler decides what a repeat means). A part is a file when its
    Content-Disposition has a filename parameter."""
    boundary = multipart_boundary(content_type)
    delim, sep = b"--" + boundary, b"\r\n--" + boundary
    if body.startswith(delim):
        pos = len(delim)
    else:                                      # a preamble before the first delimiter
        i = body.find(sep)
        if i < 0:
            raise HTTPError(400, "multipart body does not contain its boundary")
        pos = i + len(sep)
    fields, files, count, n = {}, {}, 0, len(body)
    while True:
        if body.startswith(b"--", pos):        # the close delimiter; the epilogue is ignored
            return fields, files
        end = pos
        while end < n and end - pos <= 256 and body[end] in b" \t":   # transport padding
            end += 1
        if not body.startswith(b"\r\n", end):
            if end >= n:
                raise HTTPError(400, "multipart body ends without its closing boundary")
            raise HTTPError(400, "malformed multipart delimiter line")
        pos = end + 2
        count += 1
        if count > MULTIPART_MAX_PARTS:
            raise HTTPError(400, "more than %d multipart parts" % MULTIPART_MAX_PARTS)
        if body.startswith(b"\r\n", pos):      # a part with no headers
            block, start = b"", pos + 2
        else:
            end = body.find(b"\r\n\r\n", pos, pos + MULTIPART_MAX_PART_HEADER_BYTES + 4)
            if end < 0:
                if n - pos > MULTIPART_MAX_PART_HEADER_BYTES:
                    raise HTTPError(400, "multipart part headers larger than %d bytes"
                                    % MULTIPART_MAX_PART_HEADER_BYTES)
                raise HTTPError(400, "multipart body ends inside a part's headers")
            block, start = body[pos:end], end + 4
        headers = _part_headers(block)
        try:
            disposition, params = header_params(headers.get("content-disposition", ""))
        except ValueError as exc:
            raise HTTPError(400, "malformed Content-Disposition: %s" % exc)
        if disposition != "form-data" or not params.get("name"):
            raise HTTPError(400, "each multipart part needs Content-Disposition: form-data; name=...")
        end = body.find(sep, start)
        if end < 0:
            raise HTTPError(400, "multipart body ends without its closing boundary")
        size, name = end - start, params["name"]
        if "filename" in params:
            if size > MULTIPART_MAX_FILE_BYTES:
                raise HTTPError(413, "file '%s' is larger than %d MB" % (name[:64], MULTIPART_MAX_FILE_BYTES // MIB),
                                param=name[:64])
            files.setdefault(name, []).append(UploadedFile(
                name, params["filename"], headers.get("content-type", "application/octet-stream"), body[start:end]))
        else:
            if size > MULTIPART_MAX_FIELD_BYTES:
                raise HTTPError(413, "form field '%s' is larger than %d bytes" % (name[:64], MULTIPART_MAX_FIELD_BYTES),
                                param=name[:64])
            try:
                fields.setdefault(name, []).append(body[start:end].decode("utf-8"))
            except UnicodeDecodeError:
                raise HTTPError(400, "form field '%s' is not valid UTF-8" % name[:64], param=name[:64])
        pos = end + len(sep)


# ============================================================================
# 7. VALIDATION
# ============================================================================
# Small checks that handlers share. JSON gives Python types; note that True is an
# int in Python, so booleans are rejected explicitly wherever a number is wanted.

def is_number(value):
    """A finite JSON number (not a bool; not an integer too big for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:                       # e.g. a 400-digit integer literal
        return False


def get_number(obj, key, default=None, lo=None, hi=None, param=None):
    value = obj.get(key, default)
    if value is None or value is default:
        return value
    if not is_number(value):
        raise HTTPError(400, "'%s' must be a number" % key, param=param or key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise HTTPError(400, "'%s' must be between %s and %s" % (key, lo, hi), param=param or key)
    return value


def get_int(obj, key, default=None, lo=None, hi=None, param=None):
    value = obj.get(key, default)
    if value is None or value is default:
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HTTPError(400, "'%s' must be an integer" % key, param=param or key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise HTTPError(400, "'%s' must be between %s and %s" % (key, lo, hi), param=param or key)
    return value


def get_str(obj, key, default=None, required=False, param=None):
    value = obj.get(key, default)
    if value is None:
        if required:
            raise HTTPError(400, "'%s' is required" % key, param=param or key)
        return value
    if not isinstance(value, str):
        raise HTTPError(400, "'%s' must be a string" % key, param=param or key)
    if required and not value:
        raise HTTPError(400, "'%s' must not be empty" % key, param=param or key)
    return value


def get_bool(obj, key, default=None, param=None):
    value = obj.get(key, default)
    if value is None or value is default:
        return value
    if not isinstance(value, bool):
        raise HTTPError(400, "'%s' must be true or false" % key, param=param or key)
    return value


# ============================================================================
# 8. MODEL HANDLERS
# ============================================================================
# Facts come from engines.catalog (read from the model files; listing touches the
# disk, so it runs off the loop). Response builders below are pure functions.

def iso_time(ts):
    """Unix seconds -> RFC 3339 UTC, as the seed prints it: 2026-02-15T12:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def v1_model_object(info):
    """One OpenAI-style model object (seed fields, true values)."""
    return {"id": info.id, "object": "model", "created": int(info.modified_at),
            "owned_by": info.owned_by or "local",
            "capabilities": {"completion_chat": bool(info.template), "completion_fim": False,
                             "function_calling": False, "vision": "vision" in info.capabilities,
                             "fine_tuning": False},
            "name": info.id,
            "description": "%s %s %s (%s)" % (info.family, info.parameter_size, info.quantization, info.format),
            "aliases": [info.repo] if info.repo else [], "deprecation": None, "type": "base"}


def ollama_details(info):
    return {"parent_model": "", "format": info.format, "family": info.family,
            "families": [info.family] if info.family else None,
            "parameter_size": info.parameter_size, "quantization_level": info.quantization}


def ollama_tag(info):
    return {"name": info.id, "model": info.id, "modified_at": iso_time(info.modified_at),
            "size": info.size, "digest": info.digest, "details": ollama_details(info)}


def ollama_model_info(info, verbose):
    """Ollama's model_info keys (GGUF style), from the config; the short form keeps
    architecture, parameter count and context length."""
    arch, cfg = info.family or "unknown", dict(info.config.get("text_config") or {}, **info.config)
    out = {"general.architecture": arch, "general.parameter_count": info.parameter_count,
           arch + ".context_length": info.context_length}
    if verbose:
        for key, cfg_key in (("embedding_length", "hidden_size"), ("block_count", "num_hidden_layers"),
                             ("feed_forward_length", "intermediate_size"),
                             ("attention.head_count", "num_attention_heads"),
                             ("attention.head_count_kv", "num_key_value_heads"),
                             ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
                             ("rope.freq_base", "rope_theta"), ("vocab_size", "vocab_size")):
            if cfg.get(cfg_key) is not None:
                out["%s.%s" % (arch, key)] = cfg[cfg_key]
        for key in ("bos_token_id", "eos_token_id"):
            if cfg.get(key) is not None:
                out["tokenizer.ggml." + key] = cfg[key]
    return out


def ollama_parameters(info):
    """Modelfile PARAMETER lines that are true for this model: its context and stop."""
    lines = ["num_ctx %d" % info.context_length] if info.context_length else []
    if info.eos_token:
        lines.append("stop %s" % json.dumps(info.eos_token))
    return "\n".join(lines)


def ollama_show(info, verbose):
    params = ollama_parameters(info)
    out = {"license": info.license or "", "parameters": params,
           "template": info.template, "details": ollama_details(info),
           "model_info": ollama_model_info(info, verbose), "capabilities": list(info.capabilities),
           "modified_at": iso_time(info.modified_at)}
    if verbose:
        lines = ["# Modelfile generated by localai", "FROM %s" % info.id]
        if info.template:
            lines.append('TEMPLATE """%s"""' % info.template)
        lines += ["PARAMETER " + p for p in params.splitlines()]
        if info.license:
            lines.append('LICENSE """%s"""' % info.license)
        out["modelfile"] = "\n".join(lines) + "\n"
        out["messages"] = []
    return out


async def h_v1_models(req):
    models = await run_blocking(req.app.catalog.list)
    return json_response({"object": "list", "data": [v1_model_object(m) for m in models]})


async def h_v1_model(req):
    from urllib.parse import unquote
    info = await run_blocking(req.app.catalog.resolve, unquote(req.path_param or ""))
    return json_response(v1_model_object(info))


async def h_api_tags(req):
    models = await run_blocking(req.app.catalog.list)
    return json_response({"models": [ollama_tag(m) for m in models]})


async def h_api_show(req):
    body = req.json_body()
    name = get_str(body, "model") or get_str(body, "name")
    if not name:
        raise HTTPError(400, "'model' is required", param="model")
    verbose = bool(get_bool(body, "verbose", False))
    info = await run_blocking(req.app.catalog.resolve, name)
    return json_response(ollama_show(info, verbose))


async def h_api_pull(req):
    """Ollama's pull: fetch an MLX repo from the Hugging Face hub into the store.
    Offline it fails at once (engines.hub checks before downloading)."""
    body = req.json_body()
    name = get_str(body, "model") or get_str(body, "name")
    if not name:
        raise HTTPError(400, "'model' is required", param="model")
    stream = get_bool(body, "stream", False)
    from engines import hub

    async def statuses():
        yield {"status": "pulling %s" % name}
        await run_blocking(hub.pull, name, req.app.config.models_dir, progress=False)
        yield {"status": "success"}
    if stream:
        return ndjson_response(statuses())
    await run_blocking(hub.pull, name, req.app.config.models_dir, progress=False)
    return json_response({"status": "success"})


def loaded_models():
    """[(ModelInfo, expires_at or None, info dict)] from every engine that loads models."""
    out = []
    for module in ("llm", "vlm"):
        engine = sys.modules.get("engines." + module)   # an engine never imported has nothing loaded
        if engine is not None and hasattr(engine, "loaded"):
            out += engine.loaded()
    return out


async def h_api_ps(req):
    models = []
    for info, expires_at, extra in loaded_models():
        entry, extra = ollama_tag(info), extra or {}
        # Ollama's ps size is the memory the loaded weights take (the engine may
        # widen quantized weights for speed); size_vram is the part on a GPU.
        size = extra.get("weights_bytes") if isinstance(extra.get("weights_bytes"), int) else info.size
        entry.update({"size": size, "size_vram": size if extra.get("device") == "gpu" else 0,
                      "expires_at": iso_time(expires_at) if expires_at is not None else None,
                      "context_length": info.context_length,
                      # what the engine chose (device, dtype, BLAS, why) and its counters
                      "engine": extra})
        models.append(entry)
    return json_response({"models": models})


# ============================================================================
# 9. IMAGE INPUTS
# ============================================================================
# Every place the seed lets a client put an image:
#   OpenAI content parts  {"type": "image_url", "image_url": "..."}
#                         {"type": "image_url", "image_url": {"url": "...", "detail": ...}}
#   Ollama                messages[i].images = ["<base64>", ...]; /api/generate images
# Each entry is a data: URL, bare base64, an http(s) URL (--allow-image-urls) or
# a file path / file: URL inside --media-dir; engines/images.py decides, fetches
# and validates, in a worker thread. Images are counted before anything is read.
def image_sources(messages=None, images=None):
    """[(source, message index or None)] in order of appearance; None = the prompt."""
    found = []

    def add(src, slot, where):
        if isinstance(src, dict):
            src = src.get("url")
        if not isinstance(src, str) or not src:
            raise HTTPError(400, "%s: an image must be a non-empty string" % where,
                            param="messages" if slot is not None else "images")
        found.append((src, slot))

    for i, msg in enumerate(messages if isinstance(messages, list) else ()):
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        content = [content] if isinstance(content, dict) else content   # one part alone
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and (part.get("type") == "image_url" or "image_url" in part):
                add(part.get("image_url"), i, "messages[%d].content image_url" % i)
            elif isinstance(part, dict) and part.get("type") in ("image", "input_image"):
                raise HTTPError(400, "messages[%d]: an image part must carry image_url "
                                "(a data: URL, base64, URL or path)" % i, param="messages")
        extra = msg.get("images")
        if extra is not None and not isinstance(extra, list):
            raise HTTPError(400, "messages[%d].images must be a list" % i, param="messages")
        for src in extra or ():
            add(src, i, "messages[%d].images" % i)
    if images is not None and not isinstance(images, list):
        raise HTTPError(400, "images must be a list of strings", param="images")
    for src in images or ():
        add(src, None, "images")
    return found


async def gather_images(app, messages=None, images=None):
    """(list of validated image bytes, list of message index per image; None for
    top-level /api/generate images, which belong to the prompt)."""
    from engines import images as image_inputs
    found = image_sources(messages, images)
    if not found:
        return [], []
    image_inputs.check_count(len(found))
    cfg = app.config
    data = await run_blocking(image_inputs.load_all, [s for s, _ in found],
                              getattr(cfg, "media_dir", None),
                              bool(getattr(cfg, "allow_image_urls", False)))
    return data, [slot for _, slot in found]


# ============================================================================
# 10. CHAT AND COMPLETION HANDLERS
# ============================================================================
# One neutral engine call (engines.llm.generate, or engines.vlm.generate for a
# model with the "vision" capability) serves all five routes. Each handler parses
# its dialect into a GenRequest (strict types: booleans are not numbers, NaN is
# refused by json_body), starts n generations, and shapes the Chunks into OpenAI
# JSON/SSE or Ollama JSON/NDJSON with pure builder functions. Errors found before
# the first token (unknown model, prompt too long, queue full) are real 4xx/503
# answers because run_handler takes the first stream item before the head goes out.
MAX_CHOICES = 8                # n above this -> 400; each choice is a full generation
MAX_TOKENS_LIMIT = 8192        # max_tokens/num_predict above this -> 400 (SmolLM2's context)
DEFAULT_MAX_TOKENS = 2048      # chat, Ollama num_predict -1: an answer, not a runaway
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_STOP_SEQUENCES = 4         # OpenAI's limit on `stop`
MAX_STOP_LENGTH = 256          # characters per stop sequence
OPENAI_ROLES = {"system", "user", "assistant", "tool", "developer"}
# Ollama's documented option defaults (its Modelfile PARAMETER defaults).
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
                   "repetition_penalty": 1.1, "repetition_context_size": 64}
# Ollama options we read (name -> GenRequest field; None: checked, then ignored).
# Other keys are ignored, as Ollama does (clients such as Open WebUI send many).
OLLAMA_NUMBER_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "topP": "top_p",
                         "min_p": "min_p", "repeat_penalty": "repetition_penalty",
                         "presence_penalty": "presence_penalty",
                         "frequency_penalty": "frequency_penalty"}
OLLAMA_INT_OPTIONS = {"top_k": "top_k", "topK": "top_k", "seed": "seed",
                      "num_predict": "max_tokens", "repeat_last_n": "repetition_context_size",
                      "num_ctx": None, "num_keep": None, "num_batch": None, "num_gpu": None,
                      "main_gpu": None, "num_thread": None, "mirostat": None}
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def new_id(prefix):
    return prefix + os.urandom(12).hex()


def text_of(content, where):
    """The text of a message's content: a string, null, a part object, or a list
    of parts (text parts joined with newlines; image parts are taken elsewhere)."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = [content] if isinstance(content, dict) else content
    if not isinstance(parts, list):
        raise HTTPError(400, "%s.content must be a string or a list of parts" % where, param="messages")
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image", "image") or (isinstance(part, dict) and "image_url" in part):
            continue
        else:
            raise HTTPError(400, "%s.content: unsupported part %r" % (where, kind), param="messages")
    return "\n".join(texts)


def parse_messages(raw, *, required=True):
    """[{role, content}] from OpenAI or Ollama messages; roles checked."""
    if raw is None and not required:
        return []
    if not isinstance(raw, list) or (required and not raw):
        raise HTTPError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, msg in enumerate(raw):
        where = "messages[%d]" % i
        if not isinstance(msg, dict):
            raise HTTPError(400, "%s must be an object" % where, param="messages")
        role = msg.get("role")
        if role not in OPENAI_ROLES:
            raise HTTPError(400, "%s.role must be one of system, user, assistant, tool" % where,
                            param="messages")
        out.append({"role": "system" if role == "developer" else role,
                    "content": text_of(msg.get("content"), where)})
    return out


def parse_stop(value, param="stop"):
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise HTTPError(400, "'%s' must be a string or a list of strings" % param, param=param)
    if len(stops) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_LENGTH for s in stops):
        raise HTTPError(400, "'%s': at most %d sequences of %d characters"
                        % (param, MAX_STOP_SEQUENCES, MAX_STOP_LENGTH), param=param)
    return [s for s in stops if s]


def parse_keep_alive(value):
    """Ollama keep_alive: seconds (number) or a Go duration ("5m", "1h30m", "-1");
    returns seconds, None for the default; negative keeps the model loaded."""
    if value is None:
        return None
    if is_number(value):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        sign = -1.0 if text.startswith("-") else 1.0
        pieces = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text.lstrip("+-"))
        if pieces and "".join(n + u for n, u in pieces) == text.lstrip("+-"):
            return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in pieces)
    raise HTTPError(400, "'keep_alive' must be a duration such as \"5m\" or a number of seconds",
                    param="keep_alive")


def number_or(body, key, default, lo=None, hi=None, param=None):
    """get_number, with JSON null meaning the default."""
    value = get_number(body, key, None, lo, hi, param)
    return default if value is None else value


def int_or(body, key, default, lo=None, hi=None, param=None):
    value = get_int(body, key, None, lo, hi, param)
    return default if value is None else value


def refuse_unsupported(body, names, why="is not supported by this server"):
    for name in names:
        value = body.get(name)
        if value not in (None, False, "", [], {}, 0):
            raise HTTPError(400, "'%s' %s" % (name, why), param=name)


def parse_openai(body, *, default_max):
    """GenRequest fields and (n, stream, include_usage) from an OpenAI body."""
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise HTTPError(400, "response_format %s cannot be honoured: only 'text' is supported"
                        % json.dumps(fmt)[:80], param="response_format")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise HTTPError(400, "tool_choice %s cannot be honoured: this server does not call tools"
                        % json.dumps(choice)[:80], param="tool_choice")
    refuse_unsupported(body, ("logprobs", "top_logprobs", "logit_bias", "suffix"))
    mct = get_int(body, "max_completion_tokens", None, 1, MAX_TOKENS_LIMIT)
    mt = get_int(body, "max_tokens", None, 1, MAX_TOKENS_LIMIT)
    fields = {"max_tokens": mct or mt or default_max,
              "temperature": number_or(body, "temperature", 1.0, 0, 2),
              "top_p": number_or(body, "top_p", 1.0, 0, 1),
              "top_k": int_or(body, "top_k", 0, 0, None),
              "min_p": number_or(body, "min_p", 0.0, 0, 1),
              "seed": get_int(body, "seed", None),
              "stop": parse_stop(body.get("stop")),
              "repetition_penalty": get_number(body, "repetition_penalty", None, 0.01, 10),
              "presence_penalty": number_or(body, "presence_penalty", 0.0, -2, 2),
              "frequency_penalty": number_or(body, "frequency_penalty", 0.0, -2, 2)}
    if fields["top_p"] == 0:           # nucleus of one token: the argmax
        fields["temperature"], fields["top_p"] = 0.0, 1.0
    n = int_or(body, "n", 1, 1, MAX_CHOICES)
    best_of = get_int(body, "best_of", None, 1, MAX_CHOICES)
    if best_of is not None and best_of != n:
        raise HTTPError(400, "'best_of' other than n is not supported", param="best_of")
    stream = bool(get_bool(body, "stream", False))
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise HTTPError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = bool(get_bool(opts or {}, "include_usage", False, param="stream_options"))
    return fields, n, stream, include_usage


def parse_ollama(body):
    """GenRequest fields from Ollama's options (and the seed's camelCase aliases)."""
    if body.get("format") not in (None, ""):
        raise HTTPError(400, "format %s cannot be honoured: structured output is not supported"
                        % json.dumps(body.get("format"))[:80], param="format")
    refuse_unsupported(body, ("think",), "is not supported by this model")
    opts = body.get("options")
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise HTTPError(400, "'options' must be an object", param="options")
    fields = dict(OLLAMA_DEFAULTS, max_tokens=DEFAULT_MAX_TOKENS, stop=[])
    for key, value in opts.items():
        if key in OLLAMA_NUMBER_OPTIONS:
            if value is not None:
                fields[OLLAMA_NUMBER_OPTIONS[key]] = get_number(opts, key, param="options." + key)
        elif key in OLLAMA_INT_OPTIONS:
            value = get_int(opts, key, param="options." + key)
            if OLLAMA_INT_OPTIONS[key] and value is not None:
                fields[OLLAMA_INT_OPTIONS[key]] = value
        elif key == "stop":
            fields["stop"] = parse_stop(value, "options.stop")
    if opts.get("mirostat"):                          # a different sampler: cannot honour
        raise HTTPError(400, "options.mirostat is not supported (use temperature, top_k, top_p, min_p)",
                        param="options.mirostat")
    if fields["max_tokens"] < 0:                      # -1 infinite, -2 fill the context
        fields["max_tokens"] = MAX_TOKENS_LIMIT
    checks = [("max_tokens", 1, MAX_TOKENS_LIMIT, "num_predict"), ("temperature", 0, 2, "temperature"),
              ("top_p", 0, 1, "top_p"), ("min_p", 0, 1, "min_p"), ("top_k", 0, None, "top_k"),
              ("repetition_penalty", 0.01, 10, "repeat_penalty"),
              ("repetition_context_size", -1, None, "repeat_last_n"),
              ("presence_penalty", -2, 2, "presence_penalty"), ("frequency_penalty", -2, 2, "frequency_penalty")]
    for field, lo, hi, name in checks:
        value = fields.get(field)
        if value is not None and (value < lo or (hi is not None and value > hi)):
            raise HTTPError(400, "options.%s must be between %s and %s" % (name, lo, hi),
                            param="options." + name)
    if fields.get("seed") is not None and fields["seed"] < 0:   # llama.cpp: -1 = random
        fields["seed"] = None
    if fields["repetition_context_size"] == -1:       # -1: the whole context
        fields["repetition_context_size"] = MAX_TOKENS_LIMIT
    if fields["top_p"] == 0:
        fields["temperature"], fields["top_p"] = 0.0, 1.0
    fields["keep_alive"] = parse_keep_alive(body.get("keep_alive"))
    return fields


async def resolve_model(req, name):
    return await run_blocking(req.app.catalog.resolve, name)


async def fallback_model(req):
    """/api/chat without a model: --model, then the first installed, then the default."""
    configured = getattr(req.app.config, "model", None)
    if configured:
        return await resolve_model(req, configured)
    models = await run_blocking(req.app.catalog.list)
    if models:
        return models[0]
    from engines.catalog import EMBEDDED_NAME
    return await resolve_model(req, EMBEDDED_NAME)


def gen_request(**fields):
    from engines.llm import GenRequest       # the neutral type both engines take
    return GenRequest(**fields)


def engine_for(info):
    import importlib
    return importlib.import_module("engines.vlm" if "vision" in info.capabilities else "engines.llm")


async def add_images(req, gen, messages=None, images=None):
    """Put the request's images into gen, or refuse them for a text-only model."""
    if "vision" not in gen.model.capabilities:
        if image_sources(messages, images):
            raise HTTPError(400, "model %s does not support images" % gen.model.id,
                            param="messages" if messages is not None else "images")
        return
    gen.images, gen.image_slots = await gather_images(req.app, messages=messages, images=images)


# A generation request announced to the language engine as soon as its route is
# known (handle_one), before its body is read: the engine waits for announced
# requests when it starts a batch, and the loop reads requests sent together one
# after another. Announced only when they reached generations() (after the body,
# the model, the images), four requests sent at once reached the engine 1-9 ms
# apart, and the first was already being computed alone.
ARRIVAL = contextvars.ContextVar("arrival", default=None)


def announce_generation():
    llm = sys.modules.get("engines.llm")        # not started yet: nothing to batch with
    return llm.expect_if_running() if llm is not None else None


async def generations(gen, n):
    """Run n independent generations of gen (seed+i for a seeded choice i);
    yields (index, Chunk) as they come. Closing this stops every generation."""
    from dataclasses import replace
    engine = engine_for(gen.model)
    # The language engine batches requests that arrive together: announce these
    # now (the first may be announced already), before their threads start.
    expect = getattr(engine, "expect", None)
    early = ARRIVAL.get()
    ARRIVAL.set(None)
    if early is not None and expect is None:
        early.done()

    def stream(g, arrival=None):
        if expect:
            return iterate_blocking(engine.generate, g, arrival=arrival or expect())
        return iterate_blocking(engine.generate, g)
    if n == 1:
        streams = [stream(gen, early)]
    else:
        streams = [stream(replace(
            gen, seed=None if gen.seed is None else (gen.seed + i) & 0xFFFFFFFFFFFFFFFF),
            early if i == 0 else None)
            for i in range(n)]
    if n == 1:
        try:
            async for chunk in streams[0]:
                yield 0, chunk
        finally:
            await streams[0].aclose()
        return
    queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for chunk in stream:
                await queue.put((i, chunk, None))
        except Exception as exc:
            await queue.put((i, None, exc))
    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = n
        while remaining:
            i, chunk, exc = await queue.get()
            if exc is not None:
                raise exc
            yield i, chunk
            if chunk.done:
                remaining -= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


async def collect(gen, n):
    """Run to the end: ([text per choice], [final Chunk per choice])."""
    texts, finals = [[] for _ in range(n)], [None] * n
    stream = generations(gen, n)
    try:
        async for i, chunk in stream:
            if chunk.done:
                finals[i] = chunk
            else:
                texts[i].append(chunk.text)
    finally:
        await stream.aclose()
    return ["".join(t) for t in texts], finals


# -- pure response builders -------------------------------------------------------
def openai_usage(finals):
    first = finals[0]
    completion = sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": first.prompt_tokens, "completion_tokens": completion,
            "total_tokens": first.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens}}


def chat_completion(rid, created, model, texts, finals):
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": f.finish_reason}
                        for i, (text, f) in enumerate(zip(texts, finals))],
            "usage": openai_usage(finals)}


def text_completion(rid, created, model, texts, finals):
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": f.finish_reason}
                        for i, (text, f) in enumerate(zip(texts, finals))],
            "usage": openai_usage(finals)}


def chat_chunk(rid, created, model, index, delta, finish_reason=None, usage=False):
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": index, "delta": delta, "logprobs": None,
                        "finish_reason": finish_reason}]}
    if usage:
        out["usage"] = None
    return out


def text_chunk(rid, created, model, index, text, finish_reason=None, usage=False):
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": index, "text": text, "logprobs": None,
                        "finish_reason": finish_reason}]}
    if usage:
        out["usage"] = None
    return out


def usage_chunk(rid, created, model, kind, finals):
    return {"id": rid, "object": kind, "created": created, "model": model,
            "choices": [], "usage": openai_usage(finals)}


def ollama_stats(final, total_ns):
    """Ollama's closing fields, real durations in nanoseconds."""
    return {"done": True, "done_reason": final.finish_reason,
            "total_duration": total_ns,
            "load_duration": int(final.load_seconds * 1e9),
            "prompt_eval_count": final.prompt_tokens,
            "prompt_eval_duration": int(final.prompt_seconds * 1e9),
            "eval_count": final.completion_tokens,
            "eval_duration": int(final.generate_seconds * 1e9)}


def ollama_piece(model, text, chat, now, done=False):
    out = {"model": model, "created_at": iso_time(now)}
    if chat:
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["response"] = text
    out["done"] = done
    return out


# -- OpenAI handlers -----------------------------------------------------------------
async def openai_answer(gen, model, n, stream, include_usage, chat):
    rid, created = new_id("chatcmpl-" if chat else "cmpl-"), int(time.time())
    if not stream:
        texts, finals = await collect(gen, n)
        return json_response((chat_completion if chat else text_completion)(rid, created, model, texts, finals))

    async def events():
        finals = [None] * n
        source = generations(gen, n)
        try:
            if chat:                                     # the role comes first, as OpenAI sends it
                for i in range(n):
                    yield chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""},
                                     usage=include_usage)
            async for i, chunk in source:
                if chunk.done:
                    finals[i] = chunk
                    yield (chat_chunk(rid, created, model, i, {}, chunk.finish_reason, include_usage) if chat
                           else text_chunk(rid, created, model, i, "", chunk.finish_reason, include_usage))
                elif chunk.text:
                    yield (chat_chunk(rid, created, model, i, {"content": chunk.text}, usage=include_usage)
                           if chat else text_chunk(rid, created, model, i, chunk.text, usage=include_usage))
            if include_usage:
                yield usage_chunk(rid, created, model, "chat.completion.chunk" if chat else "text_completion",
                                  finals)
        finally:
            await source.aclose()
    return sse_response(_first_ready(events()))


async def _first_ready(events):
    """Start the engine before the first event goes out: the role chunk is only
    sent once the engine accepted the request (so errors are real 4xx/503)."""
    buffered = []
    try:
        async for event in events:
            buffered.append(event)
            choices = event.get("choices") or [{}]
            if "role" not in choices[0].get("delta", {}):
                break
        for event in buffered:
            yield event
        async for event in events:
            yield event
    finally:
        await events.aclose()


async def h_chat_completions(req):
    body = req.json_body()
    name = get_str(body, "model", required=True)
    raw = body.get("messages")
    messages = parse_messages(raw)
    fields, n, stream, include_usage = parse_openai(body, default_max=DEFAULT_MAX_TOKENS)
    info = await resolve_model(req, name)
    gen = gen_request(model=info, messages=messages, **fields)
    await add_images(req, gen, messages=raw)
    return await openai_answer(gen, name, n, stream, include_usage, chat=True)


async def h_completions(req):
    body = req.json_body()
    name = get_str(body, "model", required=True)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise HTTPError(400, "'prompt' must be a string", param="prompt")
    if get_bool(body, "echo", False):
        raise HTTPError(400, "'echo' is not supported by this server", param="echo")
    fields, n, stream, include_usage = parse_openai(body, default_max=COMPLETION_DEFAULT_TOKENS)
    info = await resolve_model(req, name)
    gen = gen_request(model=info, prompt=prompt, **fields)
    return await openai_answer(gen, name, n, stream, include_usage, chat=False)


# -- Ollama handlers -----------------------------------------------------------------
async def ollama_answer(req, gen, stream, chat, model):
    started = time.monotonic_ns()
    if not stream:
        texts, finals = await collect(gen, 1)
        out = ollama_piece(model, texts[0], chat, time.time())
        out.update(ollama_stats(finals[0], time.monotonic_ns() - started))
        return json_response(out)

    async def objects():
        source = generations(gen, 1)
        try:
            async for _, chunk in source:
                if chunk.done:
                    out = ollama_piece(model, "", chat, time.time())
                    out.update(ollama_stats(chunk, time.monotonic_ns() - started))
                    yield out
                elif chunk.text:
                    yield ollama_piece(model, chunk.text, chat, time.time())
        finally:
            await source.aclose()
    return ndjson_response(objects())


async def ollama_load_or_unload(req, info, keep_alive, chat, model):
    """Ollama's idiom: no prompt/messages loads the model; with keep_alive 0 unloads it."""
    engine = engine_for(info)
    if keep_alive is not None and keep_alive == 0:
        if hasattr(engine, "unload"):
            await run_blocking(engine.unload, info)
        reason = "unload"
    else:
        if hasattr(engine, "load"):
            await run_blocking(engine.load, info, keep_alive)
        reason = "load"
    out = ollama_piece(model, "", chat, time.time())
    out.update({"done": True, "done_reason": reason})
    return json_response(out)


async def h_api_chat(req):
    body = req.json_body()
    name = get_str(body, "model")
    raw = body.get("messages")
    messages = parse_messages(raw, required=False)
    fields = parse_ollama(body)
    stream = bool(get_bool(body, "stream", False))
    info = await (resolve_model(req, name) if name else fallback_model(req))
    model = name or info.id
    if not messages:
        return await ollama_load_or_unload(req, info, fields["keep_alive"], True, model)
    gen = gen_request(model=info, messages=messages, **fields)
    await add_images(req, gen, messages=raw)
    return await ollama_answer(req, gen, stream, True, model)


async def h_api_generate(req):
    body = req.json_body()
    name = get_str(body, "model", required=True)
    prompt = get_str(body, "prompt") or ""
    system = get_str(body, "system")
    raw_mode = bool(get_bool(body, "raw", False))
    refuse_unsupported(body, ("template", "context", "suffix"))
    fields = parse_ollama(body)
    stream = bool(get_bool(body, "stream", False))
    info = await resolve_model(req, name)
    if not prompt and not body.get("images"):
        return await ollama_load_or_unload(req, info, fields["keep_alive"], False, name)
    if raw_mode:
        gen = gen_request(model=info, prompt=prompt, **fields)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
        gen = gen_request(model=info, messages=messages, **fields)
    await add_images(req, gen, images=body.get("images"))
    if gen.images and not raw_mode:                   # top-level images belong to the prompt
        gen.image_slots = [len(gen.messages) - 1 if s is None else s for s in gen.image_slots]
    return await ollama_answer(req, gen, stream, False, name)


# ============================================================================
# 11. AUDIO HANDLERS
# ============================================================================
TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
TIMESTAMP_GRANULARITIES = ("segment", "word")


def _one_field(fields, name, default=None):
    """A form field that may appear once; a repeat is ambiguous -> 400."""
    values = fields.get(name, [])
    if len(values) > 1:
        raise HTTPError(400, "field '%s' given more than once" % name, param=name)
    return values[0] if values else default


def transcription_options(fields, files):
    """Validate a transcription form -> dict of options (pure; 400 on any problem)."""
    uploads = files.get("file", [])
    if not uploads:
        raise HTTPError(400, "'file' is required (a multipart file part)", param="file")
    if len(uploads) > 1:
        raise HTTPError(400, "one 'file' per request", param="file")
    model = _one_field(fields, "model", "").strip()
    if not model:
        raise HTTPError(400, "'model' is required", param="model")
    fmt = _one_field(fields, "response_format", "json").strip() or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise HTTPError(400, "'response_format' must be one of %s" % ", ".join(TRANSCRIPTION_FORMATS),
                        param="response_format")
    temperature = _one_field(fields, "temperature", "").strip() or "0"
    try:
        temperature = float(temperature)
    except ValueError:
        temperature = math.nan
    if not 0.0 <= temperature <= 1.0:                 # NaN fails this too
        raise HTTPError(400, "'temperature' must be a number in [0, 1]", param="temperature")
    language = _one_field(fields, "language", "").strip() or None
    if language is not None and language.lower() == "auto":      # some clients say so: the default
        language = None
    if language is not None and (len(language) > 35 or not all(
            p.isascii() and p.isalnum() and 1 <= len(p) <= 8 for p in language.replace("_", "-").split("-"))):
        raise HTTPError(400, "'language' must be a language tag such as 'en' or 'en-US'", param="language")
    if _one_field(fields, "stream", "false").strip().lower() not in ("", "false", "0"):
        raise HTTPError(400, "streaming transcriptions are not supported", param="stream")
    _one_field(fields, "prompt")                      # accepted (a hint); vosk has no use for it
    grans = []
    for name in ("timestamp_granularities", "timestamp_granularities[]"):
        for value in fields.get(name, []):
            value = value.strip()
            try:                                      # a JSON list in one field
                items = json.loads(value) if value.startswith("[") else value.split(",")
            except ValueError:
                items = None
            if not isinstance(items, list) or not all(isinstance(g, str) and g.strip() in TIMESTAMP_GRANULARITIES
                                                      for g in items):
                raise HTTPError(400, "'timestamp_granularities' values must be 'segment' or 'word'", param=name)
            grans += [g.strip() for g in items]
    return {"upload": uploads[0], "model": model, "format": fmt, "temperature": temperature,
            "language": language, "granularities": set(grans) or {"segment"}}


def speech_to_text(app):
    """The app's shared speech-to-text engine (models load once, on first use)."""
    engine = app.state.get("stt")
    if engine is None:
        from engines import stt
        engine = app.state["stt"] = stt.SpeechToText(getattr(app.config, "stt_model", None) or [])
    return engine


async def h_transcriptions(req):
    fields, files = parse_multipart(req.body, req.headers.get("content-type", ""))
    opts = transcription_options(fields, files)
    from engines import stt
    upload = opts["upload"]
    t = await run_blocking(speech_to_text(req.app).transcribe, upload.data, upload.filename, opts["language"])
    fmt = opts["format"]
    if fmt == "json":
        return json_response({"text": t.text})
    if fmt == "verbose_json":
        grans = opts["granularities"]
        return json_response(stt.verbose_json(t, segments="segment" in grans, words="word" in grans))
    if fmt == "text":
        return text_response(t.text + "\n")
    return text_response(stt.to_srt(t) if fmt == "srt" else stt.to_vtt(t))   # plain text, as the seed says


def speech_options(body):
    """Validate a /v1/audio/speech body -> tts.SpeechRequest (pure; 400 names the field)."""
    from engines import tts
    model = body.get("model")
    if model is None or (isinstance(model, str) and not model.strip()):
        raise HTTPError(400, "'model' is required", param="model")
    if not isinstance(model, str):
        raise HTTPError(400, "'model' must be a string", param="model")
    if body.get("instructions") not in (None, ""):      # would change the voice: never ignore it
        raise HTTPError(400, "'instructions' are not supported by the local speech engine",
                        param="instructions")
    if body.get("stream_format") not in (None, "audio"):
        raise HTTPError(400, "only stream_format 'audio' is supported", param="stream_format")
    return tts.check(body.get("input"), body.get("voice"), body.get("speed"), body.get("response_format"))


async def _audio_body(chunks):
    """Encoded audio as it is produced. The first piece is taken before the head goes
    out, so errors up to then are real 4xx/5xx. A failure after that must not look
    like a complete file: the connection ends without the last chunk (the client sees
    a truncated body) instead of carrying error text inside the audio."""
    started = False
    try:
        async for data in chunks:
            started = True
            yield data
    except Exception as exc:
        if not started:
            raise
        log.error("speech stream failed after the head was sent: %s", exc)
        raise ConnectionAbortedError("speech stream failed") from exc
    finally:
        await aclose_quietly(chunks)


async def h_speech(req):
    from engines import tts
    speech = speech_options(req.json_body())
    content_type, headers = tts.media(speech.fmt)
    return StreamResponse(content_type, _audio_body(iterate_blocking(tts.stream, speech)), headers=headers)


async def h_audio_voices(req):
    from engines import tts
    return json_response({"voices": [{"id": vid, "name": name} for vid, name in tts.voices()]})


async def h_audio_models(req):
    from engines import tts
    return json_response({"models": [{"id": model} for model in tts.MODELS]})


# ============================================================================
# 12. SYSTEM HANDLERS AND THE ROUTE TABLE
# ============================================================================
async def h_root(req):
    return text_response("localai is running\n")


async def h_status(req):
    app = req.app
    return json_response({"status": app.status, "message": app.status_message})


async def h_version(req):
    return json_response({"version": VERSION})


async def h_brightness_get(req):
    return json_response({"brightness": await run_blocking(req.app.brightness.get)})


async def h_brightness_set(req):
    body = req.json_body()
    if "brightness" not in body:
        raise HTTPError(400, "'brightness' is required")
    value = body["brightness"]
    if not is_number(value):
        raise HTTPError(400, "'brightness' must be a finite number")
    applied = await run_blocking(req.app.brightness.set, min(1.0, max(0.0, float(value))))
    return json_response({"requestedBrightness": value, "appliedBrightness": applied})


class Route:
    def __init__(self, methods, body_limit=0, public=False):
        self.methods = dict(methods)
        if "GET" in self.methods and "HEAD" not in self.methods:
            self.methods["HEAD"] = self.methods["GET"]      # HEAD: GET's headers, no body
        self.body_limit = body_limit
        self.public = public                                 # no API key needed


ROUTES = {
    "/": Route({"GET": h_root}, public=True),
    "/status": Route({"GET": h_status}, public=True),
    "/api/version": Route({"GET": h_version}),
    "/api/services/screen/brightness": Route({"GET": h_brightness_get, "POST": h_brightness_set}, BODY_SMALL),
    # OpenAI dialect
    "/v1/models": Route({"GET": h_v1_models}),
    "/v1/chat/completions": Route({"POST": h_chat_completions}, BODY_CHAT),
    "/v1/chat": Route({"POST": h_chat_completions}, BODY_CHAT),
    "/v1/completions": Route({"POST": h_completions}, BODY_CHAT),
    "/v1/audio/transcriptions": Route({"POST": h_transcriptions}, BODY_TRANSCRIPTION),
    "/v1/audio/speech": Route({"POST": h_speech}, BODY_SPEECH),
    "/v1/audio/voices": Route({"GET": h_audio_voices}),
    "/v1/audio/models": Route({"GET": h_audio_models}),
    # Ollama dialect
    "/api/tags": Route({"GET": h_api_tags}),
    "/api/ps": Route({"GET": h_api_ps}),
    "/api/show": Route({"POST": h_api_show}, BODY_SMALL),
    "/api/pull": Route({"POST": h_api_pull}, BODY_SMALL),
    "/api/chat": Route({"POST": h_api_chat}, BODY_CHAT),
    "/api/generate": Route({"POST": h_api_generate}, BODY_CHAT),
}
# Handlers that generate text (see announce_generation).
GENERATION_HANDLERS = (h_chat_completions, h_completions, h_api_chat, h_api_generate)
# Routes with one trailing path parameter (passed as req.path_param).
PREFIX_ROUTES = {
    "/v1/models/": Route({"GET": h_v1_model}),
}


def find_route(path):
    route = ROUTES.get(path)
    if route is None:
        for prefix, candidate in PREFIX_ROUTES.items():
            if path.startswith(prefix) and len(path) > len(prefix):
                return candidate, path[len(prefix):]
    return route, None


# ============================================================================
# 13. ENGINE BRIDGE
# ============================================================================
# Engines block (MLX, vosk, espeak). They run in threads; results come back to
# the loop through futures (`call_soon_threadsafe` underneath). Every call gets a
# `cancel` Event that is set when the waiting handler is cancelled, which happens
# when its client disconnects, so engines stop early and queued work never runs.
_bridge_pool = ThreadPoolExecutor(max_workers=BRIDGE_THREADS, thread_name_prefix="bridge")


async def run_blocking(fn, *args, **kwargs):
    """Run fn(*args, cancel=Event, **kwargs) in a thread; cancelling us sets the Event."""
    cancel = threading.Event()
    if _accepts_cancel(fn):
        kwargs["cancel"] = cancel
    future = asyncio.get_running_loop().run_in_executor(_bridge_pool, functools.partial(fn, *args, **kwargs))
    try:
        return await future
    except asyncio.CancelledError:
        cancel.set()
        raise


@functools.lru_cache(maxsize=None)
def _accepts_cancel(fn):
    import inspect
    try:
        return "cancel" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


async def iterate_blocking(fn, *args, **kwargs):
    """Async iterator over the blocking iterator fn(*args, cancel=Event, **kwargs).

    A thread drives the iterator and hands items to the loop; closing this
    iterator (the client left) sets the Event, and the engine stops at its next
    check. At most STREAM_BUFFER_ITEMS wait undelivered: a slow client slows the
    engine (backpressure) instead of piling its output up in memory. An iterator
    with deliver(sink) (the language engine's) instead has its engine thread hand
    each item to the loop: its output is bounded by the request's max_tokens, and
    one slow client must not hold up a batch shared with others."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()
    cancel = threading.Event()
    room = threading.Semaphore(STREAM_BUFFER_ITEMS)
    kwargs["cancel"] = cancel

    def put(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:            # the loop is closed: nobody is listening
            cancel.set()

    def drive():
        try:
            items = fn(*args, **kwargs)
            if hasattr(items, "deliver"):
                # the engine's thread hands each item straight to the loop (the
                # language engine: no thread waking per token and request)
                put(("source", items))
                items.deliver(lambda item: put(("direct", item)))
                return
            for item in items:
                while not room.acquire(timeout=0.1):
                    if cancel.is_set():
                        return
                put(("item", item))
                if cancel.is_set():
                    break
            put(("end", None))
        except BaseException as exc:     # delivered to the awaiting handler
            put(("error", exc))

    threading.Thread(target=drive, name="stream", daemon=True).start()
    source = None
    try:
        while True:
            kind, item = await queue.get()
            if kind == "item":
                room.release()
                yield item
            elif kind == "direct":       # a Chunk (done=True ends it) or the error
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
            elif kind == "source":
                source = item            # kept: dropping it would cancel the request
            elif kind == "error":
                raise item
            else:
                return
    finally:
        cancel.set()
        if source is not None:
            source.close()


# ============================================================================
# 14. SECURITY CHECKS
# ============================================================================
def check_api_key(req, route):
    key = req.app.config.api_key
    if not key or route.public or req.method == "OPTIONS":
        return
    auth = req.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else req.headers.get("x-api-key", "")
    if not given or not hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8")):
        raise HTTPError(401, "missing or invalid API key", code="invalid_api_key",
                        headers=[("WWW-Authenticate", 'Bearer realm="localai"')])


def host_allowed(app, host_header):
    """DNS-rebinding guard: the Host must be an IP literal or a name of this machine."""
    if host_header is None:
        return True                                       # HTTP/1.0 without Host
    if host_header in app.hosts_seen:                     # every request asks: remember yeses
        return True
    if not _host_allowed(app, host_header):               # (noes are not kept: names get added)
        return False
    if len(app.hosts_seen) >= 256:
        app.hosts_seen.clear()
    app.hosts_seen.add(host_header)
    return True


def _host_allowed(app, host_header):
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    return (_is_ip_literal(host) or host in app.allowed_hosts or "*" in app.allowed_hosts
            or host.endswith(".localhost"))


@functools.lru_cache(maxsize=256)           # on every request's path; ipaddress is slow
def _is_ip_literal(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def origin_allowed(app, origin):
    """An entry scheme://host allows that origin on any port (a web UI on
    localhost:3000 or :8080); scheme://host:port allows that port only."""
    if "*" in app.allowed_origins:
        return True
    origin = origin.rstrip("/").lower()
    if origin in app.allowed_origins:
        return True
    base, colon, port = origin.rpartition(":")
    return bool(colon) and port.isdigit() and "//" in base and base in app.allowed_origins


def cors_headers(req):
    origin = req.headers.get("origin")
    if origin is None:
        return []
    return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]


def preflight(req, route):
    allow = ", ".join(sorted(route.methods) + ["OPTIONS"])
    headers = [("Allow", allow)]
    if "origin" in req.headers and "access-control-request-method" in req.headers:
        headers += [                                  # Allow-Origin comes with every response
            ("Access-Control-Allow-Methods", allow),
            ("Access-Control-Allow-Headers",
             req.headers.get("access-control-request-headers", "Authorization, Content-Type")),
            ("Access-Control-Max-Age", "600")]
    return Response(204, b"", "", headers)


# ============================================================================
# 15. CONNECTION LOOP (the one place that turns exceptions into responses)
# ============================================================================
def error_body(exc, openai_shape):
    """The JSON body for an exception: OpenAI's error object or {"error": "..."}."""
    status, message, param, code = 500, "internal server error", None, None
    if isinstance(exc, HTTPError):
        status, message, param, code = exc.status, exc.message, exc.param, exc.code
    elif isinstance(exc, engines.EngineError):
        status = next((s for cls, s in ENGINE_STATUS if isinstance(exc, cls)), 500)
        message, param = exc.message, exc.param
    if not openai_shape:
        return {"error": message}
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(exc, req):
    """Turn any exception into a Response. Unexpected ones are logged, never shown."""
    if isinstance(exc, HTTPError):
        status, headers = exc.status, list(exc.headers)
    elif isinstance(exc, engines.EngineError):
        status = next((s for cls, s in ENGINE_STATUS if isinstance(exc, cls)), 500)
        headers = [("Retry-After", str(exc.retry_after))] if isinstance(exc, engines.Busy) else []
    else:
        status, headers = 500, []
        log.error("unhandled error on %s %s\n%s", req.method if req else "-", req.path if req else "-",
                  "".join(traceback.format_exception(exc)))
    if status == 405 and req is not None:
        route, _ = find_route(req.path)
        if route:
            headers.append(("Allow", ", ".join(sorted(route.methods) + ["OPTIONS"])))
    openai_shape = req is not None and req.is_v1
    return Response(status, json_bytes(error_body(exc, openai_shape)), "application/json", headers)


class App:
    """Server-wide state: configuration, engines, status."""

    def __init__(self, config):
        self.config = config
        self.state = {}
        self.status, self.status_message = "Running", "Server is currently running."
        self.allowed_hosts = {"localhost", socket.gethostname().lower(),
                              socket.gethostname().lower() + ".local"}
        self.allowed_hosts |= {h.strip().lower() for h in (config.allowed_hosts or "").split(",") if h.strip()}
        self.allowed_origins = {o.strip().rstrip("/").lower()
                                for o in (config.allowed_origins or "").split(",") if o.strip()}
        self.hosts_seen = set()      # Host header values already accepted
        self.connections = set()     # connection tasks
        self.conns = set()           # their Connection objects (for reap_timeouts)
        self.busy = set()            # connections with a request in flight
        self.stopping = False
        self._catalog = None
        self._brightness = None

    @property
    def catalog(self):
        if self._catalog is None:
            from engines.catalog import Catalog
            self._catalog = Catalog(self.config.models_dir)
        return self._catalog

    @property
    def brightness(self):
        if self._brightness is None:
            from engines.brightness import Brightness
            self._brightness = Brightness(self.config.backlight_root,
                                          Path(self.config.state_dir) / "brightness.json")
        return self._brightness


async def write_response(writer, req, resp, keep_alive, extra_headers):
    """Write a whole or streamed response. Returns bytes of body sent."""
    headers = list(resp.headers) + extra_headers
    if resp.content_type:
        headers.append(("Content-Type", resp.content_type))
    if not keep_alive:
        headers.append(("Connection", "close"))
    elif req is not None and req.version == "HTTP/1.0":
        headers.append(("Connection", "keep-alive"))
    is_head = req is not None and req.method == "HEAD"
    if isinstance(resp, Response):
        if resp.status not in (204, 304) and not (100 <= resp.status < 200):
            headers.append(("Content-Length", str(len(resp.body))))
        writer.write(head_bytes(resp.status, headers) + (b"" if is_head else resp.body))
        await drain(writer)
        return 0 if is_head else len(resp.body)
    # Streaming: chunked transfer coding (HTTP/1.0 gets the raw body then close).
    chunked = req.version == "HTTP/1.1"
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    writer.write(head_bytes(resp.status, headers))
    if is_head:                                           # the GET headers, never a body
        await resp.chunks.aclose()
        await drain(writer)
        return 0
    sent = 0
    try:
        try:
            async for data in _prepend(resp.first, resp.chunks):
                if not data:
                    continue
                writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                sent += len(data)
                await drain(writer)
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            raise
        except Exception as exc:                          # in-band error, then end the stream
            if not isinstance(exc, (HTTPError, engines.EngineError)):
                log.error("error in stream %s\n%s", req.path, "".join(traceback.format_exception(exc)))
            data = resp.on_error(exc) if resp.on_error else b""
            if data:
                writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                sent += len(data)
        if chunked:
            writer.write(b"0\r\n\r\n")
        await drain(writer)
    finally:
        await resp.chunks.aclose()
    return sent


async def _prepend(first, rest):
    if first is not None:
        yield first
        async for item in rest:
            yield item


async def watch_client(conn, gone, task):
    """While a request is handled, read ahead; EOF means the client left."""
    try:
        while not conn.eof and len(conn.buf) < PIPELINE_BUFFER:
            data = await conn.reader.read(READ_CHUNK)
            if not data:
                conn.eof = True
                break
            conn.buf += data
        if conn.eof:
            gone.set()
            if task is not None and not task.done():
                task.cancel()
    except (ConnectionError, OSError):
        gone.set()
        if task is not None and not task.done():
            task.cancel()


async def handle_one(app, conn, req):
    """Route, check, read the body, run the handler, write the response.

    Returns True when the connection may be reused."""
    writer = conn.writer
    connection = req.headers.get("connection")             # RFC 9112 9.3: a list of tokens
    if connection is None:
        keep_alive = req.version == "HTTP/1.1"
    else:
        tokens = {t.strip().lower() for t in connection.split(",")}
        keep_alive = "close" not in tokens and (req.version == "HTTP/1.1" or "keep-alive" in tokens)
    started, status, sent = time.monotonic(), 500, 0
    body_read = False
    extra = []
    try:
        framing, length = body_framing(req)
        body_read = framing == "none"
        if not host_allowed(app, req.headers.get("host")):
            raise HTTPError(403, "host not allowed")
        origin = req.headers.get("origin")
        if origin is not None:
            if not origin_allowed(app, origin):
                raise HTTPError(403, "origin not allowed")
            extra = cors_headers(req)
        route, req.path_param = find_route(req.path)
        if route is None:
            raise HTTPError(404, "not found: %s" % req.path)
        if req.method == "OPTIONS":
            handler = None
        elif req.method not in route.methods:
            raise HTTPError(405, "method %s not allowed" % req.method)
        else:
            handler = route.methods[req.method]
        check_api_key(req, route)
        expect = req.headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            raise HTTPError(417, "unsupported Expect")
        if framing == "length" and length > route.body_limit:
            raise HTTPError(413, "request body too large (limit %d bytes)" % route.body_limit)
        if handler in GENERATION_HANDLERS:
            ARRIVAL.set(announce_generation())
        if framing != "none" and length != 0 and expect is not None and req.version == "HTTP/1.1":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await drain(writer)
        if not body_read:
            req.body = await conn.read_body(framing, length, route.body_limit)
            body_read = True
        if handler is None:
            resp = preflight(req, route)
        else:
            resp = await run_handler(conn, req, handler)
    except (ConnectionError, asyncio.TimeoutError):
        raise
    except asyncio.CancelledError:
        if req.gone is not None and req.gone.is_set():
            raise ConnectionResetError("client left")
        raise
    except Exception as exc:
        resp = error_response(exc, req)
        if isinstance(exc, HTTPError) and exc.close:
            keep_alive = False
    if not body_read:
        keep_alive = False          # the unread body would be taken for the next request
        conn.unread = True          # ...and is swallowed for a moment before closing
    if app.stopping or (isinstance(resp, StreamResponse) and req.version == "HTTP/1.0"):
        keep_alive = False          # an HTTP/1.0 stream ends by closing
    status = resp.status
    try:
        if isinstance(resp, StreamResponse):
            gone = req.gone or asyncio.Event()
            watcher = asyncio.ensure_future(watch_client(conn, gone, asyncio.current_task()))
            try:
                sent = await write_response(writer, req, resp, keep_alive, extra)
            finally:
                await _stop_watcher(watcher)
        else:
            sent = await write_response(writer, req, resp, keep_alive, extra)
    finally:
        access_log.info('%s "%s %s %s" %d %d %.1fms', req.client, req.method, req.path, req.version,
                        status, sent, (time.monotonic() - started) * 1000)
    return keep_alive


async def run_handler(conn, req, handler):
    """Run a handler in this task; a client that disconnects meanwhile cancels it.

    The watcher that notices the disconnect starts only once the handler has to
    wait (call_soon runs after its first suspension): a handler that answers at
    once (status, version) costs no extra task, which is most of our speed."""
    req.gone = asyncio.Event()
    task = asyncio.current_task()
    watcher = None

    def start_watching():
        nonlocal watcher
        watcher = asyncio.ensure_future(watch_client(conn, req.gone, task))
    pending = asyncio.get_running_loop().call_soon(start_watching)
    try:
        resp = await handler(req)
        if not isinstance(resp, (Response, StreamResponse)):   # a bug: a 500, not a dropped connection
            raise TypeError("handler %s returned %r" % (handler.__name__, type(resp).__name__))
        if isinstance(resp, StreamResponse):
            # Take the first piece before the status line goes out, so an error the
            # engine finds at once (bad model, prompt too long) is a real 4xx.
            resp.first = await anext(resp.chunks, None)
        return resp
    finally:
        pending.cancel()
        if watcher is not None:
            await _stop_watcher(watcher)


async def _stop_watcher(watcher):
    """Cancel a watcher and wait for it, so its pending read is gone before ours."""
    watcher.cancel()
    try:
        await watcher
    except asyncio.CancelledError:
        pass


async def serve_connection(app, reader, writer):
    conn = Connection(reader, writer)
    conn.task = asyncio.current_task()
    app.conns.add(conn)
    peer = writer.get_extra_info("peername")
    client = peer[0] if isinstance(peer, tuple) else str(peer)
    task = asyncio.current_task()
    app.connections.add(task)
    try:
        while not app.stopping:
            req = None
            try:
                head = await conn.read_head()
                if head is None:
                    break
                app.busy.add(task)
                req = parse_head(head)
                req.app, req.client = app, client
            except HTTPError as exc:
                writer.write(head_bytes(exc.status, [("Content-Type", "application/json"),
                                                     ("Content-Length", str(len(json_bytes({"error": exc.message})))),
                                                     ("Connection", "close")]) + json_bytes({"error": exc.message}))
                await drain(writer)
                access_log.info('%s "- - -" %d 0', client, exc.status)
                conn.unread = True
                break
            try:
                again = await handle_one(app, conn, req)
            finally:
                ARRIVAL.set(None)        # one not taken over: the engine stops waiting
            if not again:
                break
            app.busy.discard(task)
        clean = True
    except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, OSError):
        clean = False
    except asyncio.CancelledError:
        clean = False
    except Exception as exc:  # a bug in the wire layer: log, drop this connection only
        log.error("connection error\n%s", "".join(traceback.format_exception(exc)))
        clean = False
    finally:
        app.busy.discard(task)
        app.connections.discard(task)
        app.conns.discard(conn)
    if not clean:
        writer.transport.abort()    # timeouts, resets, stalls: free the socket now, unsent data too
        return
    try:
        if conn.unread and not conn.eof and not app.stopping:
            await lingering_close(conn)
    except (ConnectionError, asyncio.TimeoutError, OSError, asyncio.CancelledError):
        pass
    writer.close()


async def lingering_close(conn):
    """Close after answering without reading the request body (413, 400...).

    Closing a socket with unread input makes the kernel send a reset, which can
    destroy our response before the client reads it. So: send FIN, then swallow
    what the client still sends, bounded by LINGER_TIMEOUT and LINGER_BYTES."""
    conn.writer.write_eof()
    deadline = time.monotonic() + LINGER_TIMEOUT
    taken = 0
    while taken < LINGER_BYTES:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        async with asyncio.timeout(left):
            data = await conn.reader.read(READ_CHUNK)
        if not data:
            return
        taken += len(data)


# ============================================================================
# 16. CLI AND MAIN
# ============================================================================
def default_state_dir():
    return os.environ.get("LOCALAI_STATE_DIR") or str(Path.home() / ".local" / "state" / "localai")


def build_parser():
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="localai.py", description="A local AI server (OpenAI and Ollama APIs).",
        epilog="Timeouts in seconds: LOCALAI_HEADER_TIMEOUT (%g), LOCALAI_BODY_IDLE_TIMEOUT (%g), "
               "LOCALAI_KEEPALIVE_TIMEOUT (%g), LOCALAI_SEND_STALL_TIMEOUT (%g), LOCALAI_DRAIN_TIMEOUT (%g). "
               "Language engine: LOCALAI_LLM_BATCH (streams decoded together, 8), LOCALAI_LLM_QUEUE "
               "(waiting requests before 503, 16), LOCALAI_LLM_MAX_LOADED (models kept, 2), "
               "LOCALAI_MLX_MEMORY_BUDGET (room for float32 weights on a CPU, e.g. 2G), "
               "LOCALAI_MLX_BLAS (auto|openblas|off)."
               % (HEADER_TIMEOUT, BODY_IDLE_TIMEOUT, KEEPALIVE_TIMEOUT, SEND_STALL_TIMEOUT, DRAIN_TIMEOUT))
    p.add_argument("--host", default=env("LOCALAI_HOST", "0.0.0.0"), help="address to bind (LOCALAI_HOST)")
    p.add_argument("--port", type=int, default=env("LOCALAI_PORT", str(DEFAULT_PORT)),  # argparse checks it
                   help="port, 0 for any free one (LOCALAI_PORT)")
    p.add_argument("--no-mdns", action="store_true", default=env("LOCALAI_NO_MDNS", "") not in ("", "0"),
                   help="do not announce with Bonjour (LOCALAI_NO_MDNS=1)")
    p.add_argument("--models-dir", default=env("LOCALAI_MODELS_DIR", str(Path.home() / ".cache" / "localai" / "models")),
                   help="model store (LOCALAI_MODELS_DIR)")
    p.add_argument("--model", default=env("LOCALAI_MODEL"), help="default model (LOCALAI_MODEL)")
    p.add_argument("--api-key", default=env("LOCALAI_API_KEY"), help="require this key (LOCALAI_API_KEY)")
    p.add_argument("--allowed-origins", default=env("LOCALAI_ALLOWED_ORIGINS",
                   "http://localhost,https://localhost,http://127.0.0.1,https://127.0.0.1,http://[::1],https://[::1]"),
                   help="comma-separated browser origins allowed (scheme://host matches any port, "
                        "scheme://host:port that port); * for any (LOCALAI_ALLOWED_ORIGINS)")
    p.add_argument("--allowed-hosts", default=env("LOCALAI_ALLOWED_HOSTS", ""),
                   help="extra Host names accepted besides IPs, localhost and this machine's names; "
                        "* for any (LOCALAI_ALLOWED_HOSTS)")
    p.add_argument("--allow-image-urls", action="store_true",
                   default=env("LOCALAI_ALLOW_IMAGE_URLS", "") not in ("", "0"),
                   help="let requests name http(s) image URLs (LOCALAI_ALLOW_IMAGE_URLS=1)")
    p.add_argument("--media-dir", default=env("LOCALAI_MEDIA_DIR"),
                   help="let requests name image files inside this directory (LOCALAI_MEDIA_DIR)")
    p.add_argument("--stt-model", action="append", default=[p for p in env("LOCALAI_STT_MODEL", "").split(os.pathsep) if p],
                   help="a vosk model directory, or LANG=DIR (repeatable; LOCALAI_STT_MODEL, path-separated)")
    p.add_argument("--state-dir", default=default_state_dir(), help="where settings are kept (LOCALAI_STATE_DIR)")
    p.add_argument("--backlight-root", default=env("LOCALAI_BACKLIGHT_ROOT", "/sys/class/backlight"),
                   help="sysfs backlight directory (LOCALAI_BACKLIGHT_ROOT)")
    p.add_argument("--log-level", default=env("LOCALAI_LOG_LEVEL", "info").lower(),
                   choices=LOG_LEVELS, help="(LOCALAI_LOG_LEVEL)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("import", help="import a GGUF file into the model store")
    s.add_argument("file")
    s.add_argument("--name")
    s = sub.add_parser("pull", help="download an MLX model from the Hugging Face hub")
    s.add_argument("repo")
    s = sub.add_parser("pull-speech", help="download a vosk speech model for a language")
    s.add_argument("lang")
    sub.add_parser("list", help="list installed models")
    return p


def _progress_printer(label, stream=None):
    """progress(fraction, message) callback printing one updating line."""
    stream = stream or sys.stderr
    tty, last = stream.isatty(), [-1]

    def progress(fraction, message):
        pct = int(fraction * 100)
        if tty:
            stream.write("\r%s: %3d%% %-24s" % (label, pct, message[:24]) + ("\n" if pct >= 100 else ""))
        elif pct // 25 != last[0] // 25 or pct >= 100 > last[0]:
            stream.write("%s: %3d%% %s\n" % (label, pct, message))
        last[0] = pct
        stream.flush()
    return progress


def _human_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1000


def cmd_import(config):
    from engines.gguf import import_gguf
    path = import_gguf(config.file, config.models_dir, name=config.name,
                       progress=_progress_printer("importing %s" % Path(config.file).name))
    print("imported %s into %s" % (path.name, path.parent))
    return 0


def cmd_pull(config):
    from engines import hub
    path = hub.pull(config.repo, config.models_dir, progress=True)
    print("pulled %s into %s" % (path.name, path.parent))
    return 0


def cmd_list(config):
    from engines.catalog import Catalog
    models = Catalog(config.models_dir).list()
    if not models:
        print("no models installed in %s (python localai.py import FILE.gguf, or pull REPO)" % config.models_dir)
        return 0
    rows = [("NAME", "FAMILY", "PARAMS", "QUANT", "FORMAT", "CONTEXT", "SIZE", "MODIFIED", "DIGEST")]
    for m in models:
        rows.append((m.id, m.family, m.parameter_size, m.quantization, m.format, str(m.context_length),
                     _human_bytes(m.size), time.strftime("%Y-%m-%d %H:%M", time.localtime(m.modified_at)),
                     m.digest[:12]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_pull_speech(config):
    """Download vosk's small model for a language into vosk's cache (~/.cache/vosk),
    where the server finds it. Offline: one failed connection, a clear message, exit 1."""
    from engines import stt
    path = stt.pull(config.lang, progress=lambda message: print(message, file=sys.stderr))
    print("installed the %s speech model in %s" % (config.lang, path))
    return 0


def prepare_models(app):
    """Start-up hook: import the embedded default when the store is empty.

    A fresh machine then answers chats offline. Runs before we listen (about a
    second); a failure is logged and the server starts anyway. Set
    LOCALAI_NO_AUTO_IMPORT=1 to skip it (tests of an empty store)."""
    if os.environ.get("LOCALAI_NO_AUTO_IMPORT", "") not in ("", "0"):
        return
    from engines import catalog
    if app.catalog.ids() or catalog.embedded_gguf() is None:
        return
    print("localai: no model installed; importing the embedded default %s (first start only)"
          % catalog.EMBEDDED_NAME, flush=True)
    try:
        catalog.ensure_default(app.config.models_dir,
                               progress=_progress_printer("importing %s" % catalog.EMBEDDED_NAME, sys.stdout))
    except (engines.EngineError, OSError) as exc:
        log.error("could not import the embedded default model: %s", getattr(exc, "message", exc))


def lan_addresses():
    """IPv4 addresses other devices can use to reach us (best effort, no packets sent)."""
    found = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(info[4][0])
    except OSError:
        pass
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(("192.0.2.1", 9))       # TEST-NET: connect() on UDP sends nothing
        found.add(probe.getsockname()[0])
        probe.close()
    except OSError:
        pass
    return sorted(a for a in found if not a.startswith("127."))


def announce_engine():
    """Print what the MLX engine chose (device, BLAS, threads) and why; /api/ps has it too.

    Runs in a thread after we listen: setting MLX up takes a moment."""
    try:
        from engines import mlx_setup
        mlx_setup.configure()
        d = mlx_setup.describe()
    except Exception as exc:          # an engine that cannot start is reported by its routes
        log.warning("language engine: %s", exc)
        return
    dtype = ("; models load as float32 within LOCALAI_MLX_MEMORY_BUDGET, decoding and short"
             " prompts from their quantized form (per model: /api/ps)" if d.get("device") == "cpu"
             else "; quantized weights stay quantized")
    print("  language engine:  %s, %s, %s BLAS thread(s)%s"
          % (d.get("device"), d.get("blas"), d.get("blas_threads"), dtype), flush=True)
    for reason in d.get("reasons", []):
        print("    - " + reason, flush=True)


async def serve(config):
    app = App(config)
    prepare_models(app)
    server = await asyncio.start_server(lambda r, w: serve_connection(app, r, w), config.host, config.port,
                                        limit=READ_CHUNK, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    app.port = port
    reaper = asyncio.ensure_future(reap_timeouts(app.conns))
    stop = asyncio.Event()              # handlers first: a signal right after "listening" counts
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("localai %s listening on %s:%d" % (VERSION, config.host, port), flush=True)
    if config.host in ("0.0.0.0", "::", ""):
        for addr in lan_addresses():
            print("  on your network:  http://%s:%d   (OpenAI base_url: http://%s:%d/v1)" % (addr, port, addr, port))
    print("  on this machine:  http://127.0.0.1:%d" % port, flush=True)
    if app.catalog.ids():
        loop.run_in_executor(None, announce_engine)
    advertiser = None
    if not config.no_mdns:
        from engines import mdns
        advertiser = mdns.Advertiser(port, VERSION, host=config.host)
        app.allowed_hosts.add(advertiser.hostname.lower().rstrip("."))
        asyncio.get_running_loop().run_in_executor(None, advertiser.start)
    await stop.wait()
    print("localai: shutting down", flush=True)
    app.stopping = True
    server.close()
    for task in list(app.connections - app.busy):        # idle keep-alive connections
        task.cancel()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while app.busy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for task in list(app.connections):
        task.cancel()
    reaper.cancel()
    if advertiser is not None:
        await loop.run_in_executor(None, advertiser.stop)
    return 0


LOG_LEVELS = ["debug", "info", "warning", "error"]


def use_fast_malloc():
    """Restart this server once with jemalloc as its malloc, when it is installed
    (engines/mlx_setup.allocator_env says why; LOCALAI_MALLOC=system keeps glibc's).
    Same process id, arguments and environment otherwise."""
    from engines import mlx_setup
    env = mlx_setup.allocator_env()
    if env is None:
        return
    args = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
    try:
        os.execve(sys.executable, [sys.executable] + args[1:], env)
    except OSError as exc:                    # keep running on the system malloc
        log.warning("could not restart with jemalloc: %s", exc)


def main(argv=None):
    parser = build_parser()
    config = parser.parse_args(argv)
    if config.log_level not in LOG_LEVELS:           # argparse checks choices on flags, not defaults
        parser.error("LOCALAI_LOG_LEVEL must be one of %s" % ", ".join(LOG_LEVELS))
    # The access log writes a line per request: skip the record fields our format never
    # shows (the logging HOWTO's "Optimization" knobs); a third of the cost of a line.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=getattr(logging, config.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv is None and not config.command:
        use_fast_malloc()
    commands = {"import": cmd_import, "pull": cmd_pull, "list": cmd_list, "pull-speech": cmd_pull_speech}
    if config.command:
        try:
            return commands[config.command](config)
        except engines.EngineError as exc:        # the one place CLI failures become messages
            print("localai: %s failed: %s" % (config.command, exc.message), file=sys.stderr)
        except OSError as exc:
            print("localai: %s failed: %s" % (config.command, exc.strerror or exc), file=sys.stderr)
        return 1
    try:
        return asyncio.run(serve(config))
    except OSError as exc:
        print("localai: cannot listen on %s:%s: %s" % (config.host, config.port, exc.strerror), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
