"""Text to speech: espeak-ng through pyttsx3's espeak driver, encoded by ffmpeg.

(issue 7)

Interface (no HTTP here):

    check(text, voice, speed, fmt, ...) -> SpeechRequest   validate; BadInput(param=...)
    media(fmt) -> (content_type, headers)                 what the body is
    stream(req, cancel=None) -> Iterator[bytes]           the encoded audio, as produced
    synthesize(req, cancel=None) -> bytes                 the same, joined
    VOICES, FORMATS, MODELS, voices()                     discovery for /v1/audio/*

Theory of operation
-------------------
Synthesis uses pyttsx3's espeak driver binding (``pyttsx3.drivers._espeak``, a
ctypes layer over libespeak-ng) in espeak's *synchronous* mode, in a helper
process, one fork per request:

    server thread --(job + pipe fd over a Unix socket)--> zygote process
    zygote: fork() -> child: espeak synthesises, writes raw PCM into the pipe, exits
    server thread: pipe -> ffmpeg stdin; ffmpeg stdout -> caller (select loop)

Why not pyttsx3's Engine loop on a thread, as first planned? Measured here with
pyttsx3 2.99 on espeak-ng 1.51:
  * espeak-ng keeps synthesis state between utterances in a process (the pitch
    flutter index is a function-static, echo buffers, wave phase): the same text
    synthesised twice in one process gave different samples (and lengths) 5 times
    out of 6. A fresh process is deterministic. Forking a process that has
    initialised espeak but never spoken gives every request that fresh state in
    about a millisecond, where spawning Python costs about 0.3 s.
  * pyttsx3's espeak run loop returns from ``runAndWait`` before asynchronous
    synthesis has finished, and its ``endLoop`` cancels espeak's command queue,
    dropping rate changes made between utterances (measured: the rate stuck at
    its previous value; known upstream, nateshmbhat/pyttsx3#219, #170).
  * espeak's state is per process, so processes (not threads) are what let two
    requests synthesise side by side on two cores; a crash or hang in libespeak
    cannot take the server down, and killing/closing the pipe cancels at once.
The child writes each buffer espeak hands to the callback straight into the pipe,
so encoding (and the HTTP body) starts while later sentences are synthesised.

Language follows the text: the input is split into runs by Unicode script
(Hangul -> Korean, kana -> Japanese, Han -> Mandarin or Japanese, Cyrillic ->
Russian, ...); punctuation, digits and spaces stay with the run they are in. Each
run is spoken with that language's espeak voice plus the requested voice's
variant, so Korean text is read in Korean, not letter by letter.

Speed: espeak's own rate (words per minute) covers 80..450 wpm (its documented
range; it clamps below 80, measured). speed * 175 wpm inside that range is done by
espeak; the rest is an ffmpeg ``atempo`` factor, so 0.25..4 all change the duration
in proportion.

Formats: every format is 24 kHz mono (OpenAI's rate; ``pcm`` is raw s16le at
24000 Hz, also stated in the X-Sample-Rate header). mp3, opus (Ogg), aac (ADTS)
and pcm stream as ffmpeg produces them. wav is ffmpeg's PCM behind a RIFF header
written here once the length is known (so it is sent when complete); flac keeps
its length and checksum in its header, which ffmpeg fills in only on a seekable
output, so it is encoded to a private temporary file. ffmpeg runs with an
argument list (no shell), bit-exact flags and no metadata, so the same request
gives the same bytes. Starting ffmpeg costs 80-150 ms here, more than espeak needs
for a sentence, so for each streamed format in use one ffmpeg is kept started and
waiting for input (plain tempo only); a request takes it and a replacement starts
in the background.

Limits: MAX_JOBS requests synthesise and encode at once, MAX_WAITING more wait
(then Busy); a whole request is bounded by JOB_TIMEOUT_S; a client that leaves
(`cancel`) stops the pump within POLL_S, which kills ffmpeg and closes the pipe,
and the synthesis child ends at its next write.
"""
import atexit
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from engines import BadInput, Busy, Unavailable

