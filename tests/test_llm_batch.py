"""The batched decoder gives each request the tokens it would get alone (issue 8:
outputs stay the same while concurrent requests share one batch)."""
import threading
import time

MODEL = "smollm2-135m-instruct"


def test_batch_sampled_in_one_pass_keeps_every_answer(models_dir):
    """Requests decoded together (the engine's one-pass sampling of the batch: the
    argmax for greedy rows, no full log-softmax for top_k rows) give exactly the
    texts each gives alone: greedy ones, and seeded sampled ones with different
    filters (Ollama's top_k/top_p, OpenAI's plain temperature, top_p alone, min_p)."""
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)

    def run(prompt, **kw):
        chunks = list(llm.generate(llm.GenRequest(model=info, prompt=prompt,
                                                  max_tokens=16, **kw)))
        return "".join(c.text for c in chunks)
    prompts = ["Once upon a time", "1, 2, 3,", "The capital of France", "def add(a, b):"]
    sampled = [("Hello", dict(temperature=0.8, top_k=40, top_p=0.9, seed=3)),
               ("A poem:", dict(temperature=1.0, seed=4)),
               ("My dog", dict(temperature=0.7, top_p=0.9, seed=5)),
               ("Hello", dict(temperature=1.2, min_p=0.05, top_k=20, seed=6))]
    alone = [run(p, temperature=0) for p in prompts]
    alone_sampled = [run(p, **kw) for p, kw in sampled]
    assert len(set(alone_sampled[:2])) == 2

    def together(with_sampled):
        out = {}

        def worker(i):
            out[i] = run(prompts[i], temperature=0)

        def sampled_worker(j):
            out["s", j] = run(sampled[j][0], **sampled[j][1])
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        if with_sampled:
            threads += [threading.Thread(target=sampled_worker, args=(j,)) for j in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return ([out[i] for i in range(4)],
                [out["s", j] for j in range(4)] if with_sampled else None)
    m = llm._SCHED.models[info.id]
    step = getattr(m.gen._generation_batch, "_step", None)
    assert getattr(step, "__func__", None) is llm._batch_step
    assert together(False) == (alone, None)
    assert together(True) == (alone, alone_sampled)
    assert llm.stats()["peak_batch"] >= 5


def test_graph_thread_does_not_preempt_the_arithmetic(models_dir):
    """On a Linux CPU the language engine's MLX thread (it builds the graphs and
    wakes ~65 times a token) runs as SCHED_BATCH while it steps a batch, and
    describe() says so; for one stream it is back to the normal policy. The thread
    that started the engine keeps its own."""
    import os
    import sys
    import pytest
    from engines import llm, mlx_setup
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)

    def run(prompt, n=4):
        list(llm.generate(llm.GenRequest(model=info, prompt=prompt, max_tokens=n,
                                         temperature=0)))
    run("Hi")
    if sys.platform != "linux" or mlx_setup.describe()["device"] != "cpu":
        pytest.skip("SCHED_BATCH is for the Linux CPU path")
    tid = llm._SCHED.thread.native_id
    threads = [threading.Thread(target=run, args=("1, 2, 3,", 48)) for _ in range(3)]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        seen.add(os.sched_getscheduler(tid))
        time.sleep(0.001)
    for t in threads:
        t.join()
    assert os.SCHED_BATCH in seen
    assert mlx_setup.describe()["graph_thread"] == "SCHED_BATCH while batching"
    assert any("SCHED_BATCH" in r for r in mlx_setup.describe()["reasons"])
    run("Hello")
    assert os.sched_getscheduler(tid) == os.SCHED_OTHER     # one stream
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_sampler_filters():
    """sample_rows on made-up logits: top_k, top_p and min_p keep exactly the tokens
    they should, whatever else is in the batch; a seed repeats."""
    from tests.test_mlx_setup import run_py
    out = run_py(r"""
import json
from types import SimpleNamespace as R
import mlx.core as mx
from engines.sampling import make_sampler, sample_rows
# probabilities 0.4 0.3 0.2 0.1 (then nothing) at tokens 7 3 5 1
logits = mx.full((1, 16), -mx.inf)
for t, p in ((7, .4), (3, .3), (5, .2), (1, .1)):
    logits[0, t] = mx.log(mx.array(p))
def seen(**kw):
    kw = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 1, **kw}
    s = make_sampler(R(**kw))
    other = make_sampler(R(**{**kw, "top_k": 0, "top_p": 1.0, "seed": 9}))
    got = set()
    for _ in range(300):
        rows = sample_rows([s, other, make_sampler(R(**{**kw, "temperature": 0}))],
                           mx.concatenate([logits] * 3))
        got.add(int(rows[0]))
        assert int(rows[2]) == 7
    return sorted(got)
a = make_sampler(R(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5))
b = make_sampler(R(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5))
print(json.dumps({"all": seen(), "k2": seen(top_k=2), "p05": seen(top_p=0.5),
                  "p065": seen(top_p=0.65), "k3p09": seen(top_k=3, top_p=0.9),
                  "minp": seen(min_p=0.45), "minp2": seen(min_p=0.6), "seed": [int(a(logits)[0]) for _ in range(20)] ==
                  [int(b(logits)[0]) for _ in range(20)]}))
""")
    assert out["all"] == [1, 3, 5, 7]
    assert out["k2"] == [3, 7]
    assert out["p05"] == [3, 7]            # 0.4 < 0.5: the next token is needed
    assert out["p065"] == [3, 7]           # 0.4 + 0.3 reaches 0.65
    assert out["k3p09"] == [3, 5, 7]
    assert out["minp"] == [3, 5, 7]        # p >= 0.45 * 0.4
    assert out["minp2"] == [3, 7]          # p >= 0.6 * 0.4
    assert out["seed"] is True


