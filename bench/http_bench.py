#!/usr/bin/env python3
"""HTTP layer benchmark: localai's hand-written server against a minimal aiohttp
server answering the same JSON, in the same run.

    python bench/http_bench.py                 # 1, 8, 64 connections, 3 rounds of 3 s
    python bench/http_bench.py --rounds 1 --seconds 2

Both servers run as subprocesses, each on one event loop, with access logs off
(ours: --log-level warning; aiohttp: access_log=None), or both with an access
line per request to a file with --access-log. The load comes from a
third process: `wrk` (Debian package `wrk`) when it is installed, else a small
asyncio client (`--client` mode of this script; slower, so the ratios then say
less). Every connection is keep-alive and sends `GET /status` back to back.
For each concurrency the servers take turns, `--rounds` times, and the median of
the rounds is reported: requests/s, p50 and p99 latency, and the ratios
ours/aiohttp (throughput: higher is better; p99: lower is better).
"""
import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATUS_BODY = b'{"status":"Running","message":"Server is currently running."}'

AIOHTTP_SERVER = r'''
import logging, socket, sys
from aiohttp import web
BODY = %r
async def status(request):
    return web.Response(body=BODY, content_type="application/json")
app = web.Application()
app.router.add_get("/status", status)
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", 0))
print("listening on 127.0.0.1:%%d" %% sock.getsockname()[1], flush=True)
access = None
if sys.argv[1:] == ["--access-log"]:
    logging.basicConfig(level=logging.INFO, format="%%(asctime)s %%(levelname)s %%(name)s: %%(message)s")
    access = logging.getLogger("aiohttp.access")
web.run_app(app, sock=sock, access_log=access, print=None, handle_signals=True)
''' % STATUS_BODY


CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
PIN = False                     # --pin: servers on the last CPU, the load generator on the first


def pinned(cpu):
    return (lambda: os.sched_setaffinity(0, {cpu})) if PIN else None


def start(cmd, log_path, env=None):
    """Start a server subprocess logging to a file; return (proc, port) once it listens."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=pinned(CPUS[-1]) if PIN else None)
    log.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"listening on \S+:(\d+)", Path(log_path).read_text())
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not start: %s\n%s" % (" ".join(cmd), Path(log_path).read_text()))


def cpu_seconds(pid):
    """User + system CPU time a process has used (from /proc; Linux)."""
    try:
        fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---------------------------------------------------------------------------
# load generators
# ---------------------------------------------------------------------------
def _ms(text):
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(port, connections, seconds):
    out = subprocess.run(["wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds, "--latency",
                          "http://127.0.0.1:%d/status" % port], capture_output=True, text=True, check=True,
                         preexec_fn=pinned(CPUS[0]) if PIN else None).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return {"rps": rps, "total": total, "p50": p50, "p99": p99, "errors": errors.group(0) if errors else ""}


async def _client(port, connections, seconds):
    request = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port
    latencies, bad = [], 0
    stop_at = time.perf_counter() + seconds

    async def one():
        nonlocal bad
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 200") or body != STATUS_BODY:
                bad += 1
        writer.close()
    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    return {"rps": len(latencies) / elapsed, "total": len(latencies), "p50": pick(0.50), "p99": pick(0.99),
            "errors": "%d bad responses" % bad if bad else ""}


def run_python_client(port, connections, seconds):
    out = subprocess.run([sys.executable, __file__, "--client", str(port), str(connections), str(seconds)],
                         capture_output=True, text=True, check=True,
                         preexec_fn=pinned(CPUS[0]) if PIN else None).stdout
    return json.loads(out)


# ---------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", default="1,8,64")
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--python-client", action="store_true", help="use the asyncio client even if wrk exists")
    ap.add_argument("--pin", action="store_true",
                    help="pin the servers to the last CPU and the load generator to the first (a quiet machine)")
    ap.add_argument("--access-log", action="store_true",
                    help="both servers write an access line per request (to a file), as in normal use")
    ap.add_argument("--client", nargs=3, metavar=("PORT", "CONNECTIONS", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        port, conns, secs = (int(v) for v in args.client)
        print(json.dumps(asyncio.run(_client(port, conns, secs))))
        return 0

    global PIN
    PIN = args.pin and len(CPUS) >= 2
    load = run_wrk if shutil.which("wrk") and not args.python_client else run_python_client
    tmp = tempfile.mkdtemp(prefix="http-bench-")
    env = dict(os.environ, LOCALAI_NO_AUTO_IMPORT="1", LOCALAI_STATE_DIR=tmp, LOCALAI_MODELS_DIR=tmp)
    ours = start([sys.executable, str(ROOT / "localai.py"), "--host", "127.0.0.1", "--port", "0", "--no-mdns",
                  "--log-level", "info" if args.access_log else "warning"], Path(tmp) / "localai.log", env)
    script = Path(tmp) / "aiohttp_server.py"
    script.write_text(AIOHTTP_SERVER)
    ref = start([sys.executable, str(script)] + (["--access-log"] if args.access_log else []),
                Path(tmp) / "aiohttp.log")
    servers = {"localai": ours, "aiohttp": ref}
    print("load generator: %s; %d round(s) of %d s per point; median of rounds; access log %s; %s"
          % ("wrk -t1" if load is run_wrk else "asyncio client", args.rounds, args.seconds,
             "on" if args.access_log else "off",
             "servers pinned to CPU %d, load to CPU %d" % (CPUS[-1], CPUS[0]) if PIN else "not pinned"))
    try:
        for name, (proc, port) in servers.items():          # warm up both
            load(port, 8, 1)
        rows = []
        for conns in (int(c) for c in args.connections.split(",")):
            results = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, (proc, port) in servers.items():
                    cpu = cpu_seconds(proc.pid)
                    result = load(port, conns, args.seconds)
                    result["per_cpu_s"] = result["total"] / max(cpu_seconds(proc.pid) - cpu, 1e-9)
                    results[name].append(result)
            med = {name: {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99", "per_cpu_s")}
                   for name, runs in results.items()}
            errors = "; ".join("%s: %s" % (n, r["errors"]) for n, runs in results.items() for r in runs if r["errors"])
            rows.append((conns, med, errors))
            o, a = med["localai"], med["aiohttp"]
            print("%3d conn  localai %7.0f req/s p50 %6.3f ms p99 %6.2f ms %6.0f req/cpu-s | aiohttp %7.0f req/s "
                  "p50 %6.3f ms p99 %6.2f ms %6.0f req/cpu-s | throughput x%.2f  p99 x%.2f  req/cpu-s x%.2f%s"
                  % (conns, o["rps"], o["p50"], o["p99"], o["per_cpu_s"], a["rps"], a["p50"], a["p99"],
                     a["per_cpu_s"], o["rps"] / a["rps"], o["p99"] / a["p99"], o["per_cpu_s"] / a["per_cpu_s"],
                     ("  ERRORS " + errors) if errors else ""), flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    print("ratios are localai / aiohttp: throughput >= 1.0 and p99 <= 1.0 mean we are not behind; "
          "req/cpu-s (requests per CPU-second of the server process) is the figure least disturbed "
          "by other load on the machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
