"""Vision: images in chat and generate, answered by an mlx-vlm model.

The model is tests/tinyvlm.py's tiny random-weight Qwen2-VL, saved into a
temporary store beside SmolLM2 (text only) and served by a real localai process
(--models-dir). Its random weights still prove the plumbing: greedy output is a
deterministic function of the pixels, and the prompt count is exact (a 32x32
image is 16 image tokens plus the vision start/end markers; 16x16 is 4 + 2).
"""
import base64
import dataclasses
import http.client
import http.server
import io
import json
import os
import select
import socket
import threading
import time

import pytest

from conftest import Server
from models_fixture import imported_models_dir

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
pytest.importorskip("mlx_vlm")
from PIL import Image  # noqa: E402  (Pillow comes with mlx-vlm)

import tinyvlm  # noqa: E402

VLM = "tiny-qwen2-vl"
PALI = "tiny-paligemma"      # a second architecture: image tokens before the prompt
TEXT = "smollm2-135m-instruct"
TOKENS_32 = 16 + 2      # 32x32 px -> (32/8)^2 merged patches + <|vision_start|><|vision_end|>
TOKENS_16 = 4 + 2


def png(seed=0, size=(32, 32), fmt="PNG"):
    import random
    rnd = random.Random(seed)
    im = Image.new("RGB", size)
    im.putdata([(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
                for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def b64(data):
    return base64.b64encode(data).decode()


def data_url(data, mime="image/png"):
    return "data:%s;base64,%s" % (mime, b64(data))


def png_header(width, height):
    """A PNG whose IHDR declares width x height (and nothing else to decode)."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


# ---------------------------------------------------------------------------
# fixtures: one store, one server with the flags off, one with them on
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = imported_models_dir(tmp_path_factory.mktemp("vision-models"))
    tinyvlm.build(root / VLM)
    tinyvlm.build_paligemma(root / PALI)
    return root


@pytest.fixture(scope="module")
def server_env_m(tmp_path_factory):
    env = dict(os.environ)
    env.update(LOCALAI_STATE_DIR=str(tmp_path_factory.mktemp("state")),
               LOCALAI_BACKLIGHT_ROOT=str(tmp_path_factory.mktemp("nobl")),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               LOCALAI_IMAGE_FETCH_TIMEOUT="1.5")
    env.pop("LOCALAI_ALLOW_IMAGE_URLS", None)
    env.pop("LOCALAI_MEDIA_DIR", None)
    return env


@pytest.fixture(scope="module")
def srv(store, server_env_m, tmp_path_factory):
    s = Server(["--no-mdns", "--models-dir", str(store)], server_env_m,
               str(tmp_path_factory.mktemp("cwd")))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "cat.png").write_bytes(png(1))
    (d / "sub").mkdir()
    (d / "sub" / "dog.jpg").write_bytes(png(2, fmt="JPEG"))
    (d / "escape.png").symlink_to("/etc/passwd")
    (d / "notes.png").write_bytes(b"this is not an image at all")
    os.mkfifo(d / "pipe.png")
    return d


@pytest.fixture(scope="module")
def srv_open(store, server_env_m, media, tmp_path_factory):
    s = Server(["--no-mdns", "--models-dir", str(store), "--allow-image-urls",
                "--media-dir", str(media)], server_env_m, str(tmp_path_factory.mktemp("cwd2")))
    yield s
    s.stop()


def oa(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def post(server, path, obj, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps(obj).encode()
    conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def err_text(obj):
    e = obj.get("error") if isinstance(obj, dict) else obj
    return (e.get("message") if isinstance(e, dict) else str(e)) or ""


def chat_image(server, image, text="What is in the picture?", max_tokens=8, model=VLM, **kw):
    """/v1/chat/completions with one image part; returns the parsed JSON."""
    status, obj = post(server, "/v1/chat/completions", {
        "model": model, "temperature": 0, "max_tokens": max_tokens, **kw,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": image}]}]})
    return status, obj


def generate_image(server, image, prompt="Describe.", **kw):
    return post(server, "/api/generate", {"model": VLM, "prompt": prompt, "stream": False,
                                          "images": [image], "options": {"temperature": 0,
                                                                         "num_predict": 6}, **kw})


# ---------------------------------------------------------------------------
# the catalog shows vision
# ---------------------------------------------------------------------------
def test_models_list_vision_capability(srv):
    models = {m.id: m for m in oa(srv).models.list().data}
    assert VLM in models and TEXT in models
    caps = models[VLM].model_dump().get("capabilities") or {}
    assert caps.get("vision") is True
    assert not (models[TEXT].model_dump().get("capabilities") or {}).get("vision")
    shown = ollama.Client(host=srv.url).show(VLM)
    assert "vision" in (shown.capabilities or [])
    assert "vision" not in (ollama.Client(host=srv.url).show(TEXT).capabilities or [])


# ---------------------------------------------------------------------------
# images reach the model
# ---------------------------------------------------------------------------
def test_openai_chat_with_data_url_image(srv):
    client = oa(srv)
    msgs = lambda parts: [{"role": "user", "content": parts}]
    text = {"type": "text", "text": "What is in the picture?"}
    with_img = client.chat.completions.create(
        model=VLM, temperature=0, max_tokens=8,
        messages=msgs([text, {"type": "image_url", "image_url": {"url": data_url(png(1))}}]))
    assert with_img.choices[0].message.content
    assert with_img.usage.completion_tokens > 0
    assert with_img.choices[0].finish_reason in ("stop", "length")
    plain = client.chat.completions.create(model=VLM, temperature=0, max_tokens=8,
                                           messages=msgs([text]))
    # the prompt count is the sequence the model reads: image tokens included
    assert with_img.usage.prompt_tokens - plain.usage.prompt_tokens == TOKENS_32
    small = client.chat.completions.create(
        model=VLM, temperature=0, max_tokens=8,
        messages=msgs([text, {"type": "image_url",
                              "image_url": {"url": data_url(png(1, (16, 16)))}}]))
    assert small.usage.prompt_tokens - plain.usage.prompt_tokens == TOKENS_16
    assert with_img.usage.total_tokens == with_img.usage.prompt_tokens + with_img.usage.completion_tokens


def test_seed_string_image_url_form_and_jpeg(srv):
    status, obj = chat_image(srv, data_url(png(3, fmt="JPEG"), "image/jpeg"))
    assert status == 200, obj
    assert obj["usage"]["completion_tokens"] > 0
    # the seed: content may be one part object instead of a list
    status, alone = post(srv, "/v1/chat/completions", {
        "model": VLM, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user",
        "content": {"type": "image_url", "image_url": data_url(png(3))}}]})
    status2, listed = post(srv, "/v1/chat/completions", {
        "model": VLM, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user",
        "content": [{"type": "image_url", "image_url": data_url(png(3))}]}]})
    assert status == status2 == 200, (alone, listed)
    assert alone["usage"] == listed["usage"]
    assert alone["choices"][0]["message"] == listed["choices"][0]["message"]
    # and messages[].images works on the OpenAI route too
    status, side = post(srv, "/v1/chat/completions", {
        "model": VLM, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user",
        "content": "", "images": [b64(png(3))]}]})
    assert status == 200 and side["usage"] == listed["usage"], side


def test_different_images_give_different_greedy_outputs(srv):
    outs = {}
    for seed in (1, 2, 1):
        status, obj = chat_image(srv, data_url(png(seed)), max_tokens=12)
        assert status == 200, obj
        outs.setdefault(seed, []).append(obj["choices"][0]["message"]["content"])
    assert outs[1][0] == outs[1][1]           # deterministic for the same pixels
    assert outs[1][0] != outs[2][0]           # and the pixels change the answer


def test_ollama_generate_with_base64_image(srv):
    client = ollama.Client(host=srv.url)
    r = client.generate(model=VLM, prompt="Describe.", images=[png(1)],
                        options={"temperature": 0, "num_predict": 6})
    assert r.done and r.response
    assert r.eval_count > 0
    plain = client.generate(model=VLM, prompt="Describe.",
                            options={"temperature": 0, "num_predict": 6})
    assert r.prompt_eval_count - plain.prompt_eval_count == TOKENS_32


def test_ollama_chat_message_images(srv):
    client = ollama.Client(host=srv.url)
    r = client.chat(model=VLM, messages=[{"role": "user", "content": "What is it?",
                                          "images": [png(1), png(2, (16, 16))]}],
                    options={"temperature": 0, "num_predict": 5})
    assert r.done and r.message.content
    plain = client.chat(model=VLM, messages=[{"role": "user", "content": "What is it?"}],
                        options={"temperature": 0, "num_predict": 5})
    assert r.prompt_eval_count - plain.prompt_eval_count == TOKENS_32 + TOKENS_16


def test_images_stay_in_their_turns(srv):
    """Each image is placed in the message it came with: swapping the two images
    between the first and the third message changes the answer, and the count
    covers both."""
    client = ollama.Client(host=srv.url)

    def ask(first, second):
        msgs = [{"role": "user", "content": "Look at this.", "images": first},
                {"role": "assistant", "content": "I see it."},
                {"role": "user", "content": "And this one?", "images": second}]
        return client.chat(model=VLM, messages=msgs, options={"temperature": 0, "num_predict": 12})
    a = ask([png(1)], [png(2)])
    b = ask([png(2)], [png(1)])
    none = ask([], [])
    assert a.prompt_eval_count - none.prompt_eval_count == 2 * TOKENS_32
    assert a.message.content != b.message.content
    status, obj = post(srv, "/api/chat", {"model": VLM, "stream": False, "messages": [
        {"role": "assistant", "content": "look", "images": [b64(png(1))]},
        {"role": "user", "content": "hi"}]})
    assert_400(status, obj, "user messages")


def test_second_architecture_paligemma(srv):
    """Same interface, another mlx-vlm family: PaliGemma puts its 16 image tokens,
    then <bos>, before the prompt and a newline after it; it takes one image."""
    client = ollama.Client(host=srv.url)
    opts = {"temperature": 0, "num_predict": 6}
    a = client.generate(model=PALI, prompt="caption en", images=[png(1)], options=opts)
    b = client.generate(model=PALI, prompt="caption en", images=[png(2)], options=opts)
    plain = client.generate(model=PALI, prompt="caption en", options=opts)
    assert a.eval_count == 6 and a.response
    assert a.prompt_eval_count - plain.prompt_eval_count == tinyvlm.PG_IMAGE_TOKENS + 2
    assert a.response != b.response
    status, obj = post(srv, "/api/generate", {"model": PALI, "prompt": "x", "stream": False,
                                              "images": [b64(png(1)), b64(png(2))]})
    assert_400(status, obj, "multi-image")
    assert "vision" in (client.show(PALI).capabilities or [])
    # its prefix attends both ways, so a follow-up never reuses the cache
    for text in ("caption en", "caption es"):
        status, obj = chat_image(srv, data_url(png(1)), text=text, model=PALI)
        assert status == 200, obj
        assert not (obj["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")


def test_prompt_cache_reuses_a_conversation_only_with_the_same_pixels(srv):
    """Turn 2 of a conversation reuses turn 1's KV (cached_tokens > 0) and says
    what a fresh computation says; the same text with another image of the same
    size (identical token ids!) must not reuse it."""
    client = oa(srv)

    def turn2(first_image, answer):
        return client.chat.completions.create(model=VLM, temperature=0, max_tokens=8, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": data_url(first_image)}}]},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Tell me more."}])
    cached = lambda r: (r.usage.prompt_tokens_details.cached_tokens
                        if r.usage.prompt_tokens_details else 0) or 0
    status, one = chat_image(srv, data_url(png(11)), text="What is this?", max_tokens=8)
    answer = one["choices"][0]["message"]["content"]
    warm = turn2(png(11), answer)
    assert cached(warm) > TOKENS_32
    other = turn2(png(12), answer)                  # same ids, other pixels
    assert cached(other) == 0
    # text that spells the image placeholders tokenizes to the very same ids: it
    # must not read the cached image either (the engine drops the cache when the
    # images differ; for Qwen2-VL mlx-vlm's mRoPE priming would refuse it as well)
    forged = "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>What is this?"
    turn2(png(11), answer)                           # the cache holds this conversation
    spoof = client.chat.completions.create(model=VLM, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": forged}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "Tell me more."}])
    assert cached(spoof) == 0
    chat_image(srv, data_url(png(13)), max_tokens=2)  # something else in between
    fresh = turn2(png(11), answer)
    assert cached(fresh) == 0
    assert fresh.choices[0].message.content == warm.choices[0].message.content
    assert fresh.usage.prompt_tokens == warm.usage.prompt_tokens


def test_streaming_with_image(srv):
    client = oa(srv)
    kwargs = dict(model=VLM, temperature=0, max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hi"},
        {"type": "image_url", "image_url": {"url": data_url(png(2))}}]}])
    whole = client.chat.completions.create(**kwargs)
    pieces, usage, finish = [], None, None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                             **kwargs):
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert sum(1 for p in pieces if p) >= 3        # token by token, not one block at the end
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert finish == whole.choices[0].finish_reason
    lines = list(ollama.Client(host=srv.url).generate(
        model=VLM, prompt="Hi", images=[png(2)], stream=True,
        options={"temperature": 0, "num_predict": 6}))
    assert lines[-1].done and lines[-1].eval_count > 0
    assert "".join(p.response for p in lines)


def test_stop_and_max_tokens_with_image(srv):
    status, obj = chat_image(srv, data_url(png(1)), max_tokens=12)
    text = obj["choices"][0]["message"]["content"]
    assert status == 200 and len(text) >= 4
    stop = text[2:4]
    status, cut = chat_image(srv, data_url(png(1)), max_tokens=12, stop=[stop])
    assert status == 200
    assert cut["choices"][0]["message"]["content"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    status, short = chat_image(srv, data_url(png(1)), max_tokens=3)
    assert short["usage"]["completion_tokens"] == 3
    assert short["choices"][0]["finish_reason"] == "length"


def test_text_only_use_of_a_vision_model(srv):
    """A vision model also answers plain chats and raw completions."""
    client = oa(srv)
    r = client.completions.create(model=VLM, prompt="Hello there", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and r.choices[0].text
    assert r.usage.prompt_tokens == len("Hello there".encode())   # byte-level BPE, no merges
    c = client.chat.completions.create(model=VLM, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert c.usage.completion_tokens == 4 and c.choices[0].message.content


def test_n_choices_and_load_unload_for_vision_model(srv):
    client = oa(srv)
    r = client.chat.completions.create(
        model=VLM, n=2, temperature=0.9, seed=7, max_tokens=6,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png(4))}}]}])
    assert len(r.choices) == 2 and all(c.message.content for c in r.choices)
    ol = ollama.Client(host=srv.url)
    ol.generate(model=VLM, keep_alive=-1)                       # empty prompt: load
    assert VLM in [m.model for m in ol.ps().models]
    ol.generate(model=VLM, keep_alive=0)                        # keep_alive 0: unload
    assert VLM not in [m.model for m in ol.ps().models]


# ---------------------------------------------------------------------------
# hostile inputs, flags off
# ---------------------------------------------------------------------------
def assert_400(status, obj, *needles):
    assert status == 400, (status, obj)
    msg = err_text(obj)
    for n in needles:
        assert n.lower() in msg.lower(), msg
    assert "Traceback" not in json.dumps(obj)


def test_invalid_base64(srv):
    assert_400(*generate_image(srv, "!!!!not base64!!!!"), "base64")
    assert_400(*chat_image(srv, "data:image/png;base64,@@@@"), "base64")
    assert_400(*chat_image(srv, {"detail": "high"}), "image")        # no url
    status, obj = post(srv, "/v1/chat/completions", {"model": VLM, "messages": [
        {"role": "user", "content": [{"type": "image", "image": b64(png(1))}]}]})
    assert_400(status, obj, "image_url")                             # never silently dropped
    assert_400(*generate_image(srv, 42), "image")


def test_not_an_image(srv):
    assert_400(*generate_image(srv, b64(b"just some text, not pixels")), "not an image")
    assert_400(*chat_image(srv, data_url(b"GIF8 nope")), "not an image")


def test_truncated_image(srv):
    data = png(5, (32, 32))
    assert_400(*generate_image(srv, b64(data[:len(data) // 2])), "truncated")
    jpg = png(5, fmt="JPEG")
    assert_400(*chat_image(srv, data_url(jpg[:len(jpg) - 200], "image/jpeg")))


def test_pixel_cap_checked_before_decoding(srv):
    # 100000 x 100000 declared: decoding would need 30 GB; the header alone refuses it
    t0 = time.monotonic()
    assert_400(*generate_image(srv, b64(png_header(100000, 100000))), "pixels")
    assert time.monotonic() - t0 < 5
    assert_400(*chat_image(srv, data_url(png_header(5000, 4000))), "pixels")


def test_too_many_images(srv):
    status, obj = post(srv, "/api/generate", {"model": VLM, "prompt": "x", "stream": False,
                                              "images": [b64(png(1))] * 9})
    assert_400(status, obj, "too many images")


def test_image_to_text_only_model(srv):
    status, obj = post(srv, "/v1/chat/completions", {"model": TEXT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": data_url(png(1))}}]}]})
    assert_400(status, obj, TEXT, "does not support images")
    status, obj = post(srv, "/api/generate", {"model": TEXT, "prompt": "hi", "stream": False,
                                              "images": [b64(png(1))]})
    assert_400(status, obj, "does not support images")


def test_body_over_route_limit_is_413(srv):
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n{"
                 % (21 * 1024 * 1024))
    reply = sock.recv(65536)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_paths_are_off_without_media_dir(srv, tmp_path):
    for src in ("/etc/passwd", "file:///etc/passwd", "../../etc/passwd"):
        assert_400(*generate_image(srv, src), "--media-dir")
        assert_400(*chat_image(srv, src), "--media-dir")
    # a FIFO blocks whoever opens it for reading until a writer comes: a prompt
    # answer proves the server never opened it
    fifo = tmp_path / "trap.png"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    assert_400(*generate_image(srv, str(fifo)), "--media-dir")
    assert time.monotonic() - t0 < 5


def test_urls_are_off_without_flag(srv):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]
    try:
        for url in ("http://127.0.0.1:%d/cat.png" % port, "https://127.0.0.1:%d/x" % port):
            assert_400(*chat_image(srv, url), "--allow-image-urls")
            assert_400(*generate_image(srv, url), "--allow-image-urls")
        assert_400(*generate_image(srv, "http://127.0.0.1:1/"), "--allow-image-urls")
        readable, _, _ = select.select([listener], [], [], 0.5)
        assert not readable, "the server connected to the URL although URLs are off"
    finally:
        listener.close()


# ---------------------------------------------------------------------------
# flags on: only the media directory, bounded fetches
# ---------------------------------------------------------------------------
def test_media_dir_files(srv_open, media):
    ok1 = generate_image(srv_open, "cat.png")
    ok2 = generate_image(srv_open, str(media / "cat.png"))
    ok3 = chat_image(srv_open, (media / "sub" / "dog.jpg").as_uri())
    for status, obj in (ok1, ok2, ok3):
        assert status == 200, obj
    direct = generate_image(srv_open, b64(png(1)))
    assert ok1[1]["response"] == ok2[1]["response"] == direct[1]["response"]
    assert ok1[1]["prompt_eval_count"] == direct[1]["prompt_eval_count"]


def test_media_dir_refuses_everything_else(srv_open, media):
    for src in ("/etc/passwd", "file:///etc/passwd", "../../../../etc/passwd",
                "sub/../../outside.png", "escape.png"):
        assert_400(*generate_image(srv_open, src), "outside the media directory")
    assert_400(*generate_image(srv_open, "missing.png"), "not found")
    assert_400(*generate_image(srv_open, "notes.png"), "not an image")
    t0 = time.monotonic()
    assert_400(*generate_image(srv_open, "pipe.png"), "not a regular file")
    assert time.monotonic() - t0 < 5


class _ImageSite:
    """A local HTTP server with good, big, slow and redirecting images."""

    def __init__(self, image):
        site = self
        self.hosts = []

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                site.hosts.append((self.headers.get("Host", ""), self.path))
                port = self.server.server_address[1]
                if self.path == "/cat.png":
                    self._send(200, image)
                elif self.path == "/same":
                    self._redirect("/cat.png")
                elif self.path == "/other":
                    self._redirect("http://localhost:%d/cat.png" % port)
                elif self.path == "/big":
                    self.send_response(200)
                    self.send_header("Content-Length", str(11 * 1024 * 1024))
                    self.end_headers()
                    try:
                        self.wfile.write(image + b"\0" * (11 * 1024 * 1024 - len(image)))
                    except OSError:
                        pass
                elif self.path == "/big-unsized":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    try:
                        for _ in range(200):
                            self.wfile.write(b"\0" * 65536)
                    except OSError:
                        pass
                elif self.path.startswith("/medium"):        # whole image in ~1 s
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    try:
                        self.wfile.write(image[:100])
                        self.wfile.flush()
                        time.sleep(1.0)
                        self.wfile.write(image[100:])
                    except OSError:
                        pass
                elif self.path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    try:
                        for b in image:
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(0.5)
                    except OSError:
                        pass
                else:
                    self._send(404, b"no")

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, loc):
                self.send_response(302)
                self.send_header("Location", loc)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def site():
    s = _ImageSite(png(1))
    yield s
    s.close()


def test_url_fetch_when_enabled(srv_open, site):
    status, obj = generate_image(srv_open, site.url("/cat.png"))
    assert status == 200, obj
    direct = generate_image(srv_open, b64(png(1)))[1]
    assert obj["response"] == direct["response"]
    status, obj = chat_image(srv_open, site.url("/same"))      # same-origin redirect
    assert status == 200, obj
    assert_400(*generate_image(srv_open, site.url("/nothing")), "404")


def test_url_fetch_refuses_redirect_to_another_host(srv_open, site):
    assert_400(*generate_image(srv_open, site.url("/other")), "another host")
    assert all(not h.startswith("localhost") for h, _ in site.hosts), site.hosts


def test_url_fetch_is_bounded(srv_open, site):
    status, obj = generate_image(srv_open, site.url("/big"))
    assert status == 413, obj
    status, obj = generate_image(srv_open, site.url("/big-unsized"))
    assert status == 413, obj
    t0 = time.monotonic()
    assert_400(*generate_image(srv_open, site.url("/slow")), "longer than")
    assert time.monotonic() - t0 < 8          # LOCALAI_IMAGE_FETCH_TIMEOUT=1.5 here
    # the bound is per request, not per image: one 1 s image fits, two do not
    assert generate_image(srv_open, site.url("/medium1"))[0] == 200
    status, obj = post(srv_open, "/api/generate", {
        "model": VLM, "prompt": "x", "stream": False,
        "images": [site.url("/medium1"), site.url("/medium2")]})
    assert_400(status, obj, "longer than")


# ---------------------------------------------------------------------------
# in-process checks of the two engines' edges
# ---------------------------------------------------------------------------
def _declare_huge(fmt, data):
    """Patch the header of a real image so it declares a huge pixel count."""
    import struct
    b = bytearray(data)
    if fmt == "PNG":
        b[16:24] = struct.pack(">II", 60000, 60000)
    elif fmt == "GIF":
        b[6:10] = struct.pack("<HH", 65535, 65535)
    elif fmt == "BMP":
        b[18:26] = struct.pack("<ii", 100000, 100000)
    elif fmt == "JPEG":
        i = 2
        while not (b[i] == 0xFF and 0xC0 <= b[i + 1] <= 0xC3):
            i += 2 + struct.unpack(">H", bytes(b[i + 2:i + 4]))[0]
        b[i + 5:i + 9] = struct.pack(">HH", 65535, 65535)
    elif fmt == "WEBP":
        kind = bytes(b[12:16])
        if kind == b"VP8 ":
            b[26:30] = struct.pack("<HH", 16383, 16383)
        elif kind == b"VP8L":
            bits = int.from_bytes(b[21:25], "little") | (0x3FFF | (0x3FFF << 14))
            b[21:25] = bits.to_bytes(4, "little")
        else:
            b[24:30] = (0xFFFFFF).to_bytes(3, "little") * 2
    return bytes(b)


@pytest.mark.parametrize("fmt,opts", [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("BMP", {}),
                                      ("WEBP", {}), ("WEBP", {"lossless": True})])
def test_image_formats_header_cap_and_truncation(fmt, opts):
    import engines
    from engines import images
    im = Image.new("RGB", (24, 20), (200, 30, 90))
    buf = io.BytesIO()
    im.save(buf, fmt, **opts)
    data = buf.getvalue()
    assert images.validate(data) == (fmt, 24, 20)
    with pytest.raises(engines.BadInput, match="pixels"):
        images.validate(_declare_huge(fmt, data))
    with pytest.raises(engines.BadInput):
        images.validate(data[:len(data) * 2 // 3])
    with pytest.raises(engines.BadInput, match="not an image"):
        images.validate(b"%PDF-1.4 " + data)


def test_engine_cancel_stops_generation(store):
    """A set cancel stops decoding within a token or two, and a queued request
    whose client left never runs."""
    from engines import catalog, vlm
    from engines.llm import GenRequest
    info = catalog.Catalog(store).resolve(VLM)
    req = lambda: GenRequest(model=info, messages=[{"role": "user", "content": "Hi"}],
                             images=[png(1)], image_slots=[0], max_tokens=1500,
                             temperature=0)
    list(vlm.generate(req()))                  # warm: the model is loaded
    before = vlm._WORKER.counters.copy()
    cancel = threading.Event()
    it = vlm.generate(req(), cancel=cancel)    # returns once the prompt is prepared
    cancel.set()
    chunks = list(it)
    assert not any(c.done for c in chunks)
    time.sleep(0.3)
    after = vlm._WORKER.counters
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 100
    # a queued request whose client left never runs: hold the worker with a long
    # request, queue a second one, leave, then let the first finish
    hold = threading.Event()
    long_it = vlm.generate(req(), cancel=hold)
    gone = threading.Event()
    waiter = threading.Thread(target=lambda: list(vlm.generate(req(), cancel=gone)))
    before = vlm._WORKER.counters.copy()
    waiter.start()
    time.sleep(0.2)
    gone.set()
    waiter.join(5)
    assert not waiter.is_alive()
    hold.set()
    list(long_it)
    time.sleep(0.3)
    after = vlm._WORKER.counters
    assert after["cancelled_in_queue"] == before["cancelled_in_queue"] + 1
    assert after["requests"] == before["requests"]
    # the same request uncancelled runs on (so the cut above was the cancel's doing)
    full = list(vlm.generate(dataclasses.replace(req(), max_tokens=200)))[-1]
    assert full.done and (full.completion_tokens == 200 or full.finish_reason == "stop")


def test_hostile_image_bytes_only_ever_give_400s():
    """Every cut and a few thousand random corruptions of real images in each
    format: validation answers BadInput/TooLarge (a 400/413) or accepts a still
    decodable image; nothing else escapes, nothing hangs."""
    import random
    import engines
    from engines import images
    rnd = random.Random(5)
    im = Image.new("RGB", (40, 30))
    im.putdata([(rnd.randrange(256), rnd.randrange(256), 9) for _ in range(1200)])
    t0 = time.monotonic()
    for fmt, opts in (("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}),
                      ("BMP", {}), ("WEBP", {}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        im.save(buf, fmt, **opts)
        data = buf.getvalue()
        cases = [data[:k] for k in range(0, len(data), max(1, len(data) // 200))]
        for _ in range(300):
            b = bytearray(data)
            for _ in range(rnd.randint(1, 8)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            cases.append(bytes(b))
        for case in cases:
            try:
                images.validate(case)
            except (engines.BadInput, engines.TooLarge):
                pass
    assert time.monotonic() - t0 < 60