def test_kept_caches_do_not_hold_on_to_the_batch(models_dir):
    """A finished request's KV cache goes into the prompt cache computed, its own
    tokens only: mlx-lm extracts it lazily, and a lazy entry kept the whole batch's
    key and value buffers alive (and every new batch faulted in fresh memory)."""
    import time
    import mlx.core as mx
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)

    def batch(salt):
        ths = [threading.Thread(target=lambda i=i: list(llm.generate(llm.GenRequest(
            model=info, prompt=f"Count from {salt + 7 * i} to 100:", max_tokens=24,
            temperature=0)))) for i in range(4)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    def settled():                       # the scheduler is done with the batch
        m = llm._SCHED.models[info.id]
        for _ in range(100):
            if not m.jobs and not llm._SCHED.pending:
                break
            time.sleep(0.01)
        time.sleep(0.05)
        mx.synchronize()
        return m, mx.get_active_memory()
    batch(1000)                          # the engine loaded, its step traced for 4
    m, a0 = settled()
    c0 = m.prompt_cache.nbytes
    batch(2000)
    m, a1 = settled()
    grown, kept = a1 - a0, m.prompt_cache.nbytes - c0
    assert kept > 0
    # the batch's buffers: 30 layers x keys and values x 4 rows x 256 positions
    assert grown < kept + (4 << 20), (grown, kept)


def test_delivered_stream_matches_the_iterated_one(models_dir):
    """_Stream.deliver (the server's path): the engine thread hands every chunk to
    the sink, in order, ending with the done chunk: the same text and counts as
    iterating the stream, including chunks made before the sink was attached."""
    import time
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)
    req = lambda: llm.GenRequest(model=info, prompt="The capital of France is",
                                 max_tokens=12, temperature=0)
    iterated = list(llm.generate(req()))
    stream = llm.generate(req())
    time.sleep(0.3)                      # some chunks wait in the queue first
    got, done = [], threading.Event()

    def sink(item):
        got.append(item)
        if getattr(item, "done", True):
            done.set()
    stream.deliver(sink)
    assert done.wait(30)
    time.sleep(0.05)
    assert got[-1].done and all(not c.done for c in got[:-1])
    assert "".join(c.text for c in got) == "".join(c.text for c in iterated)
    assert got[-1].completion_tokens == iterated[-1].completion_tokens == 12
    stream.close()


def forget_prompts(llm, info):
    """Empty the model's prompt cache (if it is loaded): every prompt is computed."""
    m = llm._SCHED and llm._SCHED.models.get(info.id)
    if m:
        m.prompt_cache.trim_to(n_sequences=0)


