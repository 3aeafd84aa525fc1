"""engines/mlx_decode.py: the fused decode step and prompt pass give mlx-lm's logits
(float32 rounding), for llama (traditional rope, tied head) and qwen2 (q/k/v biases,
untied head) models, one sequence or a left-padded batch, a prompt in one piece or
two; anything else is left alone.
Each check runs in a fresh interpreter, like tests/test_mlx_setup.py."""
import json

from tests.test_mlx_setup import run_py

DECODE_CHECK = r"""
import json
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama, qwen2
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from engines import mlx_decode

ARGS = {
    "llama": llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
                             intermediate_size=96, num_attention_heads=4,
                             num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=101,
                             rope_traditional=True, rope_theta=100000.0,
                             tie_word_embeddings=True),
    "qwen2": qwen2.ModelArgs(model_type="qwen2", hidden_size=64, num_hidden_layers=2,
                             intermediate_size=96, num_attention_heads=4,
                             num_key_value_heads=1, rms_norm_eps=1e-6, vocab_size=101,
                             rope_theta=1000000.0, tie_word_embeddings=False),
}
MODULES = {"llama": llama, "qwen2": qwen2}

def pair(arch):
    mx.random.seed(7)
    ref = MODULES[arch].Model(ARGS[arch])
    params = [(k, mx.random.normal(v.shape) * 0.3) for k, v in tree_flatten(ref.parameters())]
    ref.update(tree_unflatten(params))
    fast = MODULES[arch].Model(ARGS[arch])
    fast.update(tree_unflatten(params))
    mx.eval(ref.parameters(), fast.parameters())
    return ref, fast

out = {}
for arch in ARGS:
    ref, fast = pair(arch)
    why = mlx_decode.install(fast)
    worst = 0.0
    # One sequence, plain KVCache; then a left-padded batch of three, BatchKVCache;
    # then both with decode steps that cross the caches' 256-position buffers (the
    # step writes into them itself, update_and_fetch grows them).
    for lengths in ([7], [5, 9, 3], [252], [250, 253]):
        n = max(lengths)
        pad = [n - L for L in lengths]
        toks = mx.array([[0] * p + [(3 * i + 5 * j) % 100 + 1 for j in range(L)]
                         for i, (p, L) in enumerate(zip(pad, lengths))])
        if len(lengths) == 1:
            caches = [make_prompt_cache(ref), make_prompt_cache(fast)]
        else:
            caches = [[BatchKVCache(pad) for _ in ref.layers] for _ in range(2)]
        # the prompt in two pieces: the second one's keys start before its queries
        # (a cached prefix, a long prompt's next slice)
        for part in (toks[:, :-3], toks[:, -3:]):
            lr = ref(part, cache=caches[0])
            lf = fast(part, cache=caches[1])
            worst = max(worst, float(mx.abs(lr - lf).max()))
        y = lr[:, -1:].argmax(-1)
        for step in range(6):
            lr = ref(y, cache=caches[0])
            lf = fast(y, cache=caches[1])
            worst = max(worst, float(mx.abs(lr - lf).max() / (mx.abs(lr).max() + 1e-6)))
            y = lr[:, -1:].argmax(-1)
        # the caches are left as mlx-lm's own steps leave them
        for cr, cf in zip(*caches):
            assert mx.array_equal(mx.array(cr.offset), mx.array(cf.offset)), (cr.offset, cf.offset)
            assert getattr(cr, "_idx", None) == getattr(cf, "_idx", None)
            assert cr.keys.shape == cf.keys.shape, (cr.keys.shape, cf.keys.shape)
            kr, vr = cr.state[:2]
            kf, vf = cf.state[:2]
            worst = max(worst, float(mx.abs(vr - vf).max()))
            if not ref.layers[0].self_attn.rope.traditional:   # else keys' dims permuted
                worst = max(worst, float(mx.abs(kr - kf).max()))
    out[arch] = {"why": why, "worst": worst, "class": type(fast).__name__,
                 "matrices": len(mlx_decode.weights(fast))}

# Not of the plain shape: left alone.
m = MODULES["llama"].Model(ARGS["llama"])
m.model.layers[0].mlp.gate_proj = nn.QuantizedLinear(64, 96, group_size=32, bits=4)
out["quantized"] = {"why": mlx_decode.install(m), "class": type(m).__name__}
print(json.dumps(out))
"""


