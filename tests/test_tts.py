"""Text to speech (issue 7) through a real server: /v1/audio/speech, voices, models.

Every format the server returns is decoded (the standard library for wav and
pcm, ffprobe/ffmpeg for the rest) and must hold real speech of the expected
length; speed must change the duration in proportion; voices must differ; the
same request must give the same bytes; a Korean sentence must come back from the
Korean speech-to-text model as text.
"""
import array
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import wave
from io import BytesIO

import pytest

from engines import tts

SENTENCE = "Hello from local text to speech. The quick brown fox jumps over the lazy dog."
KOREAN = "안녕하세요. 오늘 날씨가 정말 좋습니다. 만나서 반갑습니다."
RATE = 24000

# format -> (content type, ffprobe codec, ffprobe container)
EXPECTED = {
    "mp3": ("audio/mpeg", "mp3", "mp3"),
    "opus": ("audio/ogg; codecs=opus", "opus", "ogg"),
    "aac": ("audio/aac", "aac", "aac"),
    "flac": ("audio/flac", "flac", "flac"),
    "wav": ("audio/wav", None, None),
    "pcm": ("audio/pcm", None, None),
}


@pytest.fixture(scope="module")
def server(module_server):
    return module_server


def post_speech(server, body, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", "/v1/audio/speech", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def speech(server, text=SENTENCE, **fields):
    body = {"model": "tts-1", "input": text, "voice": "alloy"}
    body.update(fields)
    status, headers, data = post_speech(server, body)
    assert status == 200, data[:500]
    return headers, data


def get_json(server, path):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), json.loads(resp.read())
    finally:
        conn.close()


def wav_samples(data):
    """(sample rate, samples) of a WAV file, with the standard library only."""
    with wave.open(BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getcomptype()) == (1, 2, "NONE")
        frames = w.readframes(w.getnframes())
        assert len(frames) == w.getnframes() * 2, "header length disagrees with the data"
        return w.getframerate(), array.array("h", frames)


def pcm_samples(data):
    assert len(data) % 2 == 0, "s16le mono needs whole samples"
    samples = array.array("h")
    samples.frombytes(data)
    if sys.byteorder == "big":  # the data is little-endian
        samples.byteswap()
    return samples


def rms(samples):
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))


def probe(data, suffix):
    """ffprobe facts plus a full ffmpeg decode (errors fatal) of an encoded file."""
    with tempfile.NamedTemporaryFile(suffix="." + suffix) as f:
        f.write(data)
        f.flush()
        out = subprocess.run(["ffprobe", "-v", "error", "-of", "json",
                              "-show_entries", "stream=codec_name,sample_rate,channels:format=format_name",
                              "-show_entries", "packet=duration_time", f.name],
                             capture_output=True, timeout=60)
        assert out.returncode == 0 and not out.stderr, out.stderr
        info = json.loads(out.stdout)
        dec = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-xerror", "-i", f.name,
                              "-f", "s16le", "-ac", "1", "-ar", str(RATE), "-"],
                             capture_output=True, timeout=60)
        assert dec.returncode == 0 and not dec.stderr, dec.stderr
    (stream,) = info["streams"]
    duration = sum(float(p["duration_time"]) for p in info["packets"] if "duration_time" in p)
    return stream, info["format"]["format_name"], duration, pcm_samples(dec.stdout)


def duration_of(server, text=SENTENCE, **fields):
    _, data = speech(server, text, response_format="wav", **fields)
    rate, samples = wav_samples(data)
    return len(samples) / rate


# ---------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(EXPECTED))
def test_every_format_decodes_to_speech(server, fmt):
    headers, data = speech(server, response_format=fmt, voice="nova")
    content_type, codec, container = EXPECTED[fmt]
    assert headers["Content-Type"] == content_type
    assert headers["X-Sample-Rate"] == str(RATE)
    if fmt == "wav":
        rate, samples = wav_samples(data)
        assert rate == RATE
        duration = len(samples) / rate
    elif fmt == "pcm":
        assert (headers["X-Sample-Format"], headers["X-Channels"]) == ("s16le", "1")
        samples = pcm_samples(data)
        duration = len(samples) / RATE
    else:
        stream, format_name, duration, samples = probe(data, fmt)
        assert stream["codec_name"] == codec and stream["channels"] == 1
        assert container in format_name.split(",")
        # Opus always decodes at 48 kHz; the others keep the 24 kHz we encode.
        assert int(stream["sample_rate"]) == (48000 if fmt == "opus" else RATE)
        assert abs(len(samples) / RATE - duration) < 0.2     # the decode agrees with the packets
    assert 0.3 < duration < 30, duration
    assert rms(samples) > 300, "no speech in the audio (silence)"


