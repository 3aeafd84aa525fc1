"""The hand-written multipart/form-data parser, alone and on the wire.

Unit tests call localai.parse_multipart directly (every bound at its limit and
one past it, every prefix of a body, random input); wire tests send raw bytes
over a socket to a real server and check what comes back, including that the
upload arrives byte-identical, that a filename full of ../ and shell
metacharacters creates nothing and runs nothing, and that a 26 MB upload is a
413 after which the server still answers.
"""
import io
import json
import os
import random
import socket
import struct
import wave

import pytest

import localai
from conftest import Server
from localai import HTTPError, parse_multipart

B = "XyZboundary42"
CT = "multipart/form-data; boundary=" + B


def part(name, value, filename=None, content_type=None, extra_headers=()):
    disp = 'form-data; name="%s"' % name
    if filename is not None:
        disp += '; filename="%s"' % filename
    head = ["Content-Disposition: " + disp]
    if content_type:
        head.append("Content-Type: " + content_type)
    head += list(extra_headers)
    if isinstance(value, str):
        value = value.encode()
    return ("\r\n".join(head) + "\r\n\r\n").encode() + value


def body_of(parts, boundary=B, close=True):
    delim = b"--" + boundary.encode()
    out = b"".join(delim + b"\r\n" + p + b"\r\n" for p in parts)
    return out + (delim + b"--\r\n" if close else b"")


def status_of(fn):
    try:
        fn()
    except HTTPError as exc:
        return exc.status
    return 200


def wav_bytes(pcm, rate=16000):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def boundary_laden_pcm(boundary, seconds=1.0):
    """Quiet PCM whose bytes contain the boundary in every form that must NOT
    end the part: bare, after '--', after LF only, and a truncated delimiter."""
    traps = [boundary.encode(), b"--" + boundary.encode(), b"\n--" + boundary.encode(),
             b"\r\n--" + boundary.encode()[:-1], b"\r\n-" + boundary.encode(), b"\r\n\r\n"]
    rng = random.Random(7)
    out = bytearray()
    n = int(seconds * 16000) * 2
    while len(out) < n:
        out += struct.pack("<h", rng.randint(-300, 300)) * 50
        out += rng.choice(traps)
    out = out[:n]
    return bytes(out)


# ---------------------------------------------------------------- unit tests
def test_fields_files_and_byte_identical_data():
    data = bytes(range(256)) * 40 + b"--" + B.encode() + b"\r\n--" + B.encode()[:-1] + b"\n--" + B.encode()
    body = body_of([part("model", "whisper-1"), part("file", data, "a.wav", "audio/wav"),
                    part("timestamp_granularities[]", "word"), part("timestamp_granularities[]", "segment")])
    fields, files = parse_multipart(body, CT)
    assert fields == {"model": ["whisper-1"], "timestamp_granularities[]": ["word", "segment"]}
    f = files["file"][0]
    assert (f.filename, f.content_type, f.data) == ("a.wav", "audio/wav", data)


def test_parts_in_any_order_give_the_same_result():
    parts = [part("model", "m"), part("file", b"\x00\x01", "x.wav"), part("language", "ko")]
    results = set()
    for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0], [1, 2, 0]):
        fields, files = parse_multipart(body_of([parts[i] for i in order]), CT)
        results.add((json.dumps(fields, sort_keys=True), files["file"][0].data))
    assert len(results) == 1


def test_preamble_epilogue_padding_quoting_and_rfc5987_filename():
    body = (b"preamble text\r\n--" + B.encode() + b"  \t\r\n"
            + b'Content-Disposition: form-data; name="file"; filename="a \\"q\\".wav"; '
              b"filename*=UTF-8''%ED%95%9C.wav\r\n\r\nDATA\r\n--" + B.encode() + b"--\r\nepilogue")
    fields, files = parse_multipart(body, 'multipart/form-data; charset=utf-8; boundary="%s"' % B)
    assert files["file"][0].filename == "\ud55c.wav" and files["file"][0].data == b"DATA"
    _, files = parse_multipart(body.replace(b"; filename*=UTF-8''%ED%95%9C.wav", b""), CT)
    assert files["file"][0].filename == 'a "q".wav'


