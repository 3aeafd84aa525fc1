"""Chat and completion through a real server, the real SmolLM2 and real clients
(the openai and ollama packages, http.client). Issue 4's acceptance.

Counts are checked against the model's own tokenizer loaded independently with
transformers (not through the server or mlx-lm), and greedy answers against the
known answer of this model, so a canned or broken server fails.
"""
import http.client
import json
import sys
import time

import pytest

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"      # a raw prompt the model continues for long


@pytest.fixture(scope="module")
def server(server_env, models_dir, tmp_path_factory):
    from conftest import Server
    env = dict(server_env, LOCALAI_MODELS_DIR=str(models_dir))
    srv = Server(["--no-mdns"], env, str(tmp_path_factory.mktemp("cwd")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer(models_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(models_dir / MODEL))


@pytest.fixture(scope="module")
def oai(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="local", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oll(server):
    import ollama
    return ollama.Client(host=server.url, timeout=120)


def prompt_len(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def post(server, path, body, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.request("POST", path, json.dumps(body) if not isinstance(body, bytes) else body,
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


# -- OpenAI dialect ---------------------------------------------------------------
def test_openai_chat_answer_and_exact_usage(oai, tokenizer):
    r = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens == prompt_len(tokenizer, FRANCE)
    # the end-of-turn token is not output: the text re-encodes to the exact count
    assert r.usage.completion_tokens == len(tokenizer.encode(choice.message.content,
                                                             add_special_tokens=False))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_temperature_zero_is_deterministic_and_reuses_the_prompt_cache(oai):
    a = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    b = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    assert a.choices[0].message.content == b.choices[0].message.content
    # the same prompt again: everything but the last token comes from the cache
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens - 1


def test_follow_up_turn_reuses_the_conversation_prefix(oai, tokenizer):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."}]
    first = oai.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=8)
    turn2 = msgs + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "Another one?"}]
    second = oai.chat.completions.create(model=MODEL, messages=turn2, temperature=0, max_tokens=4)
    assert second.usage.prompt_tokens == prompt_len(tokenizer, turn2)
    # at least the whole first prompt was not computed again
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_shared_system_prompt_is_reused_across_conversations(oai, tokenizer):
    system = {"role": "system", "content": "You are a pirate of the seven seas; answer with arrs."}
    sys_text = tokenizer.apply_chat_template([system], tokenize=False)
    sys_len = len(tokenizer.encode(sys_text, add_special_tokens=False))
    first = oai.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": "Hello?"}],
                                        temperature=0, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens < sys_len
    other = oai.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": "Name a fish."}],
                                        temperature=0, max_tokens=2)
    assert other.usage.prompt_tokens_details.cached_tokens >= sys_len


def test_max_tokens_5_gives_length_and_5_tokens(oai):
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}],
                                    temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    r = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_stream_matches_non_stream_with_role_finish_and_usage(oai):
    full = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30,
                                              stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == full.choices[0].message.content
    assert len([c for c in body if c.choices[0].delta.content]) >= 3     # really streamed
    assert body[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_sequences_are_cut_and_not_returned(oai):
    base = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30)
    text = base.choices[0].message.content
    assert "Paris" in text
    r = oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30, stop=["Paris"])
    assert r.choices[0].message.content == text[:text.index("Paris")]
    assert r.choices[0].finish_reason == "stop"
    # a stop string that spans tokens, streamed: held back, then cut
    cut = text.index(" of Fr")
    chunks = list(oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=30,
                                              stop=[" of Fr", "zzz"], stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_repeats_and_n2_gives_independent_samples(oai):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Write a poem about the sea."}],
               temperature=1.0, max_tokens=16)
    a = oai.chat.completions.create(seed=1234, **ask)
    b = oai.chat.completions.create(seed=1234, **ask)
    assert a.choices[0].message.content == b.choices[0].message.content
    two = oai.chat.completions.create(n=2, seed=99, **ask)
    assert [c.index for c in two.choices] == [0, 1]
    texts = [c.message.content for c in two.choices]
    assert texts[0] != texts[1]                 # samples, not copies
    # seeded n=2 is itself repeatable
    again = oai.chat.completions.create(n=2, seed=99, **ask)
    assert [c.message.content for c in again.choices] == texts


