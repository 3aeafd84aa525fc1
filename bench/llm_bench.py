"""LLM speed: ours beside mlx-lm's defaults, mlx_lm.server and llama.cpp, in one run.

    python bench/llm_bench.py                 # ~11 minutes on 2 cores
    python bench/llm_bench.py --quick         # shorter prompts/outputs, 1 and 4 streams
    python bench/llm_bench.py --only ours-engine,mlx-lm

Same model (the embedded SmolLM2-135M-Instruct imported from its GGUF, or --models-dir
and --model), same prompts, same machine. Every contender runs in its own fresh
process, one after another, so none inherits another's BLAS preload or warm caches:

  mlx-lm          mlx_lm.load + stream_generate, library defaults (the reference)
  ours-raw        the same loop after engines.mlx_setup configure()/prepare()
                  (what issue 8's setup alone buys; only with --only ours-raw,...)
  ours-engine     engines.llm.generate in-process (scheduler, batching, sampler)
  ours-http       python localai.py, streamed SSE from /v1/completions
  mlx_lm.server   python -m mlx_lm.server on the same weights, same requests
  llama.cpp       llama_cpp.Llama on the GGUF (only if llama_cpp is importable;
                  `pip install llama-cpp-python` compiles it for this CPU. On CPUs
                  with AMX (Sapphire Rapids and later) that build crashed in
                  ggml_backend_amx_mul_mat on any prompt of two tokens or more,
                  ggml-org/llama.cpp#20824; build it without AMX there (F: the
                  flags -mno-amx-tile -mno-amx-int8 -mno-amx-bf16):
                  CMAKE_ARGS="-DCMAKE_C_FLAGS='F' -DCMAKE_CXX_FLAGS='F'" pip install
                  --force-reinstall --no-cache-dir --no-binary llama-cpp-python
                  llama-cpp-python; without --no-binary pip may take a wheel it
                  built earlier, with AMX)

Figures: decode tok/s (one stream, after the first token), prefill tok/s and time to
first token for a ~1000-token prompt, time to first token for a short prompt,
aggregate completion tok/s with 1, 4 and 8 concurrent streams, and (our engine and
server) seconds for four streams whose prompts differ in length, sent together and
one after another. The reference paths are slow on a CPU (about 7 tok/s decode, 14
tok/s prefill), so they decode fewer tokens (--ref-tokens); rates are per token, so
the comparison stays fair.
Each decode figure is the median of DECODE_ROUNDS answers, each aggregate figure the
median of AGG_ROUNDS runs, interleaved across the stream counts. The machine is
shared: run it twice and trust figures that agree.
"""
import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DECODE_PROMPT = "Count from {start} to 2000, separated by commas: {start}, {next},"
FILLER = ("The history of the city is long and full of small events that nobody wrote "
          "down, so what we know comes from letters, tax rolls and the stones of old "
          "houses. Merchants came by river and by road; some stayed. ")
RESULT = "BENCH-RESULT "
# Runs behind each aggregate figure (the median is reported).
AGG_ROUNDS = 3
# Answers behind each decode figure (the median): one answer takes a few seconds, and
# the VM's slow spells moved single ones by 20-30% (HTTP / engine read 0.72-1.08x).
DECODE_ROUNDS = 3
# Prompt lengths (tokens) of the four streams in the mixed-lengths figure.
MIXED_PROMPT_TOKENS = (40, 100, 200, 450)


# --- prompts ---------------------------------------------------------------------------
def long_prompt(tok, n_tokens, salt):
    """Text of about n_tokens tokens, different per salt (no prefix-cache hits)."""
    text = f"[{salt}] Summarise this text. "
    while len(tok.encode(text)) < n_tokens:
        text += FILLER
    ids = tok.encode(text)[:n_tokens]
    return tok.decode(ids)


def decode_prompt(i):
    start = 17 + 31 * i
    return DECODE_PROMPT.format(start=start, next=start + 1)


def decode_median(one, tokens):
    """one(prompt, tokens) for DECODE_ROUNDS decode prompts: the answer whose decode
    rate is the median."""
    runs = [one(decode_prompt(i), tokens) for i in range(DECODE_ROUNDS)]
    runs.sort(key=lambda r: r.get("decode_tps") or 0)
    return runs[len(runs) // 2]


def rates(marks, prompt_tokens, t_start):
    """marks: list of (time, tokens_so_far) per produced piece."""
    if not marks:
        return {}
    first_t = marks[0][0]
    out = {"ttft": first_t - t_start, "tokens": marks[-1][1],
           "prefill_tps": prompt_tokens / (first_t - t_start) if prompt_tokens else None}
    if len(marks) > 1 and marks[-1][1] > marks[0][1]:
        out["decode_tps"] = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - first_t)
    return out


