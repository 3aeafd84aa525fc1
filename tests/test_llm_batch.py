"""The batched decoder gives each request the tokens it would get alone (issue 8:
outputs stay the same while concurrent requests share one batch)."""
import threading

MODEL = "smollm2-135m-instruct"


def test_greedy_batch_skips_log_softmax_and_keeps_every_answer(models_dir):
    """Four greedy requests decoded together (the engine's argmax-of-logits step,
    no log-softmax) give exactly the texts each gives alone; so do they beside a
    sampled request, whose batch takes mlx-lm's own step (log-softmax, then the
    samplers)."""
    from engines import llm
    from engines.catalog import Catalog
    info = Catalog(models_dir).resolve(MODEL)

    def run(prompt, **kw):
        chunks = list(llm.generate(llm.GenRequest(model=info, prompt=prompt,
                                                  max_tokens=16, **kw)))
        return "".join(c.text for c in chunks)
    prompts = ["Once upon a time", "1, 2, 3,", "The capital of France", "def add(a, b):"]
    alone = [run(p, temperature=0) for p in prompts]

    def together(extra_sampled):
        out = {}

        def worker(i):
            out[i] = run(prompts[i], temperature=0)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        if extra_sampled:
            threads.append(threading.Thread(
                target=lambda: out.__setitem__("s", run("Hello", temperature=1.0, seed=3))))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [out[i] for i in range(4)]
    m = llm._SCHED.models[info.id]
    step = getattr(m.gen._generation_batch, "_step", None)
    assert getattr(step, "__func__", None) is llm._greedy_step
    assert together(False) == alone
    assert together(True) == alone
    assert llm.stats()["peak_batch"] >= 4