def test_n2_streams_both_choices(oai):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=6,
                                              n=2, stream=True))
    per = {0: "", 1: ""}
    finish = {}
    for c in chunks:
        for ch in c.choices:
            per[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert per[0] == per[1] and per[0]          # greedy: both the same answer
    assert set(finish) == {0, 1}


def test_completions_plain_and_streamed(oai, tokenizer):
    r = oai.completions.create(model=MODEL, prompt=COUNTING, temperature=0, max_tokens=5)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == len(tokenizer.encode(COUNTING))
    assert r.choices[0].text.strip().startswith("9")
    chunks = list(oai.completions.create(model=MODEL, prompt=COUNTING, temperature=0, max_tokens=5,
                                         stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5


def test_legacy_alias_v1_chat(server):
    status, _, data = post(server, "/v1/chat", {"model": MODEL, "messages": FRANCE, "temperature": 0,
                                                "max_tokens": 30})
    body = json.loads(data)
    assert status == 200 and body["object"] == "chat.completion"
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_content_parts_are_joined(oai):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]}]
    r = oai.chat.completions.create(model=MODEL, messages=parts, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content


# -- Ollama dialect ---------------------------------------------------------------
def test_ollama_chat_counts_and_durations(oll, tokenizer):
    r = oll.chat(model=MODEL, messages=FRANCE, options={"temperature": 0}, stream=False)
    assert "Paris" in r.message.content and r.message.role == "assistant"
    assert r.done and r.done_reason == "stop"
    assert r.prompt_eval_count == prompt_len(tokenizer, FRANCE)
    assert r.eval_count == len(tokenizer.encode(r.message.content, add_special_tokens=False))
    assert r.total_duration >= r.eval_duration > 0 and r.prompt_eval_duration > 0


def test_ollama_chat_stream(oll):
    full = oll.chat(model=MODEL, messages=FRANCE, options={"temperature": 0})
    parts = list(oll.chat(model=MODEL, messages=FRANCE, options={"temperature": 0}, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == full.message.content
    assert parts[-1].eval_count == full.eval_count and parts[-1].done_reason == "stop"


def test_ollama_generate_and_options(oll):
    r = oll.generate(model=MODEL, prompt="What is the capital of France?", options={"temperature": 0})
    assert "Paris" in r.response and r.done_reason == "stop"
    r = oll.generate(model=MODEL, prompt=COUNTING, raw=True, options={"temperature": 0, "num_predict": 3})
    assert r.done_reason == "length" and r.eval_count == 3
    assert r.response.strip().startswith("9")
    parts = list(oll.generate(model=MODEL, prompt=COUNTING, raw=True, stream=True,
                              options={"temperature": 0, "num_predict": 3}))
    assert "".join(p.response for p in parts) == r.response and parts[-1].eval_count == 3
    # the seed's camelCase aliases are read (topK 1 is greedy whatever the temperature)
    greedy = oll.generate(model=MODEL, prompt=COUNTING, raw=True, options={"temperature": 0, "num_predict": 6})
    alias = oll.generate(model=MODEL, prompt=COUNTING, raw=True,
                         options={"temperature": 1.5, "topK": 1, "topP": 0.5, "num_predict": 6})
    assert alias.response == greedy.response


def test_ollama_system_and_show(oll):
    r = oll.generate(model=MODEL, prompt="What is the capital of France?",
                     system="You are a helpful assistant.", options={"temperature": 0, "num_predict": 20})
    assert r.done
    show = oll.show(MODEL)
    assert "completion" in show.capabilities


def test_api_chat_model_fallback(server):
    status, _, data = post(server, "/api/chat", {"messages": FRANCE, "options": {"temperature": 0}})
    body = json.loads(data)
    assert status == 200 and body["model"] == MODEL and "Paris" in body["message"]["content"]


def test_keep_alive_load_and_unload(server):
    status, _, data = post(server, "/api/generate", {"model": MODEL, "keep_alive": "-1"})
    assert status == 200 and json.loads(data)["done_reason"] == "load"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/api/ps")
    ps = json.loads(conn.getresponse().read())
    assert [m["name"] for m in ps["models"]] == [MODEL]
    # what the CPU engine chose for it, and why (issue 8): float32 weights, the fused
    # decode step, every decode product from the quantized form
    engine = ps["models"][0]["engine"]
    assert engine["device"] == "cpu" and engine["dtype"] == "float32", engine
    assert engine["decode"] == "fused" and engine["quantized_products"] == 30 * 4 + 1, engine
    assert any("quantized form" in r for r in engine["reasons"]), engine
    status, _, data = post(server, "/api/generate", {"model": MODEL, "keep_alive": 0})
    assert status == 200 and json.loads(data)["done_reason"] == "unload"
    conn.request("GET", "/api/ps")
    assert json.loads(conn.getresponse().read())["models"] == []
    # the next request loads it again and reports the load time
    status, _, data = post(server, "/api/generate", {"model": MODEL, "prompt": COUNTING, "raw": True,
                                                     "options": {"num_predict": 1}})
    assert status == 200 and json.loads(data)["load_duration"] > 0


def test_idle_model_is_unloaded_when_its_keep_alive_runs_out(server):
    status, _, data = post(server, "/api/chat", {"model": MODEL, "messages": FRANCE, "keep_alive": "1s",
                                                 "options": {"num_predict": 1}})
    assert status == 200
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    deadline = time.monotonic() + 20
    while True:
        conn.request("GET", "/api/ps")
        models = json.loads(conn.getresponse().read())["models"]
        if not models:
            break
        assert time.monotonic() < deadline, models
        time.sleep(0.2)


# -- validation ---------------------------------------------------------------------
@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"temperature": True}, "temperature"),
    ("/v1/chat/completions", {"temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": 10 ** 6}, "max_tokens"),
    ("/v1/chat/completions", {"n": 100}, "n"),
    ("/v1/chat/completions", {"n": 1.5}, "n"),
    ("/v1/chat/completions", {"seed": "x"}, "seed"),
    ("/v1/chat/completions", {"stop": [1]}, "stop"),
    ("/v1/chat/completions", {"stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
])
def test_openai_validation_is_400_with_param(server, path, body, param):
    base = {"model": MODEL, "messages": FRANCE} if "chat" in path else {"model": MODEL, "prompt": "hi"}
    status, _, data = post(server, path, {**base, **body})
    err = json.loads(data)["error"]
    assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param


def test_nan_is_rejected(server):
    status, _, data = post(server, "/v1/chat/completions",
                           b'{"model": "%s", "messages": [], "temperature": NaN}' % MODEL.encode())
    assert status == 400


@pytest.mark.parametrize("path,body", [
    ("/api/chat", {"format": "json"}),
    ("/api/chat", {"options": {"temperature": False}}),
    ("/api/chat", {"options": {"topK": "many"}}),
    ("/api/chat", {"options": {"num_predict": 10 ** 7}}),
    ("/api/chat", {"options": {"mirostat": 2}}),
    ("/api/chat", {"options": "hot"}),
    ("/api/chat", {"keep_alive": "soon"}),
    ("/api/generate", {"model": None}),
])
def test_ollama_validation_is_400(server, path, body):
    base = {"model": MODEL, "messages": FRANCE} if path == "/api/chat" else {"prompt": "hi"}
    status, _, data = post(server, path, {**base, **body})
    assert status == 400 and isinstance(json.loads(data)["error"], str)


def test_unknown_model_is_404_in_both_shapes(server):
    status, _, data = post(server, "/v1/chat/completions", {"model": "nope", "messages": FRANCE})
    assert status == 404 and json.loads(data)["error"]["type"] == "not_found_error"
    status, _, data = post(server, "/api/generate", {"model": "nope", "prompt": "hi"})
    assert status == 404 and json.loads(data) == {"error": "model 'nope' not found"}


def test_images_for_a_text_model_are_refused(server):
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}}]}]
    status, _, data = post(server, "/v1/chat/completions", {"model": MODEL, "messages": msgs})
    assert status == 400 and "does not support images" in json.loads(data)["error"]["message"]
    status, _, data = post(server, "/api/generate", {"model": MODEL, "prompt": "hi", "images": [png]})
    assert status == 400 and "does not support images" in json.loads(data)["error"]


