"""Image inputs: turn what a client sent into validated image bytes.

(issue 5) Knows nothing of HTTP requests; raises engines errors.

    load(source, media_dir=None, allow_urls=False, cancel=None) -> bytes
    load_all(sources, ...) -> [bytes]    the images of one request (one time budget)
    check_count(n)                       BadInput past MAX_IMAGES
    validate(data) -> (format, width, height)

A source is a string, one of:
    data:image/png;base64,....   a data URL (always allowed)
    iVBORw0KGgo...               bare base64 (Ollama's ``images``; always allowed)
    http(s)://host/x.png         only with allow_urls (--allow-image-urls): one GET,
                                 bounded in bytes and seconds, redirects followed
                                 only on the same scheme, host and port
    /path/x.png, file:///path    only with media_dir (--media-dir), and only a
                                 regular file inside that directory (after
                                 resolving symlinks and "..")
When a kind is not enabled, nothing is opened or fetched: the error names the
flag. Every image is then checked: a known magic number (PNG, JPEG, GIF, WebP,
BMP), the pixel count declared in its header read BEFORE anything is decoded,
and a full decode (Pillow, imported lazily) so truncated files are refused.
"""
import base64
import binascii
import re
import struct
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import BadInput, TooLarge, Unavailable

MAX_IMAGES = 8                      # per request; Ollama/OpenAI clients send 1-4, each
                                    #   image costs hundreds of tokens and a decode
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # encoded size of one image (the chat body limit is
                                    #   20 MiB; OpenAI caps image inputs around 20 MB)
MAX_IMAGE_PIXELS = 4096 * 4096      # declared width*height, checked before decoding: a
                                    #   4096^2 RGB decode is 48 MiB; Pillow only warns at 89M
def _env_float(name, default):
    import os
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


FETCH_TIMEOUT = _env_float("LOCALAI_IMAGE_FETCH_TIMEOUT", 10.0)
                                    # seconds for a whole URL fetch (connect + body);
                                    #   the environment override lets tests shorten it
MAX_REDIRECTS = 3                   # same-origin redirects followed by a URL fetch
MAX_SOURCE_PATH = 4096              # PATH_MAX: a longer "path" is not a path
READ_BLOCK = 64 * 1024

FORMATS = "PNG, JPEG, GIF, WebP or BMP"
_B64_RE = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")
_B64URL_RE = re.compile(rb"^[A-Za-z0-9_-]*={0,2}$")
_URLSAFE = bytes.maketrans(b"-_", b"+/")
_WS = re.compile(r"\s+")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")


# ---------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------
def check_count(n):
    if n > MAX_IMAGES:
        raise BadInput("too many images: %d (at most %d per request)" % (n, MAX_IMAGES),
                       param="images")


def load_all(sources, media_dir=None, allow_urls=False, cancel=None):
    """Validated bytes of every source, in order; URL fetches share one
    FETCH_TIMEOUT between them (a request's images cannot take 8x the bound)."""
    check_count(len(sources))
    deadline = time.monotonic() + FETCH_TIMEOUT
    out = []
    for src in sources:
        if cancel is not None and cancel.is_set():
            raise BadInput("cancelled")
        out.append(load(src, media_dir, allow_urls, cancel, deadline=deadline))
    return out


