"""Chat faults through a real server and the real SmolLM2: clients that leave
(streaming and not), a full queue, an over-long prompt, a model that fails to
load, and the event loop staying responsive while MLX works.

The server runs with one batch slot and one queue slot (LOCALAI_LLM_BATCH=1,
LOCALAI_LLM_QUEUE=1), so a request can only start once the one before it has left
the engine. That is the proof that a disconnected request really stopped: the
abandoned request asks for 8000 tokens of counting (many minutes on this
machine, and at least 80 s even at llama.cpp's speed), so the next request could
not finish inside its 45 s timeout unless the engine dropped the abandoned one.
Where /api/ps exposes the engine's counters, they are checked too.
"""
import http.client
import json
import select
import shutil
import socket
import statistics
import time

import pytest

MODEL = "smollm2-135m-instruct"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"
LONG = 8000                     # tokens the abandoned requests ask for
NEXT_TIMEOUT = 45               # seconds the follow-up request may take


@pytest.fixture(scope="module")
def store(models_dir, tmp_path_factory):
    """The SmolLM2 store plus 'broken-model': real config and tokenizer, weights cut short."""
    root = tmp_path_factory.mktemp("faults-models")
    good = models_dir / MODEL
    (root / MODEL).symlink_to(good, target_is_directory=True)
    broken = root / "broken-model"
    broken.mkdir()
    for f in good.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, broken / f.name)
    data = (good / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    (broken / "model.safetensors").write_bytes(data[:header + 1000])
    return root


@pytest.fixture(scope="module")
def server(server_env, store, tmp_path_factory):
    from conftest import Server
    env = dict(server_env, LOCALAI_MODELS_DIR=str(store), LOCALAI_LLM_BATCH="1", LOCALAI_LLM_QUEUE="1")
    srv = Server(["--no-mdns"], env, str(tmp_path_factory.mktemp("cwd")))
    yield srv
    srv.stop()


def raw_post(server, path, body):
    """Send a POST on a raw socket and return the socket (the caller reads or leaves)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=120)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return s


def read_until(sock, count_marker, count):
    """Read a streaming response until `count_marker` was seen `count` times."""
    buf = b""
    while buf.count(count_marker) < count:
        chunk = sock.recv(65536)
        assert chunk, "server closed early: %r" % buf[:300]
        buf += chunk
    return buf


def post(server, path, body, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def counters(server):
    """The engine's counters if /api/ps exposes them (any nesting), else None."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/api/ps")
    ps = json.loads(conn.getresponse().read())

    def find(obj):
        if isinstance(obj, dict):
            if "tokens_generated" in obj:
                return obj
            for v in obj.values():
                hit = find(v)
                if hit is not None:
                    return hit
        elif isinstance(obj, list):
            for v in obj:
                hit = find(v)
                if hit is not None:
                    return hit
        return None
    return find(ps)


def long_stream(server):
    return raw_post(server, "/v1/completions", {"model": MODEL, "prompt": COUNTING, "max_tokens": LONG,
                                                "temperature": 0, "stream": True})


def next_request_finishes(server):
    """A short request: it can only run once the engine's single slot is free."""
    t0 = time.monotonic()
    status, _, data = post(server, "/v1/completions", {"model": MODEL, "prompt": COUNTING,
                                                       "max_tokens": 2, "temperature": 0},
                           timeout=NEXT_TIMEOUT)
    assert status == 200, data
    assert json.loads(data)["usage"]["completion_tokens"] == 2
    return time.monotonic() - t0


def test_disconnect_mid_stream_stops_the_engine(server):
    next_request_finishes(server)                 # model loaded, slot free
    before = counters(server)
    sock = long_stream(server)
    seen = read_until(sock, b'"text":"', 4)     # a few tokens really streamed
    assert b"HTTP/1.1 200" in seen and b"text/event-stream" in seen
    sock.close()
    next_request_finishes(server)               # would wait for 8000 tokens otherwise
    after = counters(server)
    if before is not None and after is not None:
        assert after["cancelled"] == before["cancelled"] + 1
        # the abandoned stream made at most a handful of tokens past what we read
        assert after["tokens_generated"] - before["tokens_generated"] < 40


def test_disconnect_mid_non_stream_stops_the_engine(server):
    next_request_finishes(server)
    sock = raw_post(server, "/v1/completions", {"model": MODEL, "prompt": COUNTING,
                                                "max_tokens": LONG, "temperature": 0})
    # nothing comes back until it is done; show that the engine holds it: of two
    # more long requests one waits in the queue and one is refused (the spacing
    # only keeps the arrival order, it proves nothing)
    time.sleep(0.5)
    probe = raw_post(server, "/v1/completions", {"model": MODEL, "prompt": COUNTING,
                                                 "max_tokens": LONG, "temperature": 0})
    time.sleep(0.5)
    probe2 = raw_post(server, "/v1/completions", {"model": MODEL, "prompt": COUNTING,
                                                  "max_tokens": LONG, "temperature": 0})
    ready, _, _ = select.select([probe, probe2], [], [], 60)
    assert ready, "the queue never filled"
    answer = ready[0].recv(65536)
    assert answer.startswith(b"HTTP/1.1 503")
    for s in (sock, probe, probe2):
        s.close()
    next_request_finishes(server)               # neither the running nor the queued one went on


def test_queue_overflow_is_503_with_retry_after_and_queued_leavers_never_run(server):
    next_request_finishes(server)
    before = counters(server)
    running = long_stream(server)
    read_until(running, b'"text":"', 1)         # it holds the only batch slot
    a = long_stream(server)
    b = long_stream(server)
    ready, _, _ = select.select([a, b], [], [], 60)
    assert len(ready) == 1, "exactly one of the two waiting requests is refused"
    refused, queued = (a, b) if ready[0] is a else (b, a)
    head = read_until(refused, b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503")
    retry = [line for line in head.split(b"\r\n") if line.lower().startswith(b"retry-after:")]
    assert retry and int(retry[0].split(b":")[1]) >= 1
    body = head.split(b"\r\n\r\n", 1)[1]
    while not body.endswith(b"}"):
        body += refused.recv(65536)
    assert json.loads(body)["error"]["type"] == "server_error"
    refused.close()
    queued.close()                              # leaves while waiting: must never run
    running.close()
    next_request_finishes(server)               # so neither the queued nor the running one ran on
    after = counters(server)
    if before is not None and after is not None:
        assert after["cancelled_in_queue"] >= before["cancelled_in_queue"] + 1
        assert after["busy_rejections"] >= before["busy_rejections"] + 1


def test_over_long_prompt_is_400_before_any_work(server):
    next_request_finishes(server)
    running = long_stream(server)               # the engine is full: a queued request would wait
    read_until(running, b'"text":"', 1)
    try:
        long_text = "hello " * 9000             # > 8192 tokens of context
        status, _, data = post(server, "/v1/chat/completions",
                               {"model": MODEL, "messages": [{"role": "user", "content": long_text}]})
        err = json.loads(data)["error"]
        assert status == 400 and err["param"] == "messages" and "context" in err["message"]
        status, _, data = post(server, "/api/generate", {"model": MODEL, "prompt": long_text, "raw": True})
        assert status == 400 and "context" in json.loads(data)["error"]
    finally:
        running.close()
    next_request_finishes(server)


def test_head_answers_fast_while_generating(server):
    next_request_finishes(server)
    running = long_stream(server)
    read_until(running, b'"text":"', 2)
    times = []
    try:
        for _ in range(15):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            t0 = time.perf_counter()
            conn.request("HEAD", "/")
            resp = conn.getresponse()
            resp.read()
            times.append(time.perf_counter() - t0)
            conn.close()
            assert resp.status == 200
            running.recv(65536)                 # keep the generation flowing
    finally:
        running.close()
    assert statistics.median(times) < 0.05, times
    assert sorted(times)[-2] < 0.05, times      # all but one outlier of 15 under 50 ms


def test_model_that_fails_to_load_gives_a_clear_error_and_the_next_request_works(server):
    for _ in range(2):                          # a failure is not cached: same answer twice
        status, _, data = post(server, "/v1/chat/completions",
                               {"model": "broken-model", "messages": [{"role": "user", "content": "hi"}]})
        err = json.loads(data)["error"]
        assert status == 503 and "broken-model" in err["message"] and "load" in err["message"]
    next_request_finishes(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/status")
    assert json.loads(conn.getresponse().read())["status"] == "Running"


def test_engine_failure_mid_generation_is_clean_and_the_next_request_works(models_dir):
    """In-process (a real model, a real batch): MLX failing between tokens fails
    that request with EngineFailure (a 500, in-band once streaming) and the engine
    starts a fresh batch, so the next request gives the normal answer."""
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)

    def request():
        return llm.GenRequest(model=info, prompt=COUNTING, max_tokens=6, temperature=0)
    good = "".join(c.text for c in llm.generate(request()))
    batch = llm._SCHED.models[MODEL].gen
    real_next, calls = batch.next, []

    def failing_next():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated MLX failure")
        return real_next()
    batch.next = failing_next
    with pytest.raises(llm.EngineFailure):
        for _ in llm.generate(request()):
            pass
    assert llm._SCHED.models[MODEL].gen is not batch          # a fresh batch replaced it
    assert "".join(c.text for c in llm.generate(request())) == good
    assert llm.stats()["engine_failures"] == 1


def test_request_the_batch_refuses_fails_alone(models_dir, monkeypatch):
    """In-process: a request that mlx-lm's batch refuses when it is put in fails with
    EngineFailure; the request admitted with it still gets its normal answer."""
    import threading
    from mlx_lm.generate import BatchGenerator
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)

    def run(prompt):
        return "".join(c.text for c in llm.generate(llm.GenRequest(
            model=info, prompt=prompt, max_tokens=6, temperature=0), arrival=arrivals[prompt]))
    arrivals = {COUNTING: None}
    good = run(COUNTING)
    real_insert = BatchGenerator.insert_segments
    refused = llm._tokenizer(info).encode("Hi", add_special_tokens=False)

    def insert(self, segments, *a, **kw):
        if segments[0][-1] in (refused, refused[-1:]):
            raise ValueError("refused")
        return real_insert(self, segments, *a, **kw)
    monkeypatch.setattr(BatchGenerator, "insert_segments", insert)
    monkeypatch.setattr(llm, "ADMIT_WINDOW", 5.0)          # both are admitted at once
    before = llm.stats()["engine_failures"]
    arrivals = {p: llm.expect() for p in (COUNTING, "Hi")}
    out = {}

    def worker(p):
        try:
            out[p] = run(p)
        except llm.EngineFailure as e:
            out[p] = e
    threads = [threading.Thread(target=worker, args=(p,)) for p in arrivals]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(out["Hi"], llm.EngineFailure) and out[COUNTING] == good
    assert llm.stats()["engine_failures"] == before + 1


def test_concurrent_requests_share_one_batch(models_dir):
    """In-process: four simultaneous requests are decoded together (one batch of
    four), each gets its own complete answer, and a seeded one is unaffected by
    its neighbours."""
    import threading
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)

    def run(prompt, **kw):
        chunks = list(llm.generate(llm.GenRequest(model=info, prompt=prompt, max_tokens=12, **kw)))
        return "".join(c.text for c in chunks), chunks[-1]
    alone_seeded = run("Once upon a time", temperature=1.0, seed=5)
    llm._SCHED.counters["peak_batch"] = 0      # earlier tests in this process batched more
    out = {}
    prompts = ["Once upon a time", "1, 2, 3,", "The capital of France", "def add(a, b):"]

    def worker(i):
        out[i] = run(prompts[i], temperature=1.0, seed=5) if i == 0 else run(prompts[i], temperature=0)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert llm.stats()["peak_batch"] == 4
    assert all(out[i][1].done and 0 < out[i][1].completion_tokens <= 12 for i in range(4))
    assert out[0][0] == alone_seeded[0]