# -- pure pieces (no server) ----------------------------------------------------------
def test_keep_alive_parsing():
    import localai
    assert localai.parse_keep_alive(None) is None
    assert localai.parse_keep_alive(0) == 0 and localai.parse_keep_alive("0") == 0
    assert localai.parse_keep_alive("5m") == 300 and localai.parse_keep_alive("1h30m") == 5400
    assert localai.parse_keep_alive("1.5s") == 1.5 and localai.parse_keep_alive(10) == 10
    assert localai.parse_keep_alive("-1") < 0 and localai.parse_keep_alive("-1m") == -60
    for bad in ("soon", "5 m", "m5", "", True, [1]):
        with pytest.raises(localai.HTTPError):
            localai.parse_keep_alive(bad)


def test_stop_hold_back():
    from engines.sampling import find_stop, safe_prefix_len
    stops = ["</end>", "STOP"]
    assert safe_prefix_len("hello", stops) == 5
    assert safe_prefix_len("hello </e", stops) == len("hello ")      # could become </end>
    assert safe_prefix_len("hello ST", stops) == len("hello ")
    assert safe_prefix_len("hello S.", stops) == len("hello S.")     # can no longer match
    assert safe_prefix_len("abc", []) == 3
    assert find_stop("a STOP b </end>", stops) == 2
    assert find_stop("nothing", stops) is None