def test_zero_byte_file_and_empty_field():
    fields, files = parse_multipart(body_of([part("file", b"", "e.wav"), part("prompt", "")]), CT)
    assert files["file"][0].data == b"" and fields["prompt"] == [""]


@pytest.mark.parametrize("ct", ["", "application/json", "multipart/form-data", "multipart/form-data; boundary=",
                                "multipart/form-data; boundary=a\x00b", 'multipart/form-data; boundary="abc',
                                "multipart/form-data; boundary=ends-in-space\\ "])
def test_bad_content_types(ct):
    assert status_of(lambda: parse_multipart(body_of([part("a", "b")]), ct)) == 400


def test_boundary_length_limit():
    for n, want in ((localai.MULTIPART_MAX_BOUNDARY, 200), (localai.MULTIPART_MAX_BOUNDARY + 1, 400)):
        b = "b" * n
        body = body_of([part("model", "m")], boundary=b)
        assert status_of(lambda: parse_multipart(body, "multipart/form-data; boundary=" + b)) == want


def test_part_count_limit():
    n = localai.MULTIPART_MAX_PARTS
    assert status_of(lambda: parse_multipart(body_of([part("f%d" % i, "v") for i in range(n)]), CT)) == 200
    assert status_of(lambda: parse_multipart(body_of([part("f%d" % i, "v") for i in range(n + 1)]), CT)) == 400


def test_headers_per_part_limit():
    n = localai.MULTIPART_MAX_PART_HEADERS
    extra = ["X-H%d: v" % i for i in range(n - 1)]       # plus Content-Disposition
    assert status_of(lambda: parse_multipart(body_of([part("a", "b", extra_headers=extra)]), CT)) == 200
    extra.append("X-One-More: v")
    assert status_of(lambda: parse_multipart(body_of([part("a", "b", extra_headers=extra)]), CT)) == 400


def test_part_header_bytes_limit():
    limit = localai.MULTIPART_MAX_PART_HEADER_BYTES
    base = len('Content-Disposition: form-data; name="a"\r\nX-Pad: ')
    ok = part("a", "b", extra_headers=["X-Pad: " + "p" * (limit - base)])
    assert len(ok.split(b"\r\n\r\n")[0]) == limit
    assert status_of(lambda: parse_multipart(body_of([ok]), CT)) == 200
    over = part("a", "b", extra_headers=["X-Pad: " + "p" * (limit - base + 1)])
    assert status_of(lambda: parse_multipart(body_of([over]), CT)) == 400


def test_field_size_limit():
    limit = localai.MULTIPART_MAX_FIELD_BYTES
    fields, _ = parse_multipart(body_of([part("prompt", "p" * limit)]), CT)
    assert len(fields["prompt"][0]) == limit
    assert status_of(lambda: parse_multipart(body_of([part("prompt", "p" * (limit + 1))]), CT)) == 413


def test_file_size_limit():
    limit = localai.MULTIPART_MAX_FILE_BYTES
    data = b"\x00" * limit
    _, files = parse_multipart(body_of([part("file", data, "a.wav")]), CT)
    assert len(files["file"][0].data) == limit
    assert status_of(lambda: parse_multipart(body_of([part("file", data + b"\x00", "a.wav")]), CT)) == 413