# ---------------------------------------------------------------------------
# Limits and constants
# ---------------------------------------------------------------------------
MAX_INPUT_CHARS = 4096        # OpenAI's limit for /v1/audio/speech input (the seed's too)
SPEED_MIN, SPEED_MAX = 0.25, 4.0  # OpenAI's accepted speed range
BASE_RATE_WPM = 175           # espeak-ng's default rate: what speed 1.0 sounds like
ESPEAK_RATE_MIN = 80          # espeak clamps slower rates to this (measured: 40 wpm == 80 wpm)
ESPEAK_RATE_MAX = 450         # espeak's documented maximum (espeakRATE_MAXIMUM)
ATEMPO_MIN, ATEMPO_MAX = 0.5, 2.0   # one atempo stage stays in this range (quality; ffmpeg
                                    # accepts 0.5..100, chained stages multiply)
TEMPO_TOLERANCE = 0.005       # closer to 1 than this: no atempo (0.5% of duration is less than
                              # espeak's own 1-wpm rate step at 80..200 wpm)
OUTPUT_RATE_HZ = 24000        # OpenAI's output rate; clients that play raw pcm assume it
ESPEAK_CALLBACK_MS = 100      # audio per espeak callback: the streaming granularity
POOL_PER_FORMAT = 2           # started ffmpeg processes kept waiting per format in use (about
                              # 10 MB private memory each; formats are pooled after first use)
MAX_JOBS = 2                  # requests synthesising/encoding at once (2-core machines)
MAX_WAITING = 16              # requests queued behind them; more -> Busy (503 + Retry-After)
JOB_TIMEOUT_S = 120.0         # whole synthesis+encode of one request (4096 chars at speed
                              # 0.25 encodes in ~10 s here); a hung ffmpeg is killed after it
CHILD_TIMEOUT_S = 120         # SIGALRM ends a synthesis child that runs longer than this
ZYGOTE_START_TIMEOUT_S = 30.0  # python + pyttsx3 import + espeak init (about 0.3 s here)
POLL_S = 0.1                  # how often the pump looks at `cancel` and the deadline
READ_BYTES = 64 * 1024        # pipe read size
MAX_JOB_BYTES = 1024 * 1024   # one job message: 4096 characters as UTF-8 JSON, even split into
                              # 4096 one-character language runs, stay far below this

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# Voices, formats, models
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Voice:
    id: str          # the OpenAI name
    variant: str     # espeak-ng voice variant (espeak-ng-data/voices/!v)
    pitch: int       # espeak base pitch 0..100 (50 = the variant's own)
    english: str     # espeak voice for Latin-script text ("en-us", or "en" = British)
    name: str        # shown to clients


# The six seed voices, then OpenAI's newer names; each a distinct, stable
# variant/pitch/dialect combination (variants from `espeak-ng --voices=variant`).
VOICES = {v.id: v for v in [
    Voice("alloy", "f2", 50, "en-us", "Alloy (neutral)"),
    Voice("echo", "m3", 45, "en-us", "Echo (male)"),
    Voice("fable", "m2", 55, "en", "Fable (British male)"),
    Voice("onyx", "m4", 25, "en-us", "Onyx (deep male)"),
    Voice("nova", "f3", 60, "en-us", "Nova (female)"),
    Voice("shimmer", "f5", 68, "en-us", "Shimmer (bright female)"),
    Voice("ash", "m7", 48, "en-us", "Ash (male)"),
    Voice("ballad", "m5", 52, "en", "Ballad (British male)"),
    Voice("coral", "f1", 58, "en-us", "Coral (female)"),
    Voice("sage", "f4", 45, "en-us", "Sage (calm female)"),
    Voice("verse", "m6", 50, "en-us", "Verse (male)"),
    Voice("marin", "Andrea", 55, "en-us", "Marin (female)"),
    Voice("cedar", "m1", 38, "en-us", "Cedar (low male)"),
]}
DEFAULT_VOICE = "alloy"       # used when a request names none (OpenAI requires one; we are lenient)


@dataclass(frozen=True)
class Format:
    content_type: str
    muxer: str           # ffmpeg -f
    codec: tuple         # ffmpeg codec arguments
    needs_seek: bool     # the container header holds the length: ffmpeg encodes to a file