def test_a_request_still_being_read_joins_the_batch(server_env, models_dir, tmp_path):
    """A generation request is announced to the engine once its route is known,
    before its body is read: a request that reaches an idle engine while another's
    body is still coming waits for it (ADMIT_WINDOW), and both are prefilled in one
    pass (/api/ps: peak_admitted 2). Both get their own right answer."""
    import socket
    import threading
    from conftest import Server
    srv = Server(["--no-mdns"], dict(server_env, LOCALAI_MODELS_DIR=str(models_dir)),
                 str(tmp_path))
    try:
        assert post(srv, "/v1/completions", {"model": MODEL, "prompt": "Hi",
                                             "max_tokens": 2})[0] == 200   # engine running
        slow = json.dumps({"model": MODEL, "prompt": COUNTING, "max_tokens": 6,
                           "temperature": 0}).encode()
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                  b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(slow) + slow[:10])
        time.sleep(0.3)                   # its head is read; its body is not all there
        out = {}
        quick = threading.Thread(target=lambda: out.update(quick=post(srv, "/v1/completions", {
            "model": MODEL, "prompt": "The capital of France is", "max_tokens": 6,
            "temperature": 0})))
        quick.start()
        time.sleep(0.003)                 # the quick one reaches the engine first
        s.sendall(slow[10:])
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        s.close()
        quick.join()
        assert raw.startswith(b"HTTP/1.1 200")
        assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"].strip().startswith("9, 10")
        status, _, data = out["quick"]
        assert status == 200 and "Paris" in json.loads(data)["choices"][0]["text"]
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("GET", "/api/ps")
        engine = json.loads(conn.getresponse().read())["models"][0]["engine"]
        conn.close()
        assert engine["peak_admitted"] == 2, engine
        if engine["device"] == "cpu" and sys.platform == "linux":     # what it chose, shown
            assert engine["graph_thread"] == "SCHED_BATCH while batching"
    finally:
        srv.stop()


def test_without_the_fast_path_the_batch_takes_mlx_lms_own_steps(server, server_env,
                                                                  models_dir, tmp_path):
    """LOCALAI_MLX_DECODE=off: no fused step and no prompt pass of ours, so the
    engine's batch runs mlx-lm's own prefill and steps (a prompt's last token in a
    step of its own) on the float32 weights; requests sent together still get the
    answers the default server gives them, and /api/ps says which way it went."""
    import threading
    from conftest import Server
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]

    def answers(srv):
        out = {}

        def one(p):
            status, _, data = post(srv, "/v1/completions", {"model": MODEL, "prompt": p,
                                                            "max_tokens": 6, "temperature": 0})
            out[p] = (status, json.loads(data)["choices"][0]["text"])
        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("GET", "/api/ps")
        engine = json.loads(conn.getresponse().read())["models"][0]["engine"]
        conn.close()
        return out, engine
    default, engine = answers(server)
    off = Server(["--no-mdns"], dict(server_env, LOCALAI_MODELS_DIR=str(models_dir),
                                     LOCALAI_MLX_DECODE="off"), str(tmp_path))
    try:
        got, engine_off = answers(off)
    finally:
        off.stop()
    assert all(status == 200 and text for status, text in default.values())
    assert got == default
    assert engine_off["engine_failures"] == 0 and engine_off["peak_batch"] >= 2
    if engine["device"] == "cpu":
        assert engine.get("decode") == "fused" and engine_off.get("decode") != "fused"