def test_default_format_is_mp3(server):
    status, headers, data = post_speech(server, {"model": "tts-1", "input": "Hello there.", "voice": "echo"})
    assert status == 200 and headers["Content-Type"] == "audio/mpeg"
    stream, _, duration, _ = probe(data, "mp3")
    assert stream["codec_name"] == "mp3" and duration > 0.3


def test_same_request_gives_the_same_bytes_in_every_format(server):
    for fmt in EXPECTED:
        first = speech(server, voice="shimmer", response_format=fmt, speed=1.3)[1]
        other = speech(server, "Something else entirely, said in between.", voice="onyx", response_format=fmt)[1]
        again = speech(server, voice="shimmer", response_format=fmt, speed=1.3)[1]
        assert first == again, fmt
        assert first != other, fmt


def test_concurrent_requests_are_identical_to_a_lone_one(server):
    body = {"model": "tts-1", "input": SENTENCE, "voice": "fable", "response_format": "pcm"}
    lone = post_speech(server, body)[2]
    results = [None] * 4

    def run(i):
        results[i] = post_speech(server, body)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r[0] == 200 and r[2] == lone for r in results)


# ---------------------------------------------------------------------------
# speed and voices
# ---------------------------------------------------------------------------
def test_speed_changes_duration_in_proportion_over_the_whole_range(server):
    base = duration_of(server, speed=1.0)
    assert base > 1.0
    ratios = {s: duration_of(server, speed=s) / base for s in (0.25, 0.5, 2.0, 4.0)}
    assert ratios[2.0] <= 0.6, ratios
    assert ratios[0.5] >= 1.6, ratios
    # The ends are beyond espeak's own rate range: they must still scale, not clamp.
    assert ratios[4.0] <= 0.3, ratios
    assert ratios[0.25] >= 3.2, ratios
    assert duration_of(server, speed=1) == base            # an integer speed is a number too


def test_voices_endpoint_lists_distinct_voices_that_speech_accepts(server):
    status, content_type, body = get_json(server, "/v1/audio/voices")
    assert status == 200 and content_type.startswith("application/json")
    ids = [v["id"] for v in body["voices"]]
    assert all(isinstance(v["name"], str) and v["name"] for v in body["voices"])
    for seed_voice in ("alloy", "echo", "fable", "onyx", "nova", "shimmer"):
        assert seed_voice in ids
    audio = {vid: speech(server, "Testing one two three.", voice=vid, response_format="pcm")[1] for vid in ids}
    assert len(set(audio.values())) == len(ids), "two voices gave identical audio"


def test_voice_names_are_case_insensitive(server):
    assert speech(server, "Hi.", voice="Nova", response_format="pcm")[1] == \
        speech(server, "Hi.", voice="nova", response_format="pcm")[1]


def test_models_endpoint(server):
    status, _, body = get_json(server, "/v1/audio/models")
    assert status == 200
    ids = [m["id"] for m in body["models"]]
    assert "tts-1" in ids and "tts-1-hd" in ids


# ---------------------------------------------------------------------------
# language follows the script
# ---------------------------------------------------------------------------
def test_language_runs_follow_the_script():
    assert tts.language_runs("Hello, world!") == [("en-us", "Hello, world!")]
    assert tts.language_runs("안녕하세요, 세계!") == [("ko", "안녕하세요, 세계!")]
    assert tts.language_runs("Hello 안녕 123.", "en") == [("en", "Hello "), ("ko", "안녕 123.")]
    assert tts.language_runs("Привет, мир") == [("ru", "Привет, мир")]
    assert tts.language_runs("Привіт, світе") == [("uk", "Привіт, світе")]
    assert tts.language_runs("日本語のテキスト") == [("ja", "日本語のテキスト")]
    assert tts.language_runs("中文文本") == [("cmn", "中文文本")]
    assert tts.language_runs("42!") == [("en-us", "42!")]
    assert tts.language_runs("«Γειά»") == [("el", "«Γειά»")]
    job, tempo = tts.plan(tts.check(KOREAN, "onyx", 1.0, "wav"))
    assert job["segments"] == [("ko+m4", KOREAN)] and tempo == 1.0