# --- workers (each in a fresh process) --------------------------------------------------
def worker_mlx(args, ours):
    if ours:
        from engines import mlx_setup
        mlx_setup.configure()
    import mlx.core as mx  # noqa: F401
    from mlx_lm import load, stream_generate
    model, tok = load(args.path)
    setup = None
    if ours:
        model = mlx_setup.prepare(model)
        setup = mlx_setup.describe(model)
    res = {"setup": setup}

    def one(prompt_text, max_tokens):
        ids = tok.encode(prompt_text)
        t0 = time.perf_counter()
        marks = []
        for r in stream_generate(model, tok, ids, max_tokens=max_tokens):
            marks.append((time.perf_counter(), r.generation_tokens))
        return rates(marks, len(ids), t0)

    one(decode_prompt(99), 4)                                   # warm-up
    n = args.tokens if ours else args.ref_tokens
    res["decode"] = decode_median(one, n)
    res["short"] = one("Hello! How are you today?", 1)
    res["long"] = one(long_prompt(tok, args.prompt_tokens, "mlx"), 1)
    return res


def worker_engine(args):
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(Path(args.models_dir)).resolve(args.model)
    tok = llm._tokenizer(info)

    def one(prompt_text, max_tokens):
        req = llm.GenRequest(model=info, prompt=prompt_text, max_tokens=max_tokens,
                             temperature=0.0)
        t0 = time.perf_counter()
        marks, last = [], None
        for c in llm.generate(req):
            if c.done:
                last = c
                break
            if c.text:
                marks.append((time.perf_counter(), None))
        n = last.completion_tokens if last else 0
        # Spread the exact count over the text pieces (a piece may hold several tokens).
        out = rates([(t, (i + 1) * n / len(marks)) for i, (t, _) in enumerate(marks)],
                    last.prompt_tokens if last else 0, t0)
        out["completion_tokens"] = n
        out["end"] = time.perf_counter()
        return out

    one(decode_prompt(99), 4)                                   # load + warm-up
    res = {"setup": None}
    try:
        from engines import mlx_setup
        res["setup"] = mlx_setup.describe()
    except ImportError:
        pass
    res["decode"] = decode_median(one, args.tokens)
    res["short"] = one("Hello! How are you today?", 1)
    res["long"] = one(long_prompt(tok, args.prompt_tokens, "engine"), 1)
    res["streams"] = aggregates(args.streams, one, args.tokens)
    res["mixed"] = mixed_lengths(one, tok, args.tokens)
    return res


def send_together(one, prompts, tokens):
    """one(prompt, tokens) for every prompt, each in its own thread, all sent at the
    same moment: (that moment, their results), once all have finished."""
    out = [None] * len(prompts)
    start = threading.Barrier(len(prompts) + 1)

    def run(i):
        start.wait()
        out[i] = one(prompts[i], tokens)
    ths = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in ths:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in ths:
        t.join()
    return t0, out


def aggregates(ns, one, tokens):
    """{n: completion tok/s of n concurrent streams of `tokens` each} for n in ns
    (one(prompt, tokens) runs one stream): the median of AGG_ROUNDS runs, the rounds
    interleaved across the n so that a slow spell of the machine hits every n
    alike; every run has new prompts (no prefix-cache hits). A short warm-up with
    each n first: the first batch of a new size traces the engine's compiled step
    for that size (once per process)."""
    def together(n, n_tokens, salt):
        t0, out = send_together(
            one, [decode_prompt(i + 1 + 10 * n + salt) for i in range(n)], n_tokens)
        return sum(o["completion_tokens"] for o in out) / (max(o["end"] for o in out) - t0)
    for n in ns:
        together(n, 4, 500)
    runs = {n: [] for n in ns}
    for r in range(AGG_ROUNDS):
        for n in ns:
            runs[n].append(together(n, tokens, 1000 * (r + 1)))
    return {str(n): statistics.median(v) for n, v in runs.items()}


