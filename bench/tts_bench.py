#!/usr/bin/env python3
"""Text to speech: real-time factor and time to first byte, server vs. pyttsx3.

Measured in one run, on the same texts:
  * server   POST /v1/audio/speech on a real `localai.py` (port 0), over a socket:
             time to first body byte (TTFB) and to the last byte, per format;
  * engine   engines.tts.stream() in this process (no HTTP): what HTTP adds;
  * pyttsx3  the reference: pyttsx3.init("espeak") + save_to_file + runAndWait,
             waiting for its 'finished-utterance', in a fresh process per sample
             (pyttsx3's espeak loop is only reliable for a process's first
             utterance, see engines/tts.py). It writes a 22 kHz WAV and cannot
             stream, so its TTFB is its total time.

Real-time factor (RTF) = wall seconds / seconds of audio produced (lower is
faster; 0.01 = 100x faster than real time). Each figure is the median of
--repeat runs after one warm-up ("best" is the fastest TTFB: on a shared machine
the median carries other processes' load). Prints ratios ours/reference (medians).

    python bench/tts_bench.py [--repeat 5]
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import wave
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXTS = {
    "sentence": "Hello from local text to speech. The quick brown fox jumps over the lazy dog.",
    "paragraph": ("Local speech synthesis keeps every word on your own machine. It starts quickly, "
                  "it works without a network, and it speaks many languages. ") * 6,
}
RATE = 24000

PYTTSX3_REFERENCE = r"""
import json, sys, threading, time, wave
import pyttsx3
text, path = sys.argv[1], sys.argv[2]
engine = pyttsx3.init("espeak")
engine.setProperty("rate", 175)             # the rate our speed 1.0 uses
done = threading.Event()
engine.connect("finished-utterance", lambda name, completed: done.set())
start = time.perf_counter()
engine.save_to_file(text, path)
engine.runAndWait()
done.wait(120)
seconds = time.perf_counter() - start
with wave.open(path) as w:
    audio = w.getnframes() / w.getframerate()
print("RESULT " + json.dumps({"seconds": seconds, "audio": audio}))
"""


def start_server(tmp):
    env = dict(os.environ, LOCALAI_STATE_DIR=os.path.join(tmp, "state"),
               LOCALAI_MODELS_DIR=os.path.join(tmp, "models"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "localai.py"), "--host", "127.0.0.1",
                             "--port", "0", "--no-mdns"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=tmp, text=True)
    port, found = [None], threading.Event()

    def pump():
        for line in proc.stdout:
            m = re.search(r"listening on \S+:(\d+)", line)
            if m and port[0] is None:
                port[0] = int(m.group(1))
                found.set()
        found.set()
    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(300) or port[0] is None:
        proc.kill()
        sys.exit("the server did not start")
    return proc, port[0]


def audio_seconds(fmt, data):
    if fmt == "wav":
        with wave.open(BytesIO(data)) as w:
            return w.getnframes() / w.getframerate()
    if fmt == "pcm":
        return len(data) / 2 / RATE
    with tempfile.NamedTemporaryFile(suffix="." + fmt) as f:
        f.write(data)
        f.flush()
        out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "packet=duration_time",
                              "-of", "csv=p=0", f.name], capture_output=True, text=True, timeout=60)
    return sum(float(x) for x in out.stdout.replace(",", " ").split() if x and x != "N/A")


def via_server(port, text, fmt):
    body = json.dumps({"model": "tts-1", "input": text, "voice": "alloy", "response_format": fmt}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    conn.request("POST", "/v1/audio/speech", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = resp.read1(65536)                # the first piece of the body
    ttfb = time.perf_counter() - start
    data = first + resp.read()
    total = time.perf_counter() - start
    conn.close()
    assert resp.status == 200, data[:200]
    return ttfb, total, audio_seconds(fmt, data)


def via_engine(text, fmt):
    from engines import tts
    req = tts.check(text, "alloy", 1.0, fmt)
    start = time.perf_counter()
    chunks = tts.stream(req)
    data = next(chunks)
    ttfb = time.perf_counter() - start
    data += b"".join(chunks)
    return ttfb, time.perf_counter() - start, audio_seconds(fmt, data)


def via_pyttsx3(text):
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", PYTTSX3_REFERENCE, text, os.path.join(tmp, "out.wav")],
                             capture_output=True, text=True, timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        sys.exit("pyttsx3 reference failed:\n" + out.stdout + out.stderr)
    r = json.loads(line[-1][7:])
    return r["seconds"], r["seconds"], r["audio"]


def measure(fn, repeat):
    fn()                                       # warm-up (helper process, caches)
    runs = [fn() for _ in range(repeat)]
    ttfb = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    audio = statistics.median(r[2] for r in runs)
    return ttfb, total / audio, audio, min(r[0] for r in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(tmp)
        try:
            print("%-10s %-8s %-6s %9s %9s %9s %8s" % ("text", "path", "format", "TTFB ms", "best ms", "RTF",
                                                      "audio s"))
            for name, text in TEXTS.items():
                ref = measure(lambda: via_pyttsx3(text), args.repeat)
                rows = [("pyttsx3", "wav", ref)]
                for fmt in ("wav", "mp3", "pcm", "opus"):
                    rows.append(("server", fmt, measure(lambda: via_server(port, text, fmt), args.repeat)))
                rows.append(("engine", "mp3", measure(lambda: via_engine(text, "mp3"), args.repeat)))
                for path, fmt, (ttfb, rtf, audio, best) in rows:
                    print("%-10s %-8s %-6s %9.1f %9.1f %9.4f %8.2f" % (name, path, fmt, ttfb * 1000, best * 1000,
                                                                     rtf, audio))
                for path, fmt, (ttfb, rtf, _, _) in rows[1:]:
                    print("  ratio %s/%s vs pyttsx3: TTFB x%.2f  RTF x%.2f" % (path, fmt, ttfb / ref[0], rtf / ref[1]))
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
