"""Audio decoding: any uploaded audio file -> 16 kHz mono signed 16-bit PCM.

(issue 6) Knows nothing of HTTP.

    decode(data, filename="", cancel=None) -> Audio(pcm, sample_rate, duration)
    extension(filename) -> "wav" | "mp3" | ... | ""   (BadInput if unsupported)

How:
  * WAV (PCM, 8/16/24/32-bit, mono or stereo) is parsed with the standard
    library (`wave`) and converted with `audioop` where Python still has it
    (<= 3.12). WAV variants `wave` cannot read (float, WAVE_FORMAT_EXTENSIBLE,
    ADPCM, > 2 channels) and every other extension go through ffmpeg.
  * ffmpeg runs with an argument list (never a shell), under a time limit, with
    its output on a pipe. Its input is a private temporary file named by us
    (``input.<ext>``), not a stdin pipe: MP4/M4A files keep their index ("moov")
    at the end, and ffmpeg cannot read those from a non-seekable pipe (measured:
    a 10-minute m4a piped in decodes to 0 bytes, "partial file").
  * ffmpeg may only open that one local file (``-protocol_whitelist file``)
    with the demuxers of the listed extensions (``-format_whitelist``): an
    upload that is really an HLS playlist or a concat script naming other files
    or URLs is refused instead of followed.
  * The client's filename is used for its extension only: it never becomes a
    path, an argument or part of a message beyond that extension.

Errors: BadInput("invalid audio: ...") for empty, non-audio or undecodable
input; TooLarge when the decoded audio is longer than MAX_AUDIO_SECONDS;
Unavailable when ffmpeg is missing. `cancel` (a threading.Event) stops an
ffmpeg run within CANCEL_POLL_S.
"""
from dataclasses import dataclass
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
import wave

from . import BadInput, TooLarge, Unavailable

SAMPLE_RATE = 16000          # what vosk models are trained on
SAMPLE_WIDTH = 2             # bytes: signed 16-bit little-endian
# The extensions OpenAI's transcription endpoint (and the seed) accept.
EXTENSIONS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "ogg", "wav", "webm")
# Longest audio we decode: one hour is 115 MB of 16 kHz PCM held in memory per
# request, and about what a 25 MB upload of ordinary speech codecs holds. Longer
# (very low bit-rate) files are refused rather than allowed to eat memory.
MAX_AUDIO_SECONDS = 3600
# ffmpeg decodes an hour of audio in a few seconds on these machines; a run that
# takes longer than this is stuck or hostile.
FFMPEG_TIMEOUT_S = 120
# How often a running ffmpeg looks at the cancel event.
CANCEL_POLL_S = 0.2
# The demuxers those extensions need (ffmpeg names): wav, flac, mp3/mpga,
# ogg, matroska (webm), mov (mp4, m4a), mpeg (MPEG-PS .mpeg), aac (ADTS).
FFMPEG_FORMATS = "wav,flac,mp3,ogg,matroska,mov,mpeg,aac"


class Cancelled(Exception):
    """The client went away (the cancel event was set); nobody wants the result."""


@dataclass
class Audio:
    """Decoded audio: `pcm` is 16 kHz mono s16le; `duration` in seconds."""
    pcm: bytes
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        return len(self.pcm) / (SAMPLE_WIDTH * self.sample_rate)


def invalid(reason):
    return BadInput(f"invalid audio: {reason}", param="file")


def extension(filename) -> str:
    """The lower-case extension of a client's filename, "" when it has none.

    Only the text after the last '/', '\\' and '.' is looked at; anything not in
    EXTENSIONS is a BadInput naming the supported ones."""
    base = re.split(r"[/\\]", filename or "")[-1]
    if "." not in base:
        return ""
    ext = base.rsplit(".", 1)[1].lower()
    if ext not in EXTENSIONS:
        shown = ext if re.fullmatch(r"[a-z0-9]{1,10}", ext) else "?"
        raise BadInput(f"unsupported file type '{shown}'; supported: "
                       + ", ".join(EXTENSIONS), param="file")
    return ext