def test_fused_decode_step_gives_mlx_lm_logits():
    out = run_py(DECODE_CHECK)
    for arch in ("llama", "qwen2"):
        r = out[arch]
        assert r["why"] and "fused" in r["why"], r
        assert r["class"].startswith("Fast"), r
        assert r["matrices"] == 2 * 4 + 1, r
        assert r["worst"] < 1e-5, r
    assert out["quantized"] == {"why": None, "class": "Model"}


SMOLLM_CHECK = r"""
import json, os, sys
from pathlib import Path
from engines import mlx_setup as ms
ms.configure()
import mlx.core as mx
from mlx_lm.utils import load_model
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.models.cache import make_prompt_cache

path = Path(sys.argv[1])
tok = load_tokenizer(path)
ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                              add_generation_prompt=True, tokenize=True)

def greedy(model, n=20):
    cache = make_prompt_cache(model)
    y = model(mx.array([ids]), cache=cache)[0, -1].argmax()
    out, logits = [], []
    for _ in range(n):
        out.append(y.item())
        step = model(mx.array([[out[-1]]]), cache=cache)[0, -1]
        logits.append(step)
        y = step.argmax()
    logits = mx.stack(logits)
    mx.eval(logits)
    return out, logits

res = {}
for mode in ("off", "auto"):
    os.environ["LOCALAI_MLX_DECODE"] = mode
    model, _ = load_model(path)
    model = ms.prepare(model)
    before = (ms.quantized_calls() or {}).get("calls", 0)
    ids_out, logits = greedy(model)
    d = ms.describe(model)
    res[mode] = {"ids": ids_out, "logits": logits, "decode": d.get("decode"),
                 "twins": d.get("quantized_products"), "class": type(model).__name__,
                 "twin_calls": (ms.quantized_calls() or {}).get("calls", 0) - before}
    if mode == "auto":
        registered = (ms.quantized_calls() or {}).get("matrices")
        ms.release(model)
        res["released"] = [registered, (ms.quantized_calls() or {}).get("matrices")]
diff = float(mx.abs(res["off"]["logits"] - res["auto"]["logits"]).max())
scale = float(mx.abs(res["off"]["logits"]).max())
for m in ("off", "auto"):
    del res[m]["logits"]
print(json.dumps({**res, "diff": diff, "scale": scale, "text": tok.decode(res["auto"]["ids"])}))
"""


def test_smollm_decodes_the_same_with_and_without_the_fast_path(models_dir, tmp_path):
    """The embedded model: LOCALAI_MLX_DECODE=off leaves mlx-lm's forward pass and the
    float32 products; the default installs the fused step, reads every decode product
    from the quantized twins, and gives the same greedy tokens with logits within
    float32 rounding; release() forgets the twins."""
    from pathlib import Path
    path = next(p for p in Path(models_dir).iterdir() if (p / "config.json").is_file())
    out = run_py(SMOLLM_CHECK.replace("sys.argv[1]", repr(str(path))),
                 env={"LOCALAI_CACHE_DIR": str(tmp_path)})
    off, auto = out["off"], out["auto"]
    assert off["decode"] is None and off["twins"] is None and off["class"] == "Model", off
    assert off["twin_calls"] == 0
    assert auto["decode"] == "fused" and auto["twins"] == 30 * 4 + 1, auto
    assert auto["class"] == "FastModel"
    assert auto["twin_calls"] >= 20 * (30 * 4 + 1), auto      # every decode product
    assert auto["ids"] == off["ids"], out["text"]
    assert out["diff"] <= 1e-4 * out["scale"], out
    assert out["released"] == [30 * 4 + 1, 0], out