@pytest.mark.parametrize("body", [
    body_of([part("a", "b")], close=False),                        # no closing boundary
    body_of([part("a", "b")], close=False)[:-2],                   # ends right after the data
    b"--" + B.encode() + b"\r\n" + part("a", "b"),                 # ends inside the data
    b"no boundary at all",
    b"",
    b"--" + B.encode() + b"\r\nContent-Disposition: form-data; name=\"a\"",   # inside headers
    b"--" + B.encode() + b"X\r\n" + part("a", "b") + b"\r\n--" + B.encode() + b"--",  # bad delimiter line
    body_of([b"Content-Disposition: attachment; name=\"a\"\r\n\r\nb"]),       # not form-data
    body_of([b"Content-Disposition: form-data\r\n\r\nb"]),                    # no name
    body_of([b"Content-Disposition form-data; name=\"a\"\r\n\r\nb"]),         # no colon
    body_of([b" folded: x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nb"]),
    body_of([part("a", b"\xff\xfe")]),                             # field not UTF-8
    body_of([b'Content-Disposition: form-data; name="a"\r\nContent-Disposition: form-data; name="b"\r\n\r\nx']),
], ids=["no-close", "no-close-crlf", "inside-data", "no-boundary", "empty", "inside-headers", "bad-delimiter",
        "not-form-data", "no-name", "no-colon", "folded", "field-not-utf8", "repeated-header"])
def test_malformed_bodies_are_400(body):
    assert status_of(lambda: parse_multipart(body, CT)) == 400


def test_every_prefix_is_a_clean_400_and_whole_body_parses():
    body = body_of([part("model", "m"), part("file", b"abc\r\n--x", "a.wav", "audio/wav")])
    assert status_of(lambda: parse_multipart(body, CT)) == 200
    for i in range(len(body) - len(b"--\r\n")):       # the epilogue CRLF is optional
        try:
            parse_multipart(body[:i], CT)
        except HTTPError as exc:
            assert exc.status == 400, i
        else:
            pytest.fail("prefix of %d bytes parsed" % i)


def test_random_input_never_raises_anything_but_httperror():
    rng = random.Random(1)
    good = body_of([part("model", "m"), part("file", b"data", "a.wav")])
    for _ in range(2000):
        b = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            i = rng.randrange(len(b))
            if op < 0.4:
                b[i] = rng.randrange(256)
            elif op < 0.7:
                del b[i]
            else:
                b.insert(i, rng.choice(b"\r\n-\"; =:"))
        try:
            parse_multipart(bytes(b), CT)
        except HTTPError as exc:
            assert exc.status in (400, 413)


# ---------------------------------------------------------------- wire tests
@pytest.fixture(scope="module")
def srv(server_env, tmp_path_factory):
    """A real server whose cwd and TMPDIR we watch for stray files."""
    cwd = tmp_path_factory.mktemp("cwd")
    tmpdir = tmp_path_factory.mktemp("tmp")
    env = dict(server_env, TMPDIR=str(tmpdir),
               LOCALAI_MODELS_DIR=str(tmp_path_factory.mktemp("empty-models")),
               LOCALAI_NO_AUTO_IMPORT="1")
    server = Server(["--no-mdns"], env, str(cwd))
    server.cwd, server.tmpdir = cwd, tmpdir
    yield server
    server.stop()


def raw_post(port, body, content_type=CT, headers=(), send_body=True):
    """POST /v1/audio/transcriptions as raw bytes; -> (status, headers, body bytes)."""
    head = ["POST /v1/audio/transcriptions HTTP/1.1", "Host: 127.0.0.1",
            "Content-Type: " + content_type, "Content-Length: %d" % len(body), "Connection: close", *headers]
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if send_body:
            try:
                s.sendall(body)
            except (BrokenPipeError, ConnectionResetError):
                pass                      # the server may answer 413 and close early
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, hdrs, payload


def form(*parts, boundary=B):
    return body_of(list(parts), boundary=boundary)


def error_of(payload):
    err = json.loads(payload)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def alive(port):
    st, _, _ = raw_post(port, form(part("model", "m"), part("file", wav_bytes(b"\0\0" * 4000), "s.wav")))
    return st == 200


