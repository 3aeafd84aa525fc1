"""A decode step with few MLX graph nodes, for llama-family models on a CPU.

(issue 8) Called by engines/mlx_setup.prepare() once a model's weights are float32
on a CPU:

    install(model, rows=None) -> str | None
        the reason it was installed, or None (model left exactly as it was).
        rows: {module name: tuple of arrays row-aligned with its weight} (e.g. the
        quantized form it was dequantized from): permuted and fused like the weights
    weights(model) -> [(w, rows or None)]
        the float32 matrices the step multiplies by, with their fused rows
    last_logits(model, cache) -> f(inputs, rows, positions) | None
        a prompt pass that computes the logits of the given tokens only

Why: MLX's CPU backend runs the "fast" ops (rms_norm, rope, scaled-dot-product
attention) as their composed fallbacks, so one decoded token of SmolLM2-135M was a
graph of ~4,300 nodes (874 of them Broadcast) at ~3 us of scheduling each: ~13 ms
of a ~25 ms step, beside ~12.7 ms of matrix products. The step below is ~1,100
nodes: per layer one q|k|v product and one gate|up product (the weights are
concatenated once; the modules' own weights become views of them, so the memory
is the same), rope's cos/sin computed once per token for all layers, attention
grouped by kv head without repeats, the mask made additive once per step, softmax
normalised after the product with v (on hd values, not S), the new keys and values
written into the caches' buffers by the step itself, and the elementwise work fused
by `mx.compile` (which needs g++ on Linux; without it MLX runs the same graph
unfused, slower but the same numbers), a layer's end and the next one's start in
one compiled call. Building it takes Python ~1.3 ms a step (was ~2.7 ms).

The decode step (one new token per sequence, a KVCache or BatchKVCache) takes this
path. Prompts (several tokens a sequence, same caches) take the same compiled pieces
with every token a row, and attention per sequence with a compiled exp: MLX's
Softmax on x86 runs a scalar exp, half of a 1000-token prompt's time (3.0 -> 2.3 s
for SmolLM2 on 2 cores). Anything else (no cache, input embeddings) goes through
mlx-lm's own forward pass.
Models whose rope is "traditional" (GGUF imports: pairs of adjacent dims) get the
rows of their q and k weights permuted so that rope rotates dims (i, i+half)
instead: attention scores are sums over dims, so permuting q and k alike changes
nothing, and both paths use the permuted weights. Logits agree with mlx-lm's
forward pass within float32 rounding (tests/test_mlx_decode.py), prompts and steps.

Only llama and qwen2 models of the plain shape (nn.Linear, nn.RMSNorm, nn.RoPE
over the whole head, full attention, no sliding window) are touched; anything else
keeps mlx-lm's forward pass.
"""
import numpy as np

SUPPORTED = ("llama", "qwen2")
# Hand the step to MLX's stream thread every this many layers while the rest is
# still being built. MLX lets the building thread run at most ~100 ops ahead of
# the stream, so one evaluation of the whole step would return only near its end,
# and the stream would sit idle while Python builds the next token's step and the
# engine hands out this one (~1-2 ms a token). Built and handed over in pieces, the
# building overlaps the computing.
ENCODE_LAYERS = 2
_classes = {}          # mlx-lm model class -> its fast subclass