def spy_prefill_passes(monkeypatch):
    """The lengths of the prompt slices of every prefill pass the batch makes
    (sorted; mlx-lm's, and the engine's that end prompts), appended to the returned
    list; requests admitted together from now on."""
    from mlx_lm.generate import PromptProcessingBatch
    from engines import llm
    passes, real_prompt, real_last = [], PromptProcessingBatch.prompt, llm._prefill_last

    def spy(self, tokens):
        passes.append(sorted(len(t) for t in tokens))
        return real_prompt(self, tokens)

    def spy_last(pb, tokens, *args):
        passes.append(sorted(len(t) for t in tokens))
        return real_last(pb, tokens, *args)
    monkeypatch.setattr(PromptProcessingBatch, "prompt", spy)
    monkeypatch.setattr(llm, "_prefill_last", spy_last)
    monkeypatch.setattr(llm, "ADMIT_WINDOW", 5.0)
    return passes


def test_prompts_of_different_lengths_are_prefilled_shortest_first(models_dir, monkeypatch):
    """A short and a ~1000-token prompt admitted together: the short one is
    prefilled on its own, first, and starts answering while the long one is still
    being computed (mlx-lm pads prompts prefilled together to the longest, so both
    answers would start only after 2 x 1000 rows); they still decode in one batch,
    and each gets the answer it gets alone."""
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)
    filler = "The history of the city is long and full of small events. " * 80
    prompts = {"short": "1, 2, 3, 4,", "long": filler + "1, 2, 3, 4,"}

    def run(prompt, marks=None, arrival=None):
        text = ""
        for c in llm.generate(llm.GenRequest(model=info, prompt=prompt, max_tokens=12,
                                             temperature=0), arrival=arrival):
            if c.text and marks is not None and not marks:
                marks.append(time.perf_counter())
            text += c.text
        assert c.done and c.cached_tokens == 0       # the whole prompt was computed
        return text

    alone = {}
    for k, p in prompts.items():
        forget_prompts(llm, info)
        alone[k] = run(p)
    forget_prompts(llm, info)
    assert llm.count_tokens(info, prompts["long"]) > 900
    passes = spy_prefill_passes(monkeypatch)
    llm._SCHED.counters["peak_batch"] = 0
    llm._SCHED.counters["peak_admitted"] = 0
    arrivals = {k: llm.expect() for k in prompts}
    out, first = {}, {"short": [], "long": []}

    def worker(k):
        out[k] = run(prompts[k], first[k], arrivals[k])
    threads = [threading.Thread(target=worker, args=(k,)) for k in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == alone
    assert llm.stats()["peak_admitted"] == 2
    assert [p for p in passes if len(p) > 1] == []            # never padded together
    assert passes[0] == [llm.count_tokens(info, prompts["short"])]   # its last token too
    assert first["short"][0] < first["long"][0]
    assert llm.stats()["peak_batch"] == 2


def test_a_request_that_waited_long_enough_goes_first(models_dir, monkeypatch):
    """Shortest first has a limit: once a request has waited PREFILL_GROUP_MAX_WAIT
    (0 here), the longest-waiting one is prefilled next, so a long prompt is not
    passed over for ever by short ones. The short one, arriving while the long one
    still has slices to go, joins it (padded to one slice) instead of waiting."""
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)
    prompts = {"long": "The history of the city is long. " * 120 + "1, 2, 3,", "short": "1, 2,"}
    forget_prompts(llm, info)
    passes = spy_prefill_passes(monkeypatch)
    monkeypatch.setattr(llm, "PREFILL_GROUP_MAX_WAIT", 0.0)
    arrivals = {k: llm.expect() for k in prompts}
    out = {}

    def worker(k):
        out[k] = "".join(c.text for c in llm.generate(llm.GenRequest(
            model=info, prompt=prompts[k], max_tokens=4, temperature=0), arrival=arrivals[k]))
    threads = [threading.Thread(target=worker, args=(k,)) for k in prompts]
    llm.count_tokens(info, "")                      # the tokenizer is loaded
    threads[0].start()
    deadline = time.monotonic() + 30                # the long one is queued first

    def queued():
        with llm._SCHED.cv:
            return any(j.req.prompt == prompts["long"] for j in llm._SCHED.pending)
    while not (llm._SCHED and queued()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    threads[1].start()
    for t in threads:
        t.join()
    step = llm._SCHED.models[info.id].gen.prefill_step_size
    assert passes[0] == [step] and passes[1] == [llm.count_tokens(info, prompts["short"]), step]
    assert all(out.values())


def test_first_and_last_tokens_leave_with_the_step_that_computed_them(models_dir,
                                                                     monkeypatch):
    """mlx-lm computes a prompt's last token in a step of its own and hands a token
    out one step after it is computed; the engine computes the last token with the
    rest of the prompt's pass and reads a sequence's first token and its last (by
    max_tokens) as soon as their steps are done: the first piece of text reaches
    the client during the prompt's pass (not two steps after it), an answer of n
    tokens ends during the (n-1)-th step after it (not the n+1-th), and a one-token
    answer ends with the prompt's pass, its prompt kept for the next request. The
    text is the same: the first token of a longer answer, and a stop string that
    the first token completes ends the answer empty."""
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)
    prompt = "Pack my box with five dozen liquor jugs. Pack my box with"
    steps, real_step = [], llm._Scheduler._step

    def counted_step(self, m):
        real_step(self, m)
        steps.append(time.perf_counter())
    monkeypatch.setattr(llm._Scheduler, "_step", counted_step)

    def run(max_tokens, **kw):
        """(text, done chunk, steps done when the first text / the done chunk came)"""
        got, when, done = [], {}, threading.Event()

        def sink(item):
            got.append(item)
            if getattr(item, "text", "") and "text" not in when:
                when["text"] = len(steps)
            if getattr(item, "done", True):
                when["done"] = len(steps)
                done.set()
        steps.clear()
        stream = llm.generate(llm.GenRequest(model=info, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, **kw))
        stream.deliver(sink)
        assert done.wait(60)
        deadline = time.monotonic() + 30         # the step that ended it is over:
        while len(steps) <= when["done"]:        # its prompt is in the cache now
            assert time.monotonic() < deadline
            time.sleep(0.005)
        return "".join(c.text for c in got[:-1]), got[-1], when

    longer, last, when = run(6)
    forget_prompts(llm, info)
    text, last, when = run(6)
    assert text == longer and last.completion_tokens == 6
    assert (when["text"], when["done"]) == (0, 5)       # during the 1st and 6th steps
    forget_prompts(llm, info)
    text, last, when = run(1)
    assert (last.finish_reason, last.completion_tokens, when["done"]) == ("length", 1, 0)
    assert longer.startswith(text) and text
    text, last, when = run(1)
    assert last.cached_tokens == last.prompt_tokens - 1   # the one-token answer kept its prompt
    forget_prompts(llm, info)
    text, last, when = run(6, stop=[longer[:len(text)]])
    assert (text, last.finish_reason, when["done"]) == ("", "stop", 0)
    assert "".join(c.text for c in llm.generate(llm.GenRequest(
        model=info, prompt=prompt, max_tokens=6, temperature=0))) == longer