def test_wire_wav_with_boundary_inside_arrives_byte_identical(srv):
    pcm = boundary_laden_pcm(B, seconds=1.5)
    assert B.encode() in pcm and (b"--" + B.encode()) in pcm
    wav = wav_bytes(pcm)
    st, hdr, payload = raw_post(srv.port, form(part("model", "whisper-1"), part("file", wav, "x.wav", "audio/wav"),
                                               part("response_format", "verbose_json")))
    assert st == 200, payload
    out = json.loads(payload)
    assert out["duration"] == round(len(pcm) / 32000, 3) == 1.5


def test_wire_parts_in_any_order(srv):
    wav = wav_bytes(boundary_laden_pcm(B, seconds=0.7))
    ps = [part("model", "m"), part("file", wav, "o.wav"), part("response_format", "verbose_json"),
          part("language", "ko")]
    seen = set()
    for order in ([0, 1, 2, 3], [1, 2, 3, 0], [3, 2, 1, 0]):
        st, _, payload = raw_post(srv.port, form(*[ps[i] for i in order]))
        assert st == 200, payload
        seen.add(json.loads(payload)["duration"])
    assert seen == {0.7}


def test_wire_duplicate_fields(srv):
    wav = wav_bytes(b"\0\0" * 8000)
    st, _, payload = raw_post(srv.port, form(part("model", "a"), part("model", "b"), part("file", wav, "a.wav")))
    assert st == 400 and error_of(payload)["param"] == "model"
    st, _, payload = raw_post(srv.port, form(part("model", "a"), part("file", wav, "a.wav"), part("file", wav, "b.wav")))
    assert st == 400 and error_of(payload)["param"] == "file"
    # repeated timestamp_granularities[] are the documented way to ask for both
    st, _, payload = raw_post(srv.port, form(part("model", "a"), part("file", wav, "a.wav"),
                                             part("response_format", "verbose_json"),
                                             part("timestamp_granularities[]", "word"),
                                             part("timestamp_granularities[]", "segment")))
    assert st == 200 and {"words", "segments"} <= set(json.loads(payload))


@pytest.mark.parametrize("filename,data", [
    ("empty.wav", b""),
    ("noise.wav", random.Random(3).randbytes(20000)),
    ("noise.mp3", random.Random(4).randbytes(20000)),
    ("noise.ogg", b"OggS" + random.Random(5).randbytes(5000)),
    ("fake.wav", b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + b"\xff" * 40),
], ids=["empty-wav", "noise-wav", "noise-mp3", "noise-ogg", "bad-riff"])
def test_wire_not_audio_is_400_invalid_audio(srv, filename, data):
    st, _, payload = raw_post(srv.port, form(part("model", "m"), part("file", data, filename)))
    assert st == 400, payload
    assert error_of(payload)["message"].startswith("invalid audio")
    assert alive(srv.port)


def test_wire_unsupported_extension(srv):
    st, _, payload = raw_post(srv.port, form(part("model", "m"), part("file", b"abc", "x.exe")))
    assert st == 400 and "supported" in error_of(payload)["message"]


def test_wire_hostile_filename_creates_nothing_runs_nothing(srv, tmp_path):
    marker = tmp_path / "pwned"
    pcm = b"\0\0" * 8000
    names = [
        "../../../../../../%s.wav" % marker,
        "../../etc/passwd;touch %s;x.wav" % marker,
        "$(touch %s)`touch %s`|touch %s&&touch %s.wav" % (marker, marker, marker, marker),
        "..\\..\\..\\windows\\x.wav",
        "'; touch %s; echo '.mp3" % marker,
        "-i /etc/passwd -y %s.mp3" % marker,
    ]
    mp3 = None
    for name in names:
        data = wav_bytes(pcm)
        if name.endswith(".mp3"):
            if mp3 is None:
                mp3 = _ffmpeg_mp3(tmp_path, pcm)
            data = mp3
        st, _, payload = raw_post(srv.port, form(part("model", "m"), part("file", data, name.replace('"', "%22"))))
        assert st == 200, (name, payload)
    assert not marker.exists() and not list(tmp_path.glob("pwned*"))
    assert list(srv.cwd.iterdir()) == []
    assert list(srv.tmpdir.iterdir()) == []            # decoder temp files are removed