def test_korean_round_trip_through_speech_to_text(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    wav = client.audio.speech.create(model="tts-1", voice="alloy", input=KOREAN, response_format="wav").content
    rate, samples = wav_samples(wav)
    assert rate == RATE and len(samples) / rate > 1.0
    result = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", wav), language="ko")
    assert result.text.strip(), "the Korean speech model heard nothing"
    assert any("\uac00" <= ch <= "\ud7a3" for ch in result.text), result.text
    # Read as Korean (not spelled out by an English voice), a word of it comes back.
    assert set(result.text.split()) & set(KOREAN.replace(".", "").split()), result.text


# ---------------------------------------------------------------------------
# the openai package
# ---------------------------------------------------------------------------
def test_openai_client_speech_and_streaming(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    mp3 = client.audio.speech.create(model="tts-1", voice="coral", input=SENTENCE).content
    stream, _, duration, samples = probe(mp3, "mp3")
    assert stream["codec_name"] == "mp3" and duration > 0.3 and rms(samples) > 300
    with client.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice="coral", input=SENTENCE, response_format="opus") as resp:
        assert resp.headers["content-type"].startswith("audio/ogg")
        chunks = list(resp.iter_bytes())
    assert chunks and b"".join(chunks)[:4] == b"OggS"
    assert probe(b"".join(chunks), "opus")[2] > 0.3
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="tts-1", voice="bob", input="Hi")
    assert err.value.status_code == 400 and err.value.body["param"] == "voice"


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------
GOOD = {"model": "tts-1", "input": "Hi.", "voice": "alloy"}


def without(key):
    return {k: v for k, v in GOOD.items() if k != key}