def test_a_penalised_request_prefilled_with_a_plain_one(models_dir, monkeypatch):
    """The engine computes a prompt's last token in its prompt's pass only when
    nothing processes its logits: a request with penalties (repeat_penalty,
    presence and frequency penalties) prefilled together with one without keeps
    mlx-lm's way (its last token computed in a step of its own, where mlx-lm applies
    the penalties), the other takes the engine's, in the same pass. Each gets the
    answer it gets alone, and the penalties change the answer."""
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)
    prompt = "The cat sat. The cat sat. The cat sat. The cat sat. The cat"
    kinds = {"plain": {}, "penalised": dict(repetition_penalty=1.8, frequency_penalty=1.0)}

    def run(kind, arrival=None):
        return "".join(c.text for c in llm.generate(llm.GenRequest(
            model=info, prompt=prompt, max_tokens=10, temperature=0, **kinds[kind]),
            arrival=arrival))
    alone = {}
    for kind in kinds:
        forget_prompts(llm, info)
        alone[kind] = run(kind)
    assert alone["plain"] != alone["penalised"]
    forget_prompts(llm, info)
    passes = spy_prefill_passes(monkeypatch)
    arrivals = {k: llm.expect() for k in kinds}
    out = {}

    def worker(k):
        out[k] = run(k, arrivals[k])
    threads = [threading.Thread(target=worker, args=(k,)) for k in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == alone
    n = llm.count_tokens(info, prompt)
    assert [p for p in passes if p] == [[n - 1, n]]     # one pass: all but the last, all