FORMATS = {
    "mp3": Format("audio/mpeg", "mp3", ("-c:a", "libmp3lame", "-b:a", "64k"), False),
    # Ogg Opus: audio/ogg is its registered type (RFC 7845) and what browsers play.
    "opus": Format("audio/ogg; codecs=opus", "ogg", ("-c:a", "libopus", "-b:a", "32k"), False),
    "aac": Format("audio/aac", "adts", ("-c:a", "aac", "-b:a", "64k"), False),
    "flac": Format("audio/flac", "flac", ("-c:a", "flac"), True),
    "wav": Format("audio/wav", "s16le", ("-c:a", "pcm_s16le"), False),   # header added here
    "pcm": Format("audio/pcm", "s16le", ("-c:a", "pcm_s16le"), False),
}
DEFAULT_FORMAT = "mp3"

# Model names clients send; the engine is the same for all (the seed: "speech engine
# selection is currently independent of this value").
MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


def voices():
    """[(id, display name)] in a stable order."""
    return [(v.id, v.name) for v in VOICES.values()]


def media(fmt):
    """(content type, extra headers) of a response body in `fmt`."""
    headers = [("X-Sample-Rate", str(OUTPUT_RATE_HZ))]
    if fmt == "pcm":
        headers += [("X-Sample-Format", "s16le"), ("X-Channels", "1")]
    return FORMATS[fmt].content_type, headers


# ---------------------------------------------------------------------------
# Validation (pure)
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeechRequest:
    text: str
    voice: str = DEFAULT_VOICE
    speed: float = 1.0
    fmt: str = DEFAULT_FORMAT


def check(text, voice=None, speed=None, fmt=None):
    """Validate the fields of a speech request -> SpeechRequest (BadInput names the field)."""
    if text is None:
        raise BadInput("'input' is required", param="input")
    if not isinstance(text, str):
        raise BadInput("'input' must be a string", param="input")
    if not text.strip():
        raise BadInput("'input' must not be empty", param="input")
    if len(text) > MAX_INPUT_CHARS:
        raise BadInput("'input' is %d characters; the limit is %d" % (len(text), MAX_INPUT_CHARS),
                       param="input")
    if voice is None:
        voice = DEFAULT_VOICE
    if not isinstance(voice, str):
        raise BadInput("'voice' must be a voice name, one of: %s" % ", ".join(VOICES), param="voice")
    if voice.strip().lower() not in VOICES:
        raise BadInput("unknown voice %r; valid voices: %s" % (voice[:64], ", ".join(VOICES)),
                       param="voice")
    if speed is None:
        speed = 1.0
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise BadInput("'speed' must be a number from %g to %g" % (SPEED_MIN, SPEED_MAX), param="speed")
    if not SPEED_MIN <= speed <= SPEED_MAX:          # NaN fails this too
        raise BadInput("'speed' must be from %g to %g" % (SPEED_MIN, SPEED_MAX), param="speed")
    if fmt is None:
        fmt = DEFAULT_FORMAT
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise BadInput("unsupported response_format; use one of: %s" % ", ".join(FORMATS),
                       param="response_format")
    return SpeechRequest(text, voice.strip().lower(), float(speed), fmt)