def test_requests_arriving_together_are_prefilled_together(models_dir, monkeypatch):
    """In-process: a request that is still being tokenized when another one reaches
    an idle engine joins its batch (both are admitted at once and prefilled in one
    pass), and each still gets the answer it gets alone."""
    import threading
    import time
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)

    def req(prompt):
        return llm.GenRequest(model=info, prompt=prompt, max_tokens=8, temperature=0)

    def answer(prompt):
        return "".join(c.text for c in llm.generate(req(prompt)))
    alone = {p: answer(p) for p in ("The capital of France is", "1, 2, 3, 4,")}
    real_prepare = llm._prepare

    def slow_prepare(r, cancel):          # a long prompt: tokenizing takes a while
        if r.prompt.startswith("1,"):
            time.sleep(0.004)
        return real_prepare(r, cancel)
    monkeypatch.setattr(llm, "_prepare", slow_prepare)
    before = llm.stats()["peak_admitted"]
    llm._SCHED.counters["peak_admitted"] = 0
    out = {}
    slow = threading.Thread(target=lambda: out.update(slow=answer("1, 2, 3, 4,")))
    slow.start()
    time.sleep(0.001)                     # the slow one is tokenizing when the other arrives
    out["quick"] = answer("The capital of France is")
    slow.join()
    assert llm.stats()["peak_admitted"] == 2, before
    assert out == {"quick": alone["The capital of France is"], "slow": alone["1, 2, 3, 4,"]}
    # an announced request that fails, or never comes, holds nobody up
    with pytest.raises(llm.BadInput):
        llm.generate(llm.GenRequest(model=info, prompt=""), arrival=llm.expect())
    gone = llm.expect()
    del gone
    assert llm._SCHED.n_arriving == 0


def test_api_chat_without_model_uses_configured_then_first_installed(server, start_server, store):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    # no --model: the first installed model ('broken-model' sorts first) is tried
    status, _, data = post(server, "/api/chat", {"messages": msgs})
    assert status == 503 and "broken-model" in json.loads(data)["error"]
    # --model wins over the first installed
    configured = start_server("--model", MODEL, env={"LOCALAI_MODELS_DIR": str(store)})
    status, _, data = post(configured, "/api/chat", {"messages": msgs, "options": {"temperature": 0}})
    body = json.loads(data)
    assert status == 200 and body["model"] == MODEL and "Paris" in body["message"]["content"]