@pytest.mark.parametrize("body,param", [
    (without("model"), "model"),
    (dict(GOOD, model=""), "model"),
    (dict(GOOD, model=None), "model"),
    (dict(GOOD, model=7), "model"),
    (without("input"), "input"),
    (dict(GOOD, input=""), "input"),
    (dict(GOOD, input="   \n"), "input"),
    (dict(GOOD, input=["Hi"]), "input"),
    (dict(GOOD, input="a" * 4097), "input"),
    (dict(GOOD, voice="bob"), "voice"),
    (dict(GOOD, voice=""), "voice"),
    (dict(GOOD, voice={"id": "alloy"}), "voice"),
    (dict(GOOD, speed=0.24), "speed"),
    (dict(GOOD, speed=4.01), "speed"),
    (dict(GOOD, speed=0), "speed"),
    (dict(GOOD, speed=-1), "speed"),
    (dict(GOOD, speed="1.0"), "speed"),
    (dict(GOOD, speed=True), "speed"),
    (dict(GOOD, speed=[1]), "speed"),
    (dict(GOOD, response_format="ogg"), "response_format"),
    (dict(GOOD, response_format="MP3 "), "response_format"),
    (dict(GOOD, response_format=1), "response_format"),
    (dict(GOOD, instructions="Speak like a pirate."), "instructions"),
    (dict(GOOD, stream_format="sse"), "stream_format"),
])
def test_invalid_requests_are_400_naming_the_field(server, body, param):
    status, headers, data = post_speech(server, body)
    assert status == 400, data
    err = json.loads(data)["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    if param == "voice":
        for name in ("alloy", "echo", "fable", "onyx", "nova", "shimmer"):
            assert name in err["message"]
    if param == "response_format":
        assert "wav" in err["message"] and "pcm" in err["message"]


def test_body_must_be_a_json_object(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for raw in (b"", b"{not json", b"[1, 2]", b'{"model": "tts-1", "input": "x", "speed": NaN}'):
        conn.request("POST", "/v1/audio/speech", body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 400 and body["error"]["type"] == "invalid_request_error"
    conn.close()


def test_limits_are_inclusive(server):
    # exactly 4096 characters, and the ends of the speed range, are accepted
    headers, data = speech(server, ("Hi. " * 1024)[:4096], response_format="pcm", speed=4)
    assert len(data) / 2 / RATE > 10
    assert len(speech(server, "Hi.", speed=0.25, response_format="pcm")[1]) > 0
    assert len(speech(server, "Hi.", speed=None, voice=None, response_format=None)[1]) > 0   # defaults


# ---------------------------------------------------------------------------
# cancellation
# ---------------------------------------------------------------------------
def _encoders_with(pid, marker):
    """ffmpeg children of `pid` whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and comm == "ffmpeg" and any(marker in arg for arg in cmdline):
            found.append(int(entry))
    return found


def test_client_that_leaves_stops_the_encoder(server):
    body = json.dumps({"model": "tts-1", "input": "A long text to speak slowly. " * 140,
                       "voice": "sage", "speed": 0.25, "response_format": "mp3"}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    # This request's encoder is the one slowing speech down (idle pooled ones are not).
    running = _encoders_with(server.proc.pid, b"atempo")
    assert running, "the encoder should be running mid-stream"
    sock.close()
    deadline = time.monotonic() + 5
    while _encoders_with(server.proc.pid, b"atempo") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _encoders_with(server.proc.pid, b"atempo"), "ffmpeg kept running after the client left"
    assert speech(server, "Still here.", response_format="wav")[1][:4] == b"RIFF"


def _children_of(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def test_helpers_end_with_the_server(start_server):
    server = start_server()
    assert speech(server, "Hello.", response_format="mp3")[1]
    time.sleep(0.5)                                   # the pool's replacement encoder starts
    helpers = _children_of(server.proc.pid)
    assert len(helpers) >= 2, "expected the speech helper and a waiting encoder"
    server.stop()
    deadline = time.monotonic() + 5
    while any(os.path.exists("/proc/%d" % pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in helpers if os.path.exists("/proc/%d" % pid)]
    assert not left, "helper processes outlived the server"


# ---------------------------------------------------------------------------
# admission (engine level: the queue is a few lines the server cannot show cheaply)
# ---------------------------------------------------------------------------
def _hold_all_slots():
    held = 0
    while tts._slots.acquire(blocking=False):
        held += 1
    return held


def test_full_queue_is_busy_and_a_cancelled_waiter_never_runs(monkeypatch):
    from engines import Busy
    req = tts.check("Hello.", "alloy", 1.0, "pcm")
    submitted = []
    monkeypatch.setattr(tts._synth, "submit", lambda job, fd: submitted.append(job))
    held = _hold_all_slots()
    try:
        monkeypatch.setattr(tts, "MAX_WAITING", 0)
        with pytest.raises(Busy) as err:
            next(tts.stream(req))
        assert err.value.retry_after >= 1
        monkeypatch.setattr(tts, "MAX_WAITING", 4)
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        started = time.monotonic()
        assert list(tts.stream(req, cancel=cancel)) == []
        assert 0.25 < time.monotonic() - started < 2.0
        assert submitted == [], "a request whose client left reached the engine"
    finally:
        for _ in range(held):
            tts._slots.release()


def test_speed_plan_uses_espeak_inside_its_range_and_atempo_outside():
    assert tts.rate_and_tempo(1.0) == (175, 1.0)
    assert tts.rate_and_tempo(2.0) == (350, 1.0)
    rate, tempo = tts.rate_and_tempo(0.25)
    assert rate == tts.ESPEAK_RATE_MIN and abs(rate * tempo - 43.75) < 1e-9
    rate, tempo = tts.rate_and_tempo(4.0)
    assert rate == tts.ESPEAK_RATE_MAX and abs(rate * tempo - 700) < 1e-9
    assert tts.atempo_chain(1.0) == []
    stages = tts.atempo_chain(0.1)
    assert all(tts.ATEMPO_MIN <= s <= tts.ATEMPO_MAX for s in stages)
    assert abs(math.prod(stages) - 0.1) < 1e-9
    args = tts.ffmpeg_args("mp3", 1.5, 22050, "pipe:1")
    assert args[0] == "ffmpeg" and "atempo=1.500000,aresample=24000" in args and "+bitexact" in args


def test_every_language_and_voice_variant_loads_in_espeak():
    """Each script's language voice with each voice's variant exists in espeak-ng."""
    names = sorted({"%s+%s" % (lang, v.variant)
                    for lang in list(tts.SCRIPT_LANGUAGE.values()) + ["uk", "ja", "en", "en-us"]
                    for v in tts.VOICES.values()})
    code = ("import sys, json\n"
            "from pyttsx3.drivers import _espeak as E\n"
            "assert E.Initialize(E.AUDIO_OUTPUT_SYNCHRONOUS, 100) > 0\n"
            "print(json.dumps([n for n in json.loads(sys.argv[1]) if E.SetVoiceByName(n.encode()) != 0]))\n")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [], "espeak-ng does not know these voices"


def test_encoder_failure_mid_stream_truncates_the_body(server):
    """Audio cut short must not arrive as a complete file with a clean chunked end."""
    body = json.dumps({"model": "tts-1", "input": "A long text to speak slowly. " * 140,
                       "voice": "verse", "speed": 0.25, "response_format": "mp3"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/audio/speech", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(1000)
    (encoder,) = _encoders_with(server.proc.pid, b"atempo")
    os.kill(encoder, 9)
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    assert speech(server, "Still here.", response_format="pcm")[1]


def test_time_limit_kills_the_encoder(monkeypatch):
    monkeypatch.setattr(tts, "JOB_TIMEOUT_S", 0.3)
    req = tts.check("A long text to speak slowly. " * 140, "ash", 0.25, "mp3")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="did not finish"):
        tts.synthesize(req)
    assert time.monotonic() - started < 3
    assert not _encoders_with(os.getpid(), b"atempo"), "the timed-out ffmpeg is still running"