# ---------------------------------------------------------------------------
# Language by script (pure)
# ---------------------------------------------------------------------------
# (first, last code point, script). Characters outside every range (digits,
# punctuation, spaces, symbols, emoji) are neutral: they join the run they are in.
_SCRIPT_RANGES = sorted([
    (0x0041, 0x005A, "latin"), (0x0061, 0x007A, "latin"), (0x00C0, 0x024F, "latin"),
    (0x1E00, 0x1EFF, "latin"), (0xFF21, 0xFF3A, "latin"), (0xFF41, 0xFF5A, "latin"),
    (0x0370, 0x03FF, "greek"), (0x1F00, 0x1FFF, "greek"),
    (0x0400, 0x052F, "cyrillic"), (0x0530, 0x058F, "armenian"),
    (0x0590, 0x05FF, "hebrew"), (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"),
    (0xFB50, 0xFDFF, "arabic"), (0xFE70, 0xFEFF, "arabic"),
    (0x0900, 0x097F, "devanagari"), (0x0980, 0x09FF, "bengali"), (0x0A00, 0x0A7F, "gurmukhi"),
    (0x0A80, 0x0AFF, "gujarati"), (0x0B00, 0x0B7F, "oriya"), (0x0B80, 0x0BFF, "tamil"),
    (0x0C00, 0x0C7F, "telugu"), (0x0C80, 0x0CFF, "kannada"), (0x0D00, 0x0D7F, "malayalam"),
    (0x0D80, 0x0DFF, "sinhala"), (0x0E00, 0x0E7F, "thai"), (0x1000, 0x109F, "myanmar"),
    (0x10A0, 0x10FF, "georgian"), (0x1200, 0x139F, "ethiopic"),
    (0x1100, 0x11FF, "hangul"), (0x3130, 0x318F, "hangul"), (0xA960, 0xA97F, "hangul"),
    (0xAC00, 0xD7FF, "hangul"),
    (0x3040, 0x309F, "kana"), (0x30A0, 0x30FF, "kana"), (0x31F0, 0x31FF, "kana"),
    (0xFF66, 0xFF9F, "kana"),
    (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"), (0xF900, 0xFAFF, "han"),
    (0x20000, 0x2FA1F, "han"),
])
_RANGE_STARTS = [r[0] for r in _SCRIPT_RANGES]

# Script -> espeak-ng language voice (all present in Debian's espeak-ng-data;
# tests check each one loads). Latin uses the requested voice's English.
SCRIPT_LANGUAGE = {
    "greek": "el", "cyrillic": "ru", "armenian": "hy", "hebrew": "he", "arabic": "ar",
    "devanagari": "hi", "bengali": "bn", "gurmukhi": "pa", "gujarati": "gu", "oriya": "or",
    "tamil": "ta", "telugu": "te", "kannada": "kn", "malayalam": "ml", "sinhala": "si",
    "thai": "th", "myanmar": "my", "georgian": "ka", "ethiopic": "am", "hangul": "ko",
    "kana": "ja", "han": "cmn",
}
_UKRAINIAN_ONLY = set("ЄєІіЇїҐґ")  # letters Russian lacks: Cyrillic text with them is Ukrainian


def script_of(ch):
    """The script of one character, or None for neutral characters."""
    import bisect
    cp = ord(ch)
    i = bisect.bisect_right(_RANGE_STARTS, cp) - 1
    if i >= 0 and _SCRIPT_RANGES[i][0] <= cp <= _SCRIPT_RANGES[i][1]:
        return _SCRIPT_RANGES[i][2]
    return None


def language_runs(text, english="en-us"):
    """Split text into [(espeak language, text)] runs by script, in order.

    Han characters are Japanese when the text has kana, Mandarin otherwise;
    Cyrillic is Ukrainian when a Ukrainian-only letter appears. Text with no
    letters at all is read as English."""
    scripts = [script_of(ch) for ch in text]
    has_kana = "kana" in scripts
    ukrainian = any(ch in _UKRAINIAN_ONLY for ch in text)

    def lang(script):
        if script == "latin":
            return english
        if script == "han" and has_kana:
            return "ja"
        if script == "cyrillic" and ukrainian:
            return "uk"
        return SCRIPT_LANGUAGE[script]

    runs, current, start = [], None, 0
    for i, script in enumerate(scripts):
        if script is None:
            continue
        language = lang(script)
        if current is None:
            current = language                  # leading neutral characters join the first run
        elif language != current:
            runs.append((current, text[start:i]))
            current, start = language, i
    runs.append((current or english, text[start:]))
    return runs


# ---------------------------------------------------------------------------
# Speed (pure)
# ---------------------------------------------------------------------------
def rate_and_tempo(speed):
    """(espeak words per minute, remaining tempo factor for ffmpeg) for `speed`."""
    wanted = BASE_RATE_WPM * speed
    rate = int(min(max(round(wanted), ESPEAK_RATE_MIN), ESPEAK_RATE_MAX))
    return rate, wanted / rate


def atempo_chain(tempo):
    """Split a tempo factor into atempo stages each within [ATEMPO_MIN, ATEMPO_MAX]."""
    stages = []
    while tempo > ATEMPO_MAX * (1 + 1e-9):
        stages.append(ATEMPO_MAX)
        tempo /= ATEMPO_MAX
    while tempo < ATEMPO_MIN * (1 - 1e-9):
        stages.append(ATEMPO_MIN)
        tempo /= ATEMPO_MIN
    if abs(tempo - 1.0) > TEMPO_TOLERANCE:
        stages.append(tempo)
    return stages


def ffmpeg_args(fmt, tempo, input_rate, output):
    """The ffmpeg argument list: raw s16le mono PCM on stdin -> `fmt` at `output`."""
    f = FORMATS[fmt]
    filters = ["atempo=%.6f" % t for t in atempo_chain(tempo)] + ["aresample=%d" % OUTPUT_RATE_HZ]
    return ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error",
            "-f", "s16le", "-ar", str(input_rate), "-ac", "1", "-i", "pipe:0",
            "-af", ",".join(filters), "-ac", "1", "-ar", str(OUTPUT_RATE_HZ), *f.codec,
            "-fflags", "+bitexact", "-flags:a", "+bitexact", "-map_metadata", "-1",
            "-f", f.muxer, "-y", output]


def plan(req):
    """The synthesis job (sent to the child) and the ffmpeg tempo for a request."""
    voice = VOICES[req.voice]
    rate, tempo = rate_and_tempo(req.speed)
    text = "".join(" " if (ch < " " and ch not in "\n\t") else ch for ch in req.text)  # NUL ends C strings
    segments = [("%s+%s" % (lang, voice.variant), run) for lang, run in language_runs(text, voice.english)]
    return {"segments": segments, "rate": rate, "pitch": voice.pitch}, tempo


# ---------------------------------------------------------------------------
# The synthesis helper process (zygote) and its children
# ---------------------------------------------------------------------------
def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _child(job, fd, espeak):
    """In a forked child: synthesise the job's segments into fd, then exit."""
    import ctypes
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(CHILD_TIMEOUT_S)
    failed = []

    def on_audio(wav, numsamples, events):
        if numsamples > 0:
            try:
                _write_all(fd, ctypes.string_at(wav, numsamples * 2))
            except OSError:          # the reader left (cancelled): stop espeak
                failed.append(True)
                return 1
        return 0
    espeak.SetSynthCallback(on_audio)
    segments = job["segments"]
    for i, (voice, text) in enumerate(segments):
        if espeak.SetVoiceByName(voice.encode("ascii")) != 0:
            os._exit(3)
        espeak.SetParameter(espeak.RATE, int(job["rate"]), 0)
        espeak.SetParameter(espeak.PITCH, int(job["pitch"]), 0)
        # A language switch is not a sentence end: only the last run gets the final pause.
        last = espeak.ENDPAUSE if i == len(segments) - 1 else 0
        espeak.Synth(text.encode("utf-8"), flags=last | espeak.CHARS_UTF8)
        if failed:
            os._exit(4)
    os._exit(0)


def _zygote_main(fd):
    """The helper process: initialise espeak once, then fork a child per job."""
    sock = socket.socket(fileno=fd)
    try:
        from pyttsx3.drivers import _espeak as espeak
        sample_rate = espeak.Initialize(espeak.AUDIO_OUTPUT_SYNCHRONOUS, ESPEAK_CALLBACK_MS)
        if sample_rate <= 0:
            raise RuntimeError("espeak-ng could not initialise")
    except Exception as exc:     # ImportError, OSError (no libespeak-ng), RuntimeError
        sock.send(json.dumps({"error": "%s: %s" % (type(exc).__name__, exc)}).encode())
        return
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)      # children are reaped automatically
    sock.send(json.dumps({"sample_rate": sample_rate}).encode())
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_JOB_BYTES, 1)
        except InterruptedError:
            continue
        if not msg:                                    # the server is gone
            return
        if not fds:
            continue
        try:
            job = json.loads(msg)
            pid = os.fork()
        except (ValueError, OSError):
            os.close(fds[0])
            continue
        if pid == 0:
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _child(job, fds[0], espeak)
            finally:
                os._exit(70)
        os.close(fds[0])