def install(model, rows=None):
    import mlx.core as mx
    import mlx.nn as nn

    why_not = _unsupported(model, nn)
    if why_not:
        return None
    inner = model.model
    layers = inner.layers
    a0 = layers[0].self_attn
    nh, nkv = a0.n_heads, a0.n_kv_heads
    hd = a0.q_proj.weight.shape[0] // nh
    rope = a0.rope
    rows = dict(rows or {})
    name = {id(mod): n for n, mod in model.named_modules()}
    if rope.traditional:
        perm = mx.array(np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)]))

        def permute(x, n):
            return x.reshape(n, hd, *x.shape[1:])[:, perm].reshape(x.shape)
        for layer in layers:
            a = layer.self_attn
            for proj, n in ((a.q_proj, nh), (a.k_proj, nkv)):
                proj.weight = permute(proj.weight, n)
                if "bias" in proj:
                    proj.bias = permute(proj.bias, n)
                if name[id(proj)] in rows:
                    rows[name[id(proj)]] = tuple(permute(x, n) if isinstance(x, mx.array) else x
                                                  for x in rows[name[id(proj)]])
            a.rope.traditional = False
    fused, matrices = [], []
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        qkv = _fuse([a.q_proj, a.k_proj, a.v_proj], "weight")
        gu = _fuse([m.gate_proj, m.up_proj], "weight")
        bias = _fuse([a.q_proj, a.k_proj, a.v_proj], "bias") if "bias" in a.q_proj else None
        for mat, mods in ((qkv, (a.q_proj, a.k_proj, a.v_proj)), (gu, (m.gate_proj, m.up_proj)),
                          (a.o_proj.weight, (a.o_proj,)), (m.down_proj.weight, (m.down_proj,))):
            matrices.append((mat, _fused_rows([rows.get(name[id(x)]) for x in mods])))
        w = {"n1": layer.input_layernorm.weight, "qkv": qkv, "o": a.o_proj.weight,
             "n2": layer.post_attention_layernorm.weight, "gu": gu,
             "down": m.down_proj.weight}
        # Transposed views, made once: the step's graph then has no Transpose nodes.
        w.update({k + "_t": w[k].T for k in ("qkv", "o", "gu", "down")})
        w["extra"] = () if bias is None else (bias,)
        mx.eval(list(w.values()))
        fused.append(w)
    head_mod = model.lm_head if hasattr(model, "lm_head") else inner.embed_tokens
    head = head_mod.weight
    matrices.append((head, rows.get(name[id(head_mod)])))
    state = _Step(fused, inner, head, rope, nh=nh, nkv=nkv, hd=hd, scale=a0.scale,
                  eps=layers[0].input_layernorm.eps,
                  ffn=layers[0].mlp.gate_proj.weight.shape[0])
    state.matrices = matrices
    object.__setattr__(model, "_localai_step", state)
    cls = type(model)
    if cls not in _classes:
        _classes[cls] = type("Fast" + cls.__name__, (cls,), {"__call__": _fast_call})
    model.__class__ = _classes[cls]
    return (f"decode step: q|k|v and gate|up products fused, rope once per token, "
            f"elementwise work compiled ({len(layers)} layers)")


def weights(model):
    """[(float32 matrix the step multiplies by, its rows' arrays or None)]."""
    st = getattr(model, "_localai_step", None)
    return [] if st is None else list(st.matrices)


def last_logits(model, cache):
    """The prompt pass that returns only some tokens' logits, when model and cache
    take this module's prompt pass, else None: f(inputs (B, L), rows, positions)
    -> (len(rows), vocabulary), the logits of token positions[i] of row rows[i]."""
    from mlx_lm.models.cache import BatchKVCache, KVCache
    st = getattr(model, "_localai_step", None)
    if st is None or not all(type(c) in (KVCache, BatchKVCache) for c in cache):
        return None

    def f(inputs, rows, positions):
        import mlx.core as mx
        return st.prompt(inputs, cache, last=(mx.array(rows), mx.array(positions)))
    return f


def _fused_rows(parts):
    """The row-aligned arrays of several modules, concatenated like their weights
    (None unless every module has them, with the same shapes past the rows)."""
    import mlx.core as mx
    if any(p is None for p in parts) or len({len(p) for p in parts}) != 1:
        return None
    if len(parts) == 1:
        return parts[0]
    out = []
    for arrays in zip(*parts):
        if any(not isinstance(x, mx.array) for x in arrays):
            if len(set(arrays)) != 1:        # e.g. bits, group size: must agree
                return None
            out.append(arrays[0])
        elif len({x.shape[1:] for x in arrays}) != 1 or len({x.dtype for x in arrays}) != 1:
            return None
        else:
            out.append(mx.concatenate(arrays, axis=0))
    mx.eval([x for x in out if isinstance(x, mx.array)])
    return tuple(out)


