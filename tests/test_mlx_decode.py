"""engines/mlx_decode.py: the fused decode step gives mlx-lm's logits (float32
rounding), for llama (traditional rope, tied head) and qwen2 (q/k/v biases, untied
head) models, one sequence or a left-padded batch; anything else is left alone.
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
    # One sequence, plain KVCache; then a left-padded batch of three, BatchKVCache.
    for lengths in ([7], [5, 9, 3]):
        n = max(lengths)
        pad = [n - L for L in lengths]
        toks = mx.array([[0] * p + [(3 * i + 5 * j) % 100 + 1 for j in range(L)]
                         for i, (p, L) in enumerate(zip(pad, lengths))])
        if len(lengths) == 1:
            caches = [make_prompt_cache(ref), make_prompt_cache(fast)]
        else:
            caches = [[BatchKVCache(pad) for _ in ref.layers] for _ in range(2)]
        lr = ref(toks, cache=caches[0])
        lf = fast(toks, cache=caches[1])
        worst = max(worst, float(mx.abs(lr - lf).max()))
        y = lr[:, -1:].argmax(-1)
        for step in range(6):
            lr = ref(y, cache=caches[0])
            lf = fast(y, cache=caches[1])
            worst = max(worst, float(mx.abs(lr - lf).max() / (mx.abs(lr).max() + 1e-6)))
            y = lr[:, -1:].argmax(-1)
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