class _Synthesizer:
    """Server side of the helper process: start it on first use, hand it jobs."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._sock = None
        self.sample_rate = None

    def _start(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
            # Its own session: a Ctrl+C at the server's terminal is the server's to handle
            # (it drains requests); the helper ends when the server closes the socket.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "engines.tts", "--zygote", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL,
                start_new_session=True)
        finally:
            theirs.close()
        self._sock = ours
        ours.settimeout(ZYGOTE_START_TIMEOUT_S)
        try:
            hello = json.loads(ours.recv(4096) or b"{}")
        except (OSError, ValueError):
            hello = {}
        ours.settimeout(None)
        if "sample_rate" not in hello:
            self._stop()
            raise Unavailable("text to speech is unavailable (pyttsx3/espeak-ng): %s"
                              % hello.get("error", "the speech helper did not start"))
        self.sample_rate = int(hello["sample_rate"])

    def _stop(self):
        if self._sock is not None:
            self._sock.close()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        self._proc = self._sock = None

    def submit(self, job, fd):
        """Start synthesising `job` into the pipe write end `fd` (the caller closes fd)."""
        data = json.dumps(job, ensure_ascii=False).encode("utf-8")
        if len(data) > MAX_JOB_BYTES:                  # cannot happen within MAX_INPUT_CHARS
            raise BadInput("input too long to synthesise", param="input")
        with self._lock:
            for attempt in (1, 2):
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                try:
                    socket.send_fds(self._sock, [data], [fd])
                    return self.sample_rate
                except OSError:
                    self._stop()               # the helper died: start a new one once
                    if attempt == 2:
                        raise Unavailable("the speech helper process is not responding")


_synth = _Synthesizer()
_slots = threading.BoundedSemaphore(MAX_JOBS)
_waiting_lock = threading.Lock()
_waiting = [0]


def _admit(cancel):
    """Take a job slot; Busy if too many wait; False if the client left meanwhile."""
    with _waiting_lock:
        if _waiting[0] >= MAX_WAITING:
            raise Busy("text to speech is busy; retry shortly", retry_after=1)
        _waiting[0] += 1
    try:
        while not _slots.acquire(timeout=POLL_S):
            if cancel is not None and cancel.is_set():
                return False
    finally:
        with _waiting_lock:
            _waiting[0] -= 1
    if cancel is not None and cancel.is_set():
        _slots.release()
        return False
    return True


def warm():
    """Start the helper process now (otherwise the first request does)."""
    with _synth._lock:
        if _synth._proc is None or _synth._proc.poll() is not None:
            _synth._start()


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------
def stream(req, cancel=None):
    """Yield the encoded audio of a SpeechRequest as ffmpeg produces it.

    Raises Busy (queue full), Unavailable (no pyttsx3/espeak-ng/ffmpeg) before the
    first byte; RuntimeError if synthesis or encoding fails. Stops, killing its
    processes, when `cancel` is set or the generator is closed."""
    if not isinstance(req, SpeechRequest):
        raise TypeError("stream() takes a SpeechRequest (see check())")
    if shutil.which("ffmpeg") is None:
        raise Unavailable("ffmpeg is not installed; text to speech needs it to encode audio")
    if not _admit(cancel):
        return
    try:
        yield from _pipeline(req, cancel)
    finally:
        _slots.release()


def synthesize(req, cancel=None):
    """The whole encoded audio of a SpeechRequest."""
    return b"".join(stream(req, cancel=cancel))


class _Encoder:
    """One ffmpeg process and the file its diagnostics go to."""

    def __init__(self, args):
        self.errors = tempfile.TemporaryFile()
        # Own session, like the helper: terminal signals go to the server, which drains;
        # ffmpeg ends at EOF on stdin when the server is gone.
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=self.errors,
                                     stdout=subprocess.DEVNULL if args[-1] != "pipe:1" else subprocess.PIPE,
                                     start_new_session=True)

    def error_text(self):
        self.errors.seek(0)
        return self.errors.read()[-500:].decode("utf-8", "replace")

    def close(self):
        proc = self.proc
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self.errors.close()


class _EncoderPool:
    """Started ffmpeg processes waiting for input, per streamed format in use.

    Starting ffmpeg costs 80-150 ms here (it links about a hundred libraries),
    several times espeak's synthesis of a sentence. A request at plain tempo takes
    a waiting process, and a replacement starts in the background, off the
    request's path. POOL_PER_FORMAT are kept so back-to-back requests still find
    one ready while the replacement starts. Formats are pooled after first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._idle = {}               # ffmpeg args -> [_Encoder]
        self._closed = False

    def take(self, args, poolable):
        key = tuple(args)
        encoder = None
        if poolable:
            with self._lock:
                idle = self._idle.setdefault(key, [])
                encoder = idle.pop(0) if idle else None      # the oldest: most likely started
            if encoder is not None and encoder.proc.poll() is not None:
                encoder.close()
                encoder = None
            threading.Thread(target=self._refill, args=(key,), name="tts-encoder", daemon=True).start()
        return encoder or _Encoder(args)

    def _refill(self, key):
        while True:
            with self._lock:
                if self._closed or len(self._idle.get(key, ())) >= POOL_PER_FORMAT:
                    return
            try:
                encoder = _Encoder(list(key))
            except OSError:
                return
            with self._lock:
                if not self._closed and len(self._idle[key]) < POOL_PER_FORMAT:
                    self._idle[key].append(encoder)
                    encoder = None
            if encoder is not None:
                encoder.close()
                return

    def close(self):
        with self._lock:
            self._closed = True
            idle = [e for encoders in self._idle.values() for e in encoders]
            self._idle = {}
        for encoder in idle:
            encoder.close()