def _ffmpeg_mp3(tmp_path, pcm):
    import subprocess
    src = tmp_path / "src.wav"
    src.write_bytes(wav_bytes(pcm))
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), str(tmp_path / "src.mp3")], check=True)
    return (tmp_path / "src.mp3").read_bytes()


def test_wire_missing_closing_boundary(srv):
    body = form(part("model", "m"), part("file", wav_bytes(b"\0\0" * 800), "a.wav"))
    st, _, payload = raw_post(srv.port, body[:-len(b"--" + B.encode() + b"--\r\n")])
    assert st == 400 and "closing boundary" in error_of(payload)["message"]


def test_wire_boundary_and_part_limits(srv):
    wav = wav_bytes(b"\0\0" * 800)
    for n, want in ((localai.MULTIPART_MAX_BOUNDARY, 200), (localai.MULTIPART_MAX_BOUNDARY + 1, 400)):
        b = "-" * (n - 1) + "q"
        st, _, payload = raw_post(srv.port, form(part("model", "m"), part("file", wav, "a.wav"), boundary=b),
                                  content_type="multipart/form-data; boundary=" + b)
        assert st == want, payload
    n = localai.MULTIPART_MAX_PARTS
    for count, want in ((n, 200), (n + 1, 400)):
        extra = [part("x%d" % i, "v") for i in range(count - 2)]
        st, _, payload = raw_post(srv.port, form(part("model", "m"), *extra, part("file", wav, "a.wav")))
        assert st == want, payload
    limit = localai.MULTIPART_MAX_FIELD_BYTES
    for size, want in ((limit, 200), (limit + 1, 413)):
        st, _, payload = raw_post(srv.port, form(part("model", "m"), part("prompt", "p" * size), part("file", wav, "a.wav")))
        assert st == want, payload
    n = localai.MULTIPART_MAX_PART_HEADERS                  # header lines of the file part
    for count, want in ((n, 200), (n + 1, 400)):
        extra = ["X-H%d: v" % i for i in range(count - 2)]   # + Content-Disposition, Content-Type
        st, _, payload = raw_post(srv.port, form(part("model", "m"), part("file", wav, "a.wav", "audio/wav", extra)))
        assert st == want, payload
    limit = localai.MULTIPART_MAX_PART_HEADER_BYTES          # bytes of the file part's header block
    base = len('Content-Disposition: form-data; name="file"; filename="a.wav"\r\nX-Pad: ')
    for size, want in ((limit, 200), (limit + 1, 400)):
        p = part("file", wav, "a.wav", extra_headers=["X-Pad: " + "p" * (size - base)])
        assert len(p.split(b"\r\n\r\n")[0]) == size
        st, _, payload = raw_post(srv.port, form(part("model", "m"), p))
        assert st == want, payload


def test_wire_file_limit_and_26mb_upload(srv):
    limit = localai.MULTIPART_MAX_FILE_BYTES
    junk = b"\x01" * limit                         # at the limit: parsed, then not audio
    st, _, payload = raw_post(srv.port, form(part("model", "m"), part("file", junk, "a.wav")))
    assert st == 400 and error_of(payload)["message"].startswith("invalid audio")
    st, _, payload = raw_post(srv.port, form(part("model", "m"), part("file", junk + b"\x01", "a.wav")))
    assert st == 413, payload
    st, _, payload = raw_post(srv.port, form(part("model", "m"), part("file", b"\x02" * (26 * 1024 * 1024), "b.wav")))
    assert st == 413 and error_of(payload)["type"] == "invalid_request_error"
    # past the 30 MB route limit the server refuses before reading the body
    st, _, payload = raw_post(srv.port, b"x" * (31 * 1024 * 1024), send_body=False)
    assert st == 413
    assert alive(srv.port)


def test_wire_not_multipart(srv):
    st, _, payload = raw_post(srv.port, b'{"model": "m"}', content_type="application/json")
    assert st == 400 and "multipart" in error_of(payload)["message"]
