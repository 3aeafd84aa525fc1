"""Vision speed: our engine and server beside mlx-vlm's own stream_generate, in one run.

    python bench/vlm_bench.py                       # tiny random Qwen2-VL, ~30 s
    python bench/vlm_bench.py --model-dir DIR       # any installed mlx-vlm model dir
    python bench/vlm_bench.py --tokens 64 --repeat 5

Same model, same image (a data URL of a random PNG), same prompt, greedy, a fixed
number of new tokens. Each contender runs in its own fresh process:

  mlx-vlm       mlx_vlm.load + apply_chat_template + stream_generate (the reference)
  ours-engine   engines.vlm.generate in-process (worker thread, image validation and
                decode, chat template, exact counts, stops)
  ours-http     python localai.py, POST /v1/chat/completions with the image as a
                data URL (base64 decode, validation, engine, JSON)

Figures per request (median of --repeat after one warm-up): wall milliseconds from
call to last token, and decode tokens/s. With the tiny model the work is almost all
overhead, so the ratio shows what our layers cost; with a real model it shows the
end-to-end difference. The machine is shared: run it twice and trust figures that agree.
"""
import argparse
import base64
import http.client
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
PROMPT = "Describe this picture."


def image_png(size):
    import random
    from PIL import Image
    rnd = random.Random(1)
    im = Image.new("RGB", (size, size))
    im.putdata([(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
                for _ in range(size * size)])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def timed(fn, repeat):
    fn()                                            # warm-up (load, first compile)
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        n, decode_s = fn()
        runs.append((time.perf_counter() - t0, n, decode_s))
    wall = statistics.median(r[0] for r in runs)
    rates = [r[1] / r[2] for r in runs if r[2] > 0]
    tps = statistics.median(rates) if rates else 0
    return {"wall_ms": round(wall * 1000, 2), "decode_tps": round(tps, 1),
            "tokens": runs[-1][1]}


def run_reference(args, png):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from PIL import Image
    from mlx_vlm import apply_chat_template, load, stream_generate
    model, proc = load(args.model_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]

    def once():
        img = Image.open(io.BytesIO(png)).convert("RGB")
        prompt = apply_chat_template(proc, model.config, msgs, num_images=1)
        n, t_first = 0, None
        for r in stream_generate(model, proc, prompt, image=[img], max_tokens=args.tokens,
                                 temperature=0.0):
            if r.finish_reason is None:
                n += 1
                t_first = t_first or time.perf_counter()
        return n, time.perf_counter() - (t_first or time.perf_counter())
    return timed(once, args.repeat)


def run_engine(args, png):
    from engines import catalog, vlm
    from engines.llm import GenRequest
    root = Path(args.model_dir)
    info = catalog.Catalog(root.parent).resolve(root.name)

    def once():
        t_first, last = None, None
        for c in vlm.generate(GenRequest(model=info, messages=[{"role": "user", "content": PROMPT}],
                                         images=[png], image_slots=[0],
                                         max_tokens=args.tokens, temperature=0)):
            t_first = t_first or time.perf_counter()
            last = c
        return last.completion_tokens, last.generate_seconds
    return timed(once, args.repeat)


def run_http(args, png):
    root = Path(args.model_dir)
    with tempfile.TemporaryDirectory() as state:
        env = dict(os.environ, HF_HUB_OFFLINE="1", LOCALAI_STATE_DIR=state)
        proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "localai.py"), "--host",
                                 "127.0.0.1", "--port", "0", "--no-mdns", "--models-dir",
                                 str(root.parent)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        try:
            port = None
            for line in proc.stdout:
                m = re.search(r"listening on \S+:(\d+)", line)
                if m:
                    port = int(m.group(1))
                    break
            body = json.dumps({"model": root.name, "temperature": 0, "max_tokens": args.tokens,
                               "messages": [{"role": "user", "content": [
                                   {"type": "text", "text": PROMPT},
                                   {"type": "image_url", "image_url": {
                                       "url": "data:image/png;base64," + base64.b64encode(png).decode()}}]}]})

            def once():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                obj = json.loads(r.read())
                conn.close()
                if r.status != 200:
                    raise SystemExit("server said %d: %s" % (r.status, obj))
                return obj["usage"]["completion_tokens"], 0.0
            return timed(once, args.repeat)
        finally:
            proc.terminate()
            proc.wait(20)


CONTENDERS = {"mlx-vlm": run_reference, "ours-engine": run_engine, "ours-http": run_http}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="an mlx-vlm model directory (default: build the tiny one)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    args = ap.parse_args()
    png = image_png(args.image_size)
    if args.contender:
        print(json.dumps(CONTENDERS[args.contender](args, png)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.model_dir:
            import tinyvlm
            args.model_dir = str(tinyvlm.build(Path(tmp) / "tiny-qwen2-vl"))
        results = {}
        for name in CONTENDERS:
            out = subprocess.run([sys.executable, __file__, "--contender", name, "--model-dir",
                                  args.model_dir, "--tokens", str(args.tokens), "--repeat",
                                  str(args.repeat), "--image-size", str(args.image_size)],
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode:
                print(name, "failed:", out.stderr[-800:])
                continue
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = results.get("mlx-vlm")
    print("model %s, %dx%d image, %d new tokens, median of %d" % (
        Path(args.model_dir).name, args.image_size, args.image_size, args.tokens, args.repeat))
    print("%-12s %10s %12s %8s %s" % ("contender", "wall ms", "decode tok/s", "tokens", "wall vs mlx-vlm"))
    for name, r in results.items():
        ratio = "%.2fx" % (r["wall_ms"] / ref["wall_ms"]) if ref else "-"
        tps = r["decode_tps"] if r["decode_tps"] else "-"
        print("%-12s %10.2f %12s %8d %s" % (name, r["wall_ms"], tps, r["tokens"], ratio))


if __name__ == "__main__":
    main()