_encoders = _EncoderPool()
atexit.register(_encoders.close)


def wav_header(data_bytes, rate=OUTPUT_RATE_HZ):
    """The 44-byte RIFF header of a mono 16-bit PCM WAV holding data_bytes of samples."""
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 1,
                       rate, rate * 2, 2, 16, b"data", data_bytes)


def _pipeline(req, cancel):
    job, tempo = plan(req)
    fmt = FORMATS[req.fmt]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    tmpdir = tempfile.mkdtemp(prefix="localai-tts-") if fmt.needs_seek else None
    output = os.path.join(tmpdir, "speech." + req.fmt) if tmpdir else "pipe:1"
    pcm_r, pcm_w = os.pipe()
    encoder = None
    try:
        # Submit first: the helper reports espeak's sample rate when it starts.
        sample_rate = _synth.submit(job, pcm_w)
        os.close(pcm_w)
        pcm_w = None
        args = ffmpeg_args(req.fmt, tempo, sample_rate, output)
        encoder = _encoders.take(args, poolable=not tmpdir and not atempo_chain(tempo))
        pieces = []                              # wav: the samples, until the length is known
        for data in _pump(pcm_r, encoder.proc, cancel, deadline):
            if req.fmt == "wav":
                pieces.append(data)
            else:
                yield data
        if cancel is not None and cancel.is_set():
            return
        try:
            code = encoder.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError("ffmpeg did not finish within %g s" % JOB_TIMEOUT_S) from None
        if code != 0:
            raise RuntimeError("ffmpeg failed (exit %d): %s" % (code, encoder.error_text()))
        if req.fmt == "wav":
            yield wav_header(sum(map(len, pieces)))
            yield from pieces
        elif tmpdir:
            with open(output, "rb") as f:
                while True:
                    data = f.read(READ_BYTES)
                    if not data:
                        break
                    yield data
    finally:
        for fd in (pcm_r, pcm_w):
            if fd is not None:
                os.close(fd)
        if encoder is not None:
            encoder.close()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _pump(pcm_r, proc, cancel, deadline):
    """Move PCM from the synthesis child into ffmpeg; yield what ffmpeg writes.

    One select loop, no extra threads: it looks at `cancel` and the deadline every
    POLL_S, and fails if the child produced no audio at all."""
    ff_in = proc.stdin.fileno()
    ff_out = proc.stdout.fileno() if proc.stdout is not None else None
    os.set_blocking(ff_in, False)
    pending, pcm_open, pcm_bytes = b"", True, 0
    while True:
        if cancel is not None and cancel.is_set():
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("text to speech did not finish within %g s" % JOB_TIMEOUT_S)
        readers = [fd for fd in ((pcm_r if pcm_open and not pending else None), ff_out) if fd is not None]
        writers = [ff_in] if pending else []
        if not readers and not writers:
            return
        readable, writable, _ = select.select(readers, writers, [], min(POLL_S, left))
        if pcm_r in readable:
            data = os.read(pcm_r, READ_BYTES)
            if data:
                pending, pcm_bytes = data, pcm_bytes + len(data)
            else:
                pcm_open = False
                if pcm_bytes == 0:
                    raise RuntimeError("speech synthesis produced no audio")
        if ff_in in writable:
            try:
                pending = pending[os.write(ff_in, pending):]
            except BrokenPipeError:
                raise RuntimeError("ffmpeg stopped reading its input") from None
        if not pcm_open and not pending and not proc.stdin.closed:
            proc.stdin.close()                 # end of input: ffmpeg flushes and exits
            if ff_out is None:
                return
        if ff_out is not None and ff_out in readable:
            data = os.read(ff_out, READ_BYTES)
            if data:
                yield data
            else:
                return


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--zygote":
        _zygote_main(int(sys.argv[2]))
    else:
        sys.exit("usage: python -m engines.tts --zygote FD  (started by the server)")