def decode(data: bytes, filename: str = "", cancel=None) -> Audio:
    """Decode an uploaded file to 16 kHz mono s16le PCM (see the module doc)."""
    ext = extension(filename)
    if not data:
        raise invalid("the file is empty")
    # RIFF/WAVE goes to the stdlib first; anything else (including RF64 and
    # mislabelled files) to ffmpeg, which looks at the content, not the name.
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        audio = _decode_wav(data)
        if audio is not None:
            return audio
    return _decode_ffmpeg(data, ext, cancel)


def _check_length(seconds):
    if seconds > MAX_AUDIO_SECONDS:
        raise TooLarge(f"audio longer than {MAX_AUDIO_SECONDS} seconds", param="file")


def _audioop():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import audioop
        return audioop
    except ImportError:      # Python 3.13 removed it: ffmpeg converts instead
        return None


def _decode_wav(data):
    """PCM WAV with the standard library; None when ffmpeg should do it."""
    try:
        w = wave.open(io.BytesIO(data), "rb")
    except wave.Error as e:
        if "unknown format" in str(e):     # float, extensible, ADPCM, ...
            return None
        raise invalid("malformed WAV file") from None
    except (EOFError, ValueError, OSError):
        raise invalid("malformed WAV file") from None
    with w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        if rate <= 0 or channels <= 0 or width not in (1, 2, 3, 4):
            raise invalid("malformed WAV header")
        _check_length(w.getnframes() / rate)
        try:
            frames = w.readframes(w.getnframes())
        except (EOFError, wave.Error, ValueError):
            raise invalid("malformed WAV file") from None
    frames = frames[:len(frames) - len(frames) % (width * channels)]
    if not frames:
        raise invalid("the WAV file holds no samples")
    if channels == 1 and width == 2 and rate == SAMPLE_RATE:
        return Audio(frames)
    audioop = _audioop()
    if audioop is None or channels > 2:
        return None
    if width == 1:                       # WAV 8-bit samples are unsigned
        frames = audioop.bias(frames, 1, -128)
    if width != 2:
        frames = audioop.lin2lin(frames, width, 2)
    if channels == 2:
        frames = audioop.tomono(frames, 2, 0.5, 0.5)
    if rate != SAMPLE_RATE:
        frames, _ = audioop.ratecv(frames, 2, 1, rate, SAMPLE_RATE, None)
    return Audio(frames)


def ffmpeg_command(path):
    """The ffmpeg argument list decoding `path` to PCM on stdout (no shell)."""
    return [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error",
        "-protocol_whitelist", "file", "-format_whitelist", FFMPEG_FORMATS,
        "-threads", "1", "-i", path,
        "-map", "0:a:0", "-vn", "-sn", "-dn",
        "-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", "-f", "s16le",
        # one second past the limit, so "too long" can be told from "exactly"
        "-t", str(MAX_AUDIO_SECONDS + 1), "pipe:1",
    ]


def _decode_ffmpeg(data, ext, cancel):
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise Unavailable("ffmpeg is not installed; it is needed to decode "
                          "audio other than PCM WAV")
    try:
        with tempfile.TemporaryDirectory(prefix="localai-audio-") as tmp:
            path = os.path.join(tmp, "input." + (ext or "bin"))
            with open(path, "xb") as f:
                f.write(data)
            cmd = ffmpeg_command(path)
            cmd[0] = exe
            pcm = _run(cmd, cancel)
    except OSError as exc:          # no room in TMPDIR, ffmpeg not executable, ...
        raise Unavailable("audio decoding failed on the server: %s" % (exc.strerror or "OS error")) from None
    pcm = pcm[:len(pcm) - len(pcm) % SAMPLE_WIDTH]
    if not pcm:
        raise invalid("could not decode the file" + (f" as {ext}" if ext else ""))
    audio = Audio(pcm)
    _check_length(audio.duration)
    return audio


def _run(cmd, cancel):
    """Run ffmpeg; stdout bytes, b"" when it fails. Kills it on timeout/cancel."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + FFMPEG_TIMEOUT_S
    try:
        while True:
            try:
                out, _err = proc.communicate(timeout=CANCEL_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                if time.monotonic() > deadline:
                    raise invalid(f"decoding took longer than {FFMPEG_TIMEOUT_S} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out if proc.returncode == 0 else b""