def mixed_lengths(one, tok, tokens):
    """Seconds for four streams of `tokens` each whose prompts differ in length
    (MIXED_PROMPT_TOKENS), sent at the same moment and one after another: the
    medians of AGG_ROUNDS runs, new prompts every run. Prompts are compute-bound,
    so together can win only what batched decoding saves, and loses whatever the
    engine pads."""
    together, apart = [], []
    for r in range(AGG_ROUNDS):
        t0 = time.perf_counter()
        for n in MIXED_PROMPT_TOKENS:
            one(long_prompt(tok, n, f"apart{r}-{n}"), tokens)
        apart.append(time.perf_counter() - t0)
        t0, _ = send_together(
            one, [long_prompt(tok, n, f"together{r}-{n}") for n in MIXED_PROMPT_TOKENS],
            tokens)
        together.append(time.perf_counter() - t0)
    return {"together": statistics.median(together), "apart": statistics.median(apart)}


def worker_llama(args):
    import llama_cpp
    gguf = args.gguf
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=4096, n_threads=os.cpu_count(),
                          verbose=False)

    def one(prompt_text, max_tokens):
        t0 = time.perf_counter()
        marks = []
        n_prompt = len(llm.tokenize(prompt_text.encode()))
        for _ in llm.create_completion(prompt_text, max_tokens=max_tokens, temperature=0,
                                       stream=True):
            marks.append((time.perf_counter(), len(marks) + 1))
        return rates(marks, n_prompt, t0)

    class T:
        def encode(self, s):
            return llm.tokenize(s.encode(), add_bos=False)

        def decode(self, ids):
            return llm.detokenize(ids).decode(errors="ignore")
    one(decode_prompt(99), 4)
    return {"decode": decode_median(one, args.tokens),
            "short": one("Hello! How are you today?", 1),
            "long": one(long_prompt(T(), args.prompt_tokens, "llama"), 1)}


# --- HTTP contenders ---------------------------------------------------------------------
def sse_completion(port, model, prompt, max_tokens, path="/v1/completions"):
    """Stream one completion; returns rates() plus completion_tokens and end time."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    marks, usage = [], None
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        if obj.get("usage"):
            usage = obj["usage"]
        for ch in obj.get("choices") or []:
            if ch.get("text"):
                marks.append(time.perf_counter())
    conn.close()
    prompt_tokens = (usage or {}).get("prompt_tokens", 0)
    n = (usage or {}).get("completion_tokens") or len(marks)
    # Spread the usage count over the pieces (a piece may hold several tokens).
    pts = [(t, (i + 1) * n / len(marks)) for i, t in enumerate(marks)] if marks else []
    out = rates(pts, prompt_tokens, t0)
    out["completion_tokens"] = n
    out["end"] = time.perf_counter()
    return out


def http_suite(port, model, args, tok, n_tokens, streams, salt, long=True):
    sse_completion(port, model, decode_prompt(99), 4)                # load + warm-up
    res = {"decode": decode_median(lambda prompt, k: sse_completion(port, model, prompt, k),
                                   n_tokens),
           "short": sse_completion(port, model, "Hello! How are you today?", 1)}
    if long:
        res["long"] = sse_completion(port, model, long_prompt(tok, args.prompt_tokens, salt), 1)
    res["streams"] = aggregates(
        streams, lambda prompt, k: sse_completion(port, model, prompt, k), n_tokens)
    if long:
        res["mixed"] = mixed_lengths(
            lambda prompt, k: sse_completion(port, model, prompt, k), tok, n_tokens)
    return res


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError("server exited early")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("server did not open its port")


def run_ours_http(args, tok):
    state = tempfile.mkdtemp(prefix="bench-state-")
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOCALAI_STATE_DIR=state, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "localai.py"), "--host",
                             "127.0.0.1", "--port", "0", "--no-mdns", "--models-dir",
                             args.models_dir], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=state)
    lines = []
    try:
        port = None
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"listening on \S+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            raise RuntimeError("localai did not start:\n" + "".join(lines)[-2000:])
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout],
                         daemon=True).start()
        res = http_suite(port, args.model, args, tok, args.tokens, args.streams, "http")
        res["banner"] = [x.rstrip() for x in lines if "mlx" in x.lower() or "blas" in x.lower()][:6]
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/api/ps")
            res["ps"] = json.loads(conn.getresponse().read())
            conn.close()
        except (OSError, ValueError):
            pass
        return res
    finally:
        stop_process(proc)


def stop_process(proc):
    """SIGTERM, then SIGKILL if it has not exited within 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_mlx_server(args, tok):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", args.path,
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_port(port, proc)
        streams = [n for n in args.streams if n <= 4]
        # No 1000-token prompt here: at the reference's ~10 tok/s it costs minutes and
        # the in-process mlx-lm column already gives the reference prefill figure.
        return http_suite(port, args.path, args, tok, args.ref_tokens, streams, "server",
                          long=False)
    finally:
        stop_process(proc)


