#!/usr/bin/env python3
"""Speech-to-text benchmark: localai's /v1/audio/transcriptions against vosk
called directly, on the same 16 kHz PCM, in one run.

    python bench/stt_bench.py [--seconds 15] [--repeat 2]

Prints the real-time factor (processing time / audio time, lower is better):
  * direct: vosk.KaldiRecognizer in this process, the model already loaded;
  * server: one HTTP request (multipart upload of a 16 kHz WAV, so decoding is
    a pass-through) to a fresh `python localai.py` on a free port, model warm;
and the ratios server/direct, then 4 concurrent requests against 1 (wall time
and aggregate throughput), with vosk directly in 4 threads as the reference.
"""
import argparse
import http.client
import io
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engines import audio, stt  # noqa: E402

PHRASES = ["안녕하세요 반갑습니다", "오늘 날씨가 정말 좋습니다", "우리는 공원에 산책을 갑니다",
           "회의는 세 시에 시작합니다", "감사합니다 좋은 하루 되세요"]


def korean_pcm(seconds):
    """espeak-ng Korean speech with short pauses, as 16 kHz mono s16le PCM."""
    with tempfile.TemporaryDirectory() as d:
        pcm, i = b"", 0
        while len(pcm) < seconds * 32000:
            path = os.path.join(d, "p.wav")
            subprocess.run(["espeak-ng", "-v", "ko", "-w", path, PHRASES[i % len(PHRASES)]], check=True)
            pcm += audio.decode(Path(path).read_bytes(), "p.wav").pcm + b"\0\0" * 8000
            i += 1
    return pcm[:int(seconds * 16000) * 2]


def wav_of(pcm):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return buf.getvalue()


def start_server():
    env = dict(os.environ, LOCALAI_NO_AUTO_IMPORT="1", LOCALAI_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "localai.py"), "--host", "127.0.0.1", "--port", "0",
                             "--no-mdns", "--models-dir", tempfile.mkdtemp(prefix="stt-bench-")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        m = re.search(r"listening on \S+:(\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, int(m.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("server did not start")


def post(port, wav):
    b = "benchboundary7"
    body = (('--%s\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
             '--%s\r\nContent-Disposition: form-data; name="language"\r\n\r\nko\r\n'
             '--%s\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
             "Content-Type: audio/wav\r\n\r\n" % (b, b, b)).encode() + wav + ("\r\n--%s--\r\n" % b).encode())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t = time.perf_counter()
    conn.request("POST", "/v1/audio/transcriptions", body, {"Content-Type": "multipart/form-data; boundary=" + b})
    r = conn.getresponse()
    data = r.read()
    elapsed = time.perf_counter() - t
    conn.close()
    if r.status != 200:
        raise SystemExit("server answered %d: %s" % (r.status, data[:200]))
    return elapsed, json.loads(data)["text"]


def direct(model, pcm):
    t = time.perf_counter()
    stt._run_recognizer(model, pcm, None)
    return time.perf_counter() - t


def concurrently(fn, n):
    """Wall time for n simultaneous fn() calls."""
    threads = [threading.Thread(target=fn) for _ in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="audio length")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement (median)")
    args = ap.parse_args()
    pcm = korean_pcm(args.seconds)
    dur = len(pcm) / 32000
    wav = wav_of(pcm)
    engine = stt.SpeechToText()
    t = time.perf_counter()
    model = engine.load(engine.choose("ko"))
    print("audio %.1f s of espeak-ng Korean; model load %.2f s; %d CPU cores; load average %.1f"
          % (dur, time.perf_counter() - t, os.cpu_count(), os.getloadavg()[0]))

    proc, port = start_server()
    try:
        post(port, wav)                                  # warm: the server loads its model
        runs = {"d1": [], "s1": [], "d4": [], "s4": []}
        for _ in range(args.repeat):                     # interleaved: other load hits both alike
            runs["d1"].append(direct(model, pcm))
            runs["s1"].append(post(port, wav)[0])
            runs["d4"].append(concurrently(lambda: direct(model, pcm), 4))
            runs["s4"].append(concurrently(lambda: post(port, wav), 4))
        d1, s1, d4, s4 = (statistics.median(runs[k]) for k in ("d1", "s1", "d4", "s4"))
        print("1 request   direct vosk RTF %.3f   server RTF %.3f   server/direct %.2fx"
              % (d1 / dur, s1 / dur, s1 / d1))
        print("4 at once   direct wall %.2f s (%.2fx of one)   server wall %.2f s (%.2fx of one)   server/direct %.2fx"
              % (d4, d4 / d1, s4, s4 / s1, s4 / d4))
        print("throughput  4 concurrent vs 1: direct %.2fx   server %.2fx   (audio seconds per second: %.1f vs %.1f)"
              % (4 * d1 / d4, 4 * s1 / s4, 4 * dur / s4, dur / s1))
        print("load average at the end %.1f (other work on the machine skews every figure)" % os.getloadavg()[0])
    finally:
        proc.terminate()
        proc.wait(20)


if __name__ == "__main__":
    main()