def load(source, media_dir=None, allow_urls=False, cancel=None, deadline=None):
    """Bytes of one validated image named by ``source`` (see the module docstring)."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif not isinstance(source, str):
        raise BadInput("an image must be a string (data URL, base64, URL or path)",
                       param="images")
    else:
        data = _fetch(source.strip(), media_dir, allow_urls, cancel, deadline)
    if len(data) > MAX_IMAGE_BYTES:
        raise TooLarge("image is %d bytes; the limit is %d" % (len(data), MAX_IMAGE_BYTES))
    validate(data)
    return data


def _fetch(s, media_dir, allow_urls, cancel, deadline=None):
    low = s[:16].lower()
    if low.startswith("data:"):
        return _data_url(s)
    if low.startswith(("http://", "https://")):
        if not allow_urls:
            raise BadInput("image URLs are disabled on this server (start it with "
                           "--allow-image-urls to fetch http(s) images)", param="images")
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        return fetch_url(s, cancel=cancel, timeout=timeout)
    if low.startswith("file:"):
        return _read_path(unquote(urlsplit(s).path), media_dir, s)
    if "://" in s[:32] and len(s) < MAX_SOURCE_PATH:
        raise BadInput("unsupported image URL scheme (use a data: URL, base64, "
                       "http(s) with --allow-image-urls, or a path with --media-dir)",
                       param="images")
    raw = _b64(s)
    # "/etc/passwd" is also valid base64: a path-like string is a path unless it
    # decodes to something with an image magic number ("/9j/..." is a JPEG).
    if _looks_like_path(s) and (raw is None or not _has_magic(raw)):
        return _read_path(s, media_dir, s)
    if raw is not None:
        return raw
    raise BadInput("invalid base64 image data", param="images")


def _has_magic(data):
    try:
        sniff(data[:64])
        return True
    except BadInput as e:
        return not e.message.startswith("not an image")


# ---------------------------------------------------------------------------
# data URLs and base64
# ---------------------------------------------------------------------------
def _b64(s):
    """Decoded bytes if ``s`` is valid standard base64 (whitespace ignored), else None."""
    if len(s) > (MAX_IMAGE_BYTES + 2) // 3 * 4 + len(s) // 64 + 4:   # + line breaks
        raise TooLarge("image is over the limit of %d bytes" % MAX_IMAGE_BYTES)
    t = _WS.sub("", s).encode("ascii", "replace")
    if t and _B64URL_RE.match(t) and not _B64_RE.match(t):
        t = t.translate(_URLSAFE)     # the URL-safe alphabet (-_) some clients send
    if not t or not _B64_RE.match(t):
        return None
    if len(t) % 4:
        if len(t) % 4 == 1:
            return None
        t += b"=" * (-len(t) % 4)     # tolerate clients that drop the padding
    try:
        return base64.b64decode(t, validate=True)
    except (binascii.Error, ValueError):
        return None


def _data_url(s):
    head, sep, payload = s.partition(",")
    if not sep:
        raise BadInput("invalid data URL: no comma", param="image_url")
    params = head[5:].split(";")
    mediatype = params[0].strip().lower()
    if mediatype and not mediatype.startswith("image/"):
        raise BadInput("data URL is %r, not an image" % mediatype[:40], param="image_url")
    if "base64" in (p.strip().lower() for p in params[1:]):
        raw = _b64(payload)
        if raw is None:
            raise BadInput("invalid base64 in image data URL", param="image_url")
        return raw
    from urllib.parse import unquote_to_bytes
    return unquote_to_bytes(payload)


def _looks_like_path(s):
    if len(s) > MAX_SOURCE_PATH or "\n" in s or "\x00" in s:
        return False
    return s.startswith(("/", "./", "../", "~")) or s.lower().endswith(_IMAGE_EXT)


# ---------------------------------------------------------------------------
# files (only inside media_dir)
# ---------------------------------------------------------------------------
def _read_path(path, media_dir, shown):
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    if not media_dir:
        raise BadInput("image file paths are disabled on this server (start it with "
                       "--media-dir DIR to allow image files inside DIR)", param="images")
    if "\x00" in path:
        raise BadInput("invalid image path", param="images")
    base = Path(media_dir).resolve()
    p = Path(path).expanduser() if path.startswith("~") else Path(path)
    try:
        target = (base / p).resolve()          # an absolute p replaces base
    except (OSError, RuntimeError):
        raise BadInput("invalid image path", param="images")
    if target != base and base not in target.parents:
        raise BadInput("image path %r is outside the media directory" % shown,
                       param="images")
    try:
        st = target.stat()
    except OSError:
        raise BadInput("image file %r not found in the media directory" % shown,
                       param="images")
    import stat as _stat
    if not _stat.S_ISREG(st.st_mode):          # never open FIFOs, devices, directories
        raise BadInput("image path %r is not a regular file" % shown, param="images")
    if st.st_size > MAX_IMAGE_BYTES:
        raise TooLarge("image file is %d bytes; the limit is %d" % (st.st_size, MAX_IMAGE_BYTES))
    with open(target, "rb") as f:
        return f.read(MAX_IMAGE_BYTES + 1)


# ---------------------------------------------------------------------------
# http(s) URLs (only with allow_urls)
# ---------------------------------------------------------------------------
def fetch_url(url, cancel=None, timeout=None, limit=MAX_IMAGE_BYTES):
    """GET ``url``: at most ``limit`` bytes within ``timeout`` seconds in all;
    redirects only to the same scheme, host and port (at most MAX_REDIRECTS)."""
    import http.client
    import socket
    timeout = FETCH_TIMEOUT if timeout is None else timeout
    if timeout <= 0:
        raise BadInput("image URLs took longer than %g s in all; refused" % FETCH_TIMEOUT,
                       param="image_url")
    deadline = time.monotonic() + timeout
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(host, port, timeout=max(0.1, deadline - time.monotonic()))
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        try:
            conn.request("GET", target, headers={"User-Agent": "localai",
                                                 "Accept": "image/*"})
            sock = conn.sock        # kept: http.client drops it for "Connection: close"
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.getheader("Location") or ""
                from urllib.parse import urljoin
                url = urljoin(url, loc)
                if _origin(url) != origin:
                    raise BadInput("image URL redirects to another host; refused",
                                   param="image_url")
                continue
            if resp.status != 200:
                raise BadInput("image URL answered HTTP %d" % resp.status, param="image_url")
            declared = resp.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise TooLarge("image at URL is %s bytes; the limit is %d" % (declared, limit))
            chunks, total = [], 0
            while True:
                if cancel is not None and cancel.is_set():
                    raise BadInput("cancelled")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BadInput("image URL took longer than %g s; refused" % timeout,
                                   param="image_url")
                sock.settimeout(left)
                block = resp.read1(READ_BLOCK) if hasattr(resp, "read1") else resp.read(READ_BLOCK)
                if not block:
                    break
                total += len(block)
                if total > limit:
                    raise TooLarge("image at URL is over the limit of %d bytes" % limit)
                chunks.append(block)
            return b"".join(chunks)
        except (socket.timeout, TimeoutError):
            raise BadInput("image URL took longer than %g s; refused" % timeout,
                           param="image_url")
        except (OSError, http.client.HTTPException) as e:
            raise BadInput("could not fetch image URL (%s)" % type(e).__name__,
                           param="image_url")
        finally:
            conn.close()
    raise BadInput("image URL redirects too many times", param="image_url")


def _origin(url):
    p = urlsplit(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise BadInput("image URL must be http(s)://host/...", param="image_url")
    try:
        port = p.port or (443 if p.scheme == "https" else 80)
    except ValueError:
        raise BadInput("invalid port in image URL", param="image_url")
    return p.scheme, p.hostname.lower(), port


# ---------------------------------------------------------------------------
# validation: magic number, declared size (before decoding), full decode
# ---------------------------------------------------------------------------
def sniff(data):
    """(format, width, height) from the header alone; BadInput if not an image we
    take or if the header is cut short."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise BadInput("truncated PNG image", param="images")
        w, h = struct.unpack(">II", data[16:24])
        return "PNG", w, h
    if data[:3] == b"\xff\xd8\xff":
        return ("JPEG",) + _jpeg_size(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        if len(data) < 10:
            raise BadInput("truncated GIF image", param="images")
        w, h = struct.unpack("<HH", data[6:10])
        return "GIF", w, h
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP",) + _webp_size(data)
    if data[:2] == b"BM":
        if len(data) < 26:
            raise BadInput("truncated BMP image", param="images")
        dib = struct.unpack("<I", data[14:18])[0]
        if dib == 12:
            w, h = struct.unpack("<HH", data[18:22])
        else:
            w, h = struct.unpack("<ii", data[18:26])
        return "BMP", abs(w), abs(h)
    raise BadInput("not an image (expected %s)" % FORMATS, param="images")


def _jpeg_size(data):
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise BadInput("corrupt JPEG image", param="images")
        marker = data[i + 1]
        if marker == 0xFF:                       # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD8:   # no length
            i += 2
            continue
        if marker == 0xD9:
            break
        seg = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + seg
    raise BadInput("truncated JPEG image (no frame header)", param="images")


def _webp_size(data):
    if len(data) < 30:
        raise BadInput("truncated WebP image", param="images")
    kind = data[12:16]
    if kind == b"VP8X":
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return w, h
    if kind == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise BadInput("corrupt WebP image", param="images")
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L":
        if data[20] != 0x2F:
            raise BadInput("corrupt WebP image", param="images")
        b = int.from_bytes(data[21:25], "little")
        return 1 + (b & 0x3FFF), 1 + ((b >> 14) & 0x3FFF)
    raise BadInput("unsupported WebP image", param="images")


def validate(data):
    """(format, width, height) of a complete, decodable image within the caps."""
    fmt, w, h = sniff(data)
    if w <= 0 or h <= 0:
        raise BadInput("image has no pixels (%dx%d)" % (w, h), param="images")
    if w * h > MAX_IMAGE_PIXELS:
        raise BadInput("image is %dx%d = %d pixels; the limit is %d"
                       % (w, h, w * h, MAX_IMAGE_PIXELS), param="images")
    decode(data, fmt)
    return fmt, w, h


def decode(data, fmt=None):
    """A fully loaded RGB PIL image (Pillow imported here, on first use)."""
    import io
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise Unavailable("image decoding needs Pillow (it comes with mlx-vlm: "
                          "pip install mlx-vlm)")
    if fmt is None:
        fmt, w, h = sniff(data)
        if w * h > MAX_IMAGE_PIXELS:
            raise BadInput("image over the pixel limit", param="images")
    # (no warnings.catch_warnings here: it is process-global and not thread-safe;
    # our pixel cap is far below Pillow's DecompressionBombWarning threshold anyway)
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
        if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:   # Pillow's own view of the size
            raise BadInput("image over the pixel limit", param="images")
        im.load()                                # truncated data fails here
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")
    except BadInput:
        raise
    except Exception as e:       # Pillow raises many types on hostile input; all are 400s
        msg = str(e).lower()
        what = "truncated" if ("truncated" in msg or "eof" in msg or "broken" in msg) \
            else "corrupt"
        raise BadInput("%s %s image" % (what, fmt), param="images")