# --- driver ---------------------------------------------------------------------------------
def spawn_worker(kind, args):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--models-dir", args.models_dir, "--model", args.model,
           "--tokens", str(args.tokens), "--ref-tokens", str(args.ref_tokens),
           "--prompt-tokens", str(args.prompt_tokens),
           "--streams", ",".join(map(str, args.streams))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", LOCALAI_STATE_DIR=tempfile.mkdtemp())
    if kind.startswith("ours"):
        # the malloc localai.py restarts itself with (the references keep the system's)
        from engines import mlx_setup
        env = mlx_setup.allocator_env(env) or env
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    for line in r.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
    raise RuntimeError(f"{kind} failed ({how}):\n{r.stderr[-2000:]}")


def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v * 1000:.0f}"
    return f"{v:.1f}"


def report(results, args):
    cols = [k for k in ("mlx-lm", "ours-raw", "ours-engine", "ours-http", "mlx_lm.server",
                        "llama.cpp") if k in results]

    def g(name, *path):
        v = results.get(name)
        for p in path:
            if not isinstance(v, dict):
                return None
            v = v.get(p)
        return v
    rows = [("decode tok/s (1 stream)", ("decode", "decode_tps"), ""),
            (f"prefill tok/s ({args.prompt_tokens}-token prompt)", ("long", "prefill_tps"), ""),
            (f"TTFT ms, {args.prompt_tokens}-token prompt", ("long", "ttft"), "ms"),
            ("TTFT ms, short prompt", ("short", "ttft"), "ms")]
    rows += [(f"aggregate tok/s, {n} stream{'s' if n > 1 else ''}", ("streams", str(n)), "")
             for n in args.streams]
    mixed = "-".join(str(n) for n in (MIXED_PROMPT_TOKENS[0], MIXED_PROMPT_TOKENS[-1]))
    rows += [(f"s, 4 prompts {mixed} tok, together", ("mixed", "together"), ""),
             (f"s, 4 prompts {mixed} tok, in a row", ("mixed", "apart"), "")]
    w = 34
    print("\n" + "figure".ljust(w) + "".join(c.rjust(14) for c in cols))
    for label, path, unit in rows:
        print(label.ljust(w) + "".join(fmt(g(c, *path), unit).rjust(14) for c in cols))

    print("\nratios")

    def ratio(label, a, b, goal=None):
        if a and b:
            s = f"  {label}: {a / b:.2f}x"
            if goal:
                s += f"  (goal >= {goal}x: {'met' if a / b >= goal else 'NOT met'})"
            print(s)
    for ours in ("ours-raw", "ours-engine", "ours-http"):
        ratio(f"decode  {ours} / mlx-lm", g(ours, "decode", "decode_tps"),
              g("mlx-lm", "decode", "decode_tps"), 4 if ours == "ours-engine" else None)
        ratio(f"prefill {ours} / mlx-lm", g(ours, "long", "prefill_tps"),
              g("mlx-lm", "long", "prefill_tps"), 4 if ours == "ours-engine" else None)
    for ours in ("ours-engine", "ours-http"):
        for n in args.streams:
            if n > 1:
                ratio(f"{ours} {n} streams / 1 stream (aggregate)", g(ours, "streams", str(n)),
                      g(ours, "streams", "1"), 2.5 if n == 4 else None)
    for ours in ("ours-engine", "ours-http"):
        ratio(f"{ours} mixed prompt lengths: in a row / together",
              g(ours, "mixed", "apart"), g(ours, "mixed", "together"))
    ratio("decode  ours-http / ours-engine", g("ours-http", "decode", "decode_tps"),
          g("ours-engine", "decode", "decode_tps"), 0.97)
    ratio("decode  ours-http / mlx-lm stream_generate", g("ours-http", "decode", "decode_tps"),
          g("mlx-lm", "decode", "decode_tps"), 0.97)
    ratio("decode  ours-http / mlx_lm.server", g("ours-http", "decode", "decode_tps"),
          g("mlx_lm.server", "decode", "decode_tps"))
    ratio("decode  ours-engine / llama.cpp", g("ours-engine", "decode", "decode_tps"),
          g("llama.cpp", "decode", "decode_tps"), 0.5)
    ratio("prefill ours-engine / llama.cpp", g("ours-engine", "long", "prefill_tps"),
          g("llama.cpp", "long", "prefill_tps"))
    for m in (g("ours-http", "ps") or {}).get("models", []):
        d = {k: v for k, v in m.items() if k in ("device", "dtype", "blas", "blas_threads")}
        for k, v in {**(m.get("details") or {}), **(m.get("engine") or {})}.items():
            if k in ("device", "dtype", "blas", "blas_threads"):
                d[k] = v
        if d:
            print("\nserver /api/ps: " + ", ".join(f"{k}={v}" for k, v in d.items()))
    setup = g("ours-engine", "setup") or g("ours-raw", "setup")
    if setup:
        print("\nour MLX setup: device=%s dtype=%s blas=%s threads=%s shim=%s" % (
            setup.get("device"), setup.get("dtype"), setup.get("blas"),
            setup.get("blas_threads"), setup.get("shim")))
        for r in setup.get("reasons", []):
            print("  - " + r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short prompts and outputs")
    ap.add_argument("--models-dir", help="model store (default: import the embedded GGUF)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, help="tokens decoded per stream by our paths")
    ap.add_argument("--ref-tokens", type=int, help="tokens decoded by the slow references")
    ap.add_argument("--prompt-tokens", type=int, help="long-prompt length (default 1000)")
    ap.add_argument("--streams", help="concurrent streams, e.g. 1,4,8")
    ap.add_argument("--only", help="comma list of contenders to run")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    q = args.quick
    args.tokens = args.tokens or (48 if q else 128)
    args.ref_tokens = args.ref_tokens or (16 if q else 48)
    args.prompt_tokens = args.prompt_tokens or (300 if q else 1000)
    args.streams = [int(x) for x in (args.streams or ("1,4" if q else "1,4,8")).split(",")]

    if args.models_dir is None:
        from tests.models_fixture import imported_models_dir
        args.models_dir = str(imported_models_dir(
            Path(tempfile.gettempdir()) / "localai-bench-models"))
    from engines.catalog import Catalog
    info = Catalog(Path(args.models_dir)).resolve(args.model)
    args.path = str(info.path)
    from engines.catalog import embedded_gguf
    args.gguf = str(embedded_gguf() or "") or None

    if args.worker:
        if args.worker == "mlx-lm":
            res = worker_mlx(args, ours=False)
        elif args.worker == "ours-raw":
            res = worker_mlx(args, ours=True)
        elif args.worker == "ours-engine":
            res = worker_engine(args)
        elif args.worker == "llama.cpp":
            res = worker_llama(args)
        print(RESULT + json.dumps(res))
        return

    from tokenizers import Tokenizer

    class Tok:
        def __init__(self, path):
            self.t = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))

        def encode(self, s):
            return self.t.encode(s, add_special_tokens=False).ids

        def decode(self, ids):
            return self.t.decode(ids)
    tok = Tok(args.path)

    order = ["mlx-lm", "ours-engine", "ours-http", "mlx_lm.server"]
    try:
        import importlib.util
        if importlib.util.find_spec("llama_cpp") and args.gguf:
            order.append("llama.cpp")
    except ImportError:
        pass
    if args.only:
        keep = args.only.split(",")
        order = [k for k in ["mlx-lm", "ours-raw", "ours-engine", "ours-http",
                             "mlx_lm.server", "llama.cpp"] if k in keep]
    print(f"model {args.model} ({args.path}); prompt {args.prompt_tokens} tokens; decode "
          f"{args.tokens} (references {args.ref_tokens}); streams {args.streams}; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for kind in order:
        t0 = time.perf_counter()
        try:
            if kind == "ours-http":
                results[kind] = run_ours_http(args, tok)
            elif kind == "mlx_lm.server":
                results[kind] = run_mlx_server(args, tok)
            else:
                results[kind] = spawn_worker(kind, args)
            print(f"  {kind}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        except Exception as e:
            print(f"  {kind}: FAILED {type(e).__name__}: {str(e)[:500]}", flush=True)
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