def _unsupported(model, nn):
    import mlx.core as mx
    inner = getattr(model, "model", None)
    if getattr(model, "model_type", None) not in SUPPORTED or inner is None:
        return "architecture"
    if getattr(inner, "swa_idx", None) is not None or getattr(inner, "sliding_window", None):
        return "sliding window"
    if not hasattr(inner, "embed_tokens") or not isinstance(inner.embed_tokens, nn.Embedding):
        return "embedding"
    for layer in inner.layers:
        a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if a is None or m is None:
            return "layer shape"
        lin = [getattr(a, k, None) for k in ("q_proj", "k_proj", "v_proj", "o_proj")]
        lin += [getattr(m, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
        if any(type(x) is not nn.Linear for x in lin):
            return "not plain Linear layers"
        if any("bias" in x for x in lin[3:]):
            return "bias outside q/k/v"
        if len({"bias" in x for x in lin[:3]}) != 1:
            return "mixed q/k/v biases"
        if any(type(n) is not nn.RMSNorm for n in (layer.input_layernorm,
                                                  layer.post_attention_layernorm)):
            return "norm"
        hd = a.q_proj.weight.shape[0] // a.n_heads
        if type(a.rope) is not nn.RoPE or a.rope.dims != hd or a.n_heads % a.n_kv_heads:
            return "rope"
        if any(x.weight.dtype != mx.float32 for x in lin):
            return "dtype"
    if type(inner.norm) is not nn.RMSNorm:
        return "norm"
    if hasattr(model, "lm_head") and type(model.lm_head) is not nn.Linear:
        return "head"
    return None


def _fuse(modules, name):
    """One matrix (or bias) of the modules' rows; each module's own becomes a view."""
    import mlx.core as mx
    parts = [getattr(x, name) for x in modules]
    whole = mx.concatenate(parts, axis=0)
    mx.eval(whole)
    start = 0
    for x, p in zip(modules, parts):
        setattr(x, name, whole[start:start + p.shape[0]])
        start += p.shape[0]
    return whole


class _Step:
    """The compiled pieces of one model's decode step and the weights they use."""

    def __init__(self, fused, inner, head, rope, *, nh, nkv, hd, scale, eps, ffn):
        import mlx.core as mx
        import mlx.nn as nn
        self.fused, self.inner, self.rope = fused, inner, rope
        self.head_t = head.T
        mx.eval(self.head_t)
        self.nh, self.hd = nh, hd
        rep = nh // nkv
        half = hd // 2
        # rope of [1..1, 0..0] at a position is [cos | sin] of its angles: the
        # model's own rope op gives them, so any base/scale/frequency rule agrees.
        self.unit = mx.concatenate([mx.ones((1, 1, 1, half)), mx.zeros((1, 1, 1, half))], -1)

        heads = nh + 2 * nkv

        def pre(x, n1, qkv_t, c, s, *bias):          # bias: () or (q|k|v bias,)
            # Rope as r * c + (r with its halves swapped) * s over every head at
            # once: c, s (made per step in __call__) hold [cos, cos] and [-sin, sin]
            # per head, times the attention scale for q heads, and 1, 0 for v heads
            # (which pass through unchanged): one compiled kernel, no concatenation.
            B = x.shape[0]
            qkv = mx.fast.rms_norm(x, n1, eps) @ qkv_t
            if bias:
                qkv = qkv + bias[0]
            r = qkv.reshape(B, heads, 2, half)
            r = (r * c + r[:, :, ::-1] * s).reshape(B, heads, 1, hd)
            q = r[:, :nh].reshape(B, nkv, rep, hd)
            return q, r[:, nh:nh + nkv], r[:, nh + nkv:]          # q, k, v

        def post(x, o, l, o_t, n2, gu_t, down_t):
            # o: attention's unnormalised output (exp(scores) @ v), l: its row sums
            h = mx.addmm(x, (o / l).reshape(x.shape[0], -1), o_t)   # x + o @ o_t
            gu = mx.fast.rms_norm(h, n2, eps) @ gu_t
            return mx.addmm(h, nn.silu(gu[:, :ffn]) * gu[:, ffn:], down_t)

        def final(x, n, w_t):
            return mx.fast.rms_norm(x, n, eps) @ w_t

        # A layer's post and the next layer's pre are one compiled call (the last
        # post and final one too): each call of a compiled function costs ~10 us of
        # Python and argument handling, 61 of them a step before.
        def mid(x, o, l, c, s, o_t, n2, gu_t, down_t, n1, qkv_t, *bias):
            h = post(x, o, l, o_t, n2, gu_t, down_t)
            return (h,) + pre(h, n1, qkv_t, c, s, *bias)

        def last(x, o, l, o_t, n2, gu_t, down_t, n, w_t):
            return final(post(x, o, l, o_t, n2, gu_t, down_t), n, w_t)

        # Per head (q, k, v) along axis 1: the scale of rope's cos/sin, and what a
        # head keeps of itself (v heads: all of it, no rotation).
        self.head_scale = mx.array([scale] * nh + [1.0] * nkv + [0.0] * nkv).reshape(1, heads, 1, 1)
        self.head_keep = mx.array([0.0] * (nh + nkv) + [1.0] * nkv).reshape(1, heads, 1, 1)
        self.pre, self.mid, self.last = mx.compile(pre), mx.compile(mid), mx.compile(last)
        self.post, self.final = mx.compile(post), mx.compile(final)      # prompts' ends
        # Each layer's weights in the order mid/last take them.
        self.mid_args = [(w["o_t"], w["n2"], w["gu_t"], w["down_t"], nx["n1"], nx["qkv_t"])
                         + nx["extra"] for w, nx in zip(fused, fused[1:])]
        self.last_args = (fused[-1]["o_t"], fused[-1]["n2"], fused[-1]["gu_t"],
                          fused[-1]["down_t"], inner.norm.weight, self.head_t)
        # Attention's softmax with its exp compiled (native FMA, ~3x cheaper than
        # MLX's Softmax on x86). Only the elementwise part: a shapeless compiled
        # softmax with its reductions crashed MLX 0.32 once batches changed size.
        self.exp_minus = mx.compile(lambda x, m: mx.exp(x - m), shapeless=True)
        self.nkv, self.rep = nkv, rep

    def rope_rows(self, pos):
        """pre()'s c and s for rows at these positions (n,): rope's [cos, cos] and
        [-sin, sin] of each row's angles, per head (see pre)."""
        import mlx.core as mx
        n = pos.size
        cs = self.rope(mx.broadcast_to(self.unit, (n, 1, 1, self.hd)), offset=pos)
        cs = cs.reshape(n, 1, 2, self.hd // 2)                  # [cos | sin]
        c, s = cs[:, :, :1], cs[:, :, 1:]
        c = mx.concatenate([c, c], axis=2) * self.head_scale + self.head_keep
        s = mx.concatenate([-s, s], axis=2) * self.head_scale
        return c, s

    def prompt(self, inputs, caches, last=None):
        """The forward pass for several tokens a sequence (B, L): the decode step's
        compiled pieces on all B * L tokens as rows (norms, rope, the fused q|k|v
        and gate|up products, a layer's end and the next one's start in one call),
        attention per sequence over its cache with a causal (and padding) mask and
        exp compiled. mlx-lm's layers ran the norms and rope as MLX's composed CPU
        fallbacks, ~6 ms more a pass whatever its length (3 tokens 19.7 -> 13.7 ms,
        128 tokens 217 -> 210 ms for SmolLM2 on 2 cores); MLX's own attention runs
        Softmax's exp as a scalar loop on x86, half of a 1000-token prompt's time.
        last: (rows, positions), two int arrays: the logits of only those tokens,
        (len(rows), vocabulary), instead of every token's (B, L, vocabulary); the
        final norm and the head then run on those rows alone."""
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask
        B, L = inputs.shape
        nh, nkv, rep, hd = self.nh, self.nkv, self.rep, self.hd
        n = B * L
        h = self.inner.embed_tokens(inputs)
        mask = create_attention_mask(h, caches[0], return_array=True)   # causal, padding
        if mask.ndim > 3:                            # B, 1, L, S -> B, 1, 1, L, S
            mask = mx.expand_dims(mask, -3)
        mask = _additive(mask)
        h = h.reshape(n, -1)
        off = caches[0].offset                       # an int, or one per sequence
        off = off.reshape(-1, 1) if isinstance(off, mx.array) else mx.array([[off]])
        c, s = self.rope_rows(mx.broadcast_to(off + mx.arange(L), (B, L)).reshape(-1))
        w = self.fused[0]
        q, k, v = self.pre(h, w["n1"], w["qkv_t"], c, s, *w["extra"])
        for i, cache in enumerate(caches):
            k = k.reshape(B, L, nkv, hd).transpose(0, 2, 1, 3)
            v = v.reshape(B, L, nkv, hd).transpose(0, 2, 1, 3)
            k, v = cache.update_and_fetch(k, v)
            q = q.reshape(B, L, nkv, rep, hd).transpose(0, 2, 3, 1, 4).reshape(B, nkv, rep * L, hd)
            scores = (q @ k.swapaxes(-1, -2)).reshape(B, nkv, rep, L, -1) + mask
            e = self.exp_minus(scores, mx.max(scores, axis=-1, keepdims=True))
            o = (e.reshape(B, nkv, rep * L, -1) @ v).reshape(B, nkv, rep, L, hd)
            l = mx.sum(e, axis=-1, keepdims=True)
            o = o.transpose(0, 3, 1, 2, 4).reshape(n, nkv, rep, hd)
            l = l.transpose(0, 3, 1, 2, 4).reshape(n, nkv, rep, 1)
            if i == len(self.mid_args):
                f = self.fused[-1]
                h = self.post(h, o, l, f["o_t"], f["n2"], f["gu_t"], f["down_t"])
            else:
                h, q, k, v = self.mid(h, o, l, c, s, *self.mid_args[i])
                if i % ENCODE_LAYERS == ENCODE_LAYERS - 1:
                    mx.async_eval(h)
        h = h.reshape(B, L, -1)
        if last is not None:
            h = h[last[0], last[1]]
        return self.final(h, self.inner.norm.weight, self.head_t)

    def __call__(self, inputs, caches):
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask
        B = inputs.shape[0]
        h = self.inner.embed_tokens(inputs[:, 0])
        mask = create_attention_mask(h[:, None], caches[0])
        if isinstance(mask, str):
            mask = None
        off = caches[0].offset
        c, s = self.rope_rows(off if isinstance(off, mx.array) else mx.array([off]))
        if mask is not None:                 # broadcast once for every layer
            mask = mx.broadcast_to(_additive(mask), (B, self.nkv, self.rep, mask.shape[-1]))
        pos = _write_position(caches)
        at = None if pos is None else mx.array([pos])
        w = self.fused[0]
        q, k, v = self.pre(h, w["n1"], w["qkv_t"], c, s, *w["extra"])
        for i, cache in enumerate(caches):
            if at is None:
                k, v = cache.update_and_fetch(k, v)
            else:                            # what update_and_fetch does, in 4 nodes
                cache.keys = mx.slice_update(cache.keys, k, at, (2,))
                cache.values = mx.slice_update(cache.values, v, at, (2,))
                k, v = cache.keys[:, :, :pos + 1], cache.values[:, :, :pos + 1]
            scores = q @ k.swapaxes(-1, -2)                  # B, nkv, rep, S
            if mask is not None:
                scores = scores + mask
            e = self.exp_minus(scores, mx.max(scores, axis=-1, keepdims=True))
            o, l = e @ v, mx.sum(e, axis=-1, keepdims=True)
            if i == len(self.mid_args):
                logits = self.last(h, o, l, *self.last_args)
            else:
                h, q, k, v = self.mid(h, o, l, c, s, *self.mid_args[i])
                if i % ENCODE_LAYERS == ENCODE_LAYERS - 1:
                    mx.async_eval(h)
        if pos is not None:
            _advance(caches, pos)
        return logits[:, None, :]


def _additive(mask):
    """An attention mask to add to the scores: a boolean one becomes 0 where it keeps
    and float32's lowest where it masks (what a where() per layer gave), once per
    pass; an additive one (float) stays."""
    import mlx.core as mx
    return mx.where(mask, 0.0, mx.finfo(mx.float32).min) if mask.dtype == mx.bool_ else mask


def _write_position(caches):
    """Where this step's token goes in every layer's KV buffer, when each buffer has
    room for it (else None: mlx-lm's update_and_fetch grows them). The step then
    writes it with one dynamic slice update per buffer and advances every cache's
    offset once (_advance): update_and_fetch, ~30 us of Python a layer (its slice
    assignments parse their indices, each layer adds 1 to its own offset array),
    was a third of the step's graph building."""
    c0 = caches[0]
    batch = hasattr(c0, "_idx")              # BatchKVCache; KVCache keeps an int offset
    pos = c0._idx if batch else c0.offset
    for c in caches:
        if c.keys is None or pos >= c.keys.shape[2] or (c._idx if batch else c.offset) != pos:
            return None
    return pos


def _advance(caches, pos):
    """Every cache one position on, as update_and_fetch would have left it. The
    batch's offsets (an array per sequence, the same in every layer) are computed
    once and shared: mlx-lm only ever replaces a cache's offset, never updates it in
    place."""
    c0 = caches[0]
    if hasattr(c0, "_idx"):
        off = c0.offset + 1
        for c in caches:
            c.offset, c._idx = off, pos + 1
    else:
        for c in caches:
            c.offset = pos + 1


def _fast_call(self, inputs, cache=None, input_embeddings=None, **kw):
    """The model's __call__: the fused step for one new token per sequence with plain
    KV caches, the prompt pass (the same compiled pieces, every token a row) for several,
    mlx-lm's forward pass for anything else."""
    from mlx_lm.models.cache import BatchKVCache, KVCache
    if (cache is None or input_embeddings is not None or kw or inputs.ndim != 2
            or not all(type(c) in (KVCache, BatchKVCache) for c in cache)):
        return type(self).__mro__[1].__call__(self, inputs, cache, input_embeddings, **kw)
    if inputs.shape[1] != 1:
        return self._localai_step.prompt(inputs, cache)
    return self._localai_step(inputs, cache)
