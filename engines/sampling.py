"""Decoding pieces shared by the text (engines/llm.py) and vision (engines/vlm.py)
engines: the per-request sampler and the stop-sequence filter.

    make_sampler(req) -> sampler(logprobs) -> token ids     (mlx; one per request)
    sample_rows(samplers, logits) -> token ids              (a whole batch at once)
    is_greedy(sampler) -> True for temperature 0 (the argmax; logits suffice)
    StopFilter(stops).feed(text, final=False) -> (text to release, stopped)
    find_stop(text, stops), safe_prefix_len(text, stops)    (the filter's two rules)

Both engines go through these, so ``seed``, ``top_k``/``top_p``/``min_p``,
``temperature`` and ``stop`` mean exactly the same for text and vision models.
mlx is imported inside the functions that need it (on the engines' MLX thread).
"""
import random


# ---------------------------------------------------------------------------
# Stop sequences
# ---------------------------------------------------------------------------
def find_stop(text, stops):
    """Index where the earliest stop sequence starts in text, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def safe_prefix_len(text, stops):
    """How much of text can be released: everything before the longest suffix
    that could still grow into a stop sequence."""
    if not stops:
        return len(text)
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if k > hold and text.endswith(s[:k]):
                hold = k
                break
    return len(text) - hold


class StopFilter:
    """Text-level stop sequences over a stream of decoded text. Text is released
    as soon as it can no longer be the start of a stop sequence; the output ends
    where the first stop sequence begins (the stop itself is never sent)."""

    __slots__ = ("stops", "held")

    def __init__(self, stops):
        self.stops = [s for s in stops if s]     # an empty stop would match at once
        self.held = ""                           # text that may still start a stop

    def feed(self, text, final=False):
        """(text to release now, True if a stop sequence was reached: end there).
        final=True means no more text follows: nothing is held back."""
        held = self.held + text
        cut = find_stop(held, self.stops)
        if cut is not None:
            self.held = ""
            return held[:cut], True
        n = len(held) if final else safe_prefix_len(held, self.stops)
        self.held = held[n:]
        return held[:n], False


# ---------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------
def _greedy(logprobs):
    """One shared object, so a batch of greedy requests samples in one call."""
    import mlx.core as mx
    return mx.argmax(logprobs, axis=-1)


def is_greedy(sampler):
    """True for the sampler make_sampler gives temperature 0: it takes the argmax,
    which unnormalised logits give just as well (the engine then skips the
    full-vocabulary log-softmax)."""
    return sampler is _greedy


class Sampler:
    """One request's sampling parameters and its own PRNG key: the same seed gives
    the same tokens whichever other requests share the batch.

    Filters run in llama.cpp's (and so Ollama's) order on the untempered
    distribution: top_k, then top_p over what is left (renormalised), then min_p;
    the temperature applies to the final draw. It never sorts the vocabulary, which
    costs ~20 ms per token on a CPU with MLX (mlx-lm's apply_top_p): top_k is a
    partition (only its k survivors are sorted), top_p over the whole vocabulary
    a bisection on the probability threshold (the same nucleus as a sort, ties
    aside), and the draw an inverse CDF (a cumsum and one uniform).
    Called with one row of logprobs (the vision engine, mlx-lm's own step), or
    through sample_rows() for a whole batch at once (engines/llm.py)."""

    __slots__ = ("inv_temp", "top_k", "top_p", "min_p", "key")

    def __init__(self, req, seed):
        import mlx.core as mx
        self.inv_temp, self.top_k = 1.0 / req.temperature, req.top_k
        self.top_p, self.min_p = req.top_p, req.min_p
        self.key = mx.random.key(int(seed) & ((1 << 64) - 1))

    def __call__(self, logprobs):
        return sample_rows([self], logprobs)

    def uniform(self):
        """This request's next uniform draw, shape (1, 1); advances its key."""
        import mlx.core as mx
        self.key, sub = mx.random.split(self.key)
        return mx.random.uniform(shape=(1, 1), key=sub)


def make_sampler(req):
    """The request's sampler: _greedy for temperature 0, else its own Sampler."""
    if req.temperature == 0:
        return _greedy
    seed = req.seed if req.seed is not None else random.SystemRandom().getrandbits(63)
    return Sampler(req, seed)


def sample_rows(samplers, logits):
    """One token id per row of logits (B, V; normalised or not) for a batch of
    samplers (make_sampler's), in one pass per kind of request: rows with the
    same top_k go together (a request's numbers then never depend on the others),
    greedy rows take the argmax. What a row gets is what its sampler alone gives."""
    import mlx.core as mx
    groups = {}
    for i, s in enumerate(samplers):
        k = "greedy" if is_greedy(s) else (s.top_k if 0 < s.top_k < logits.shape[-1] else 0)
        groups.setdefault(k, []).append(i)
    order, parts = [], []
    for k, rows in groups.items():
        sub = logits if len(groups) == 1 else logits[mx.array(rows)]
        if k == "greedy":
            parts.append(mx.argmax(sub, axis=-1))
        else:
            parts.append(_sample_group([samplers[i] for i in rows], sub, k))
        order += rows
    if len(parts) == 1:
        return parts[0]
    out = mx.concatenate(parts)
    return out[mx.array(sorted(range(len(order)), key=order.__getitem__))]


def _column(values):
    import mlx.core as mx
    return mx.array(values, dtype=mx.float32)[:, None]


def _sample_group(samplers, logits, top_k):
    import math
    import mlx.core as mx
    u = mx.concatenate([s.uniform() for s in samplers])          # (B, 1)
    inv_temp = _column([s.inv_temp for s in samplers])
    want_p = [s.top_p if 0 < s.top_p < 1.0 else 2.0 for s in samplers]
    log_min_p = [math.log(s.min_p) if s.min_p > 0 else -math.inf for s in samplers]
    idx = None
    if top_k:
        # The k most likely, sorted: the nucleus is then an exact cumulative sum.
        idx = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[:, :top_k]
        lp = mx.take_along_axis(logits, idx, axis=-1)
        rank = mx.argsort(-lp, axis=-1)
        lp, idx = mx.take_along_axis(lp, rank, axis=-1), mx.take_along_axis(idx, rank, axis=-1)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        if min(want_p) < 1.0:
            p = mx.exp(lp)
            lp = mx.where(mx.cumsum(p, axis=-1) - p < _column(want_p), lp, -mx.inf)
    elif min(want_p) < 1.0 or max(log_min_p) > -math.inf:
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if min(want_p) < 1.0:
            lp = mx.where(_nucleus(lp, _column(want_p)), lp, -mx.inf)
    else:
        lp = logits           # no filter: the draw's softmax normalises (one exp pass)
    if max(log_min_p) > -math.inf:
        floor = mx.max(lp, axis=-1, keepdims=True) + _column(log_min_p)
        lp = mx.where(lp >= floor, lp, -mx.inf)
    choice = _draw(lp * inv_temp, u)
    if idx is not None:
        choice = mx.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    return choice


NUCLEUS_STEPS = 24   # bisection steps: threshold resolution of max(p) / 2**24


def _nucleus(logprobs, top_p):
    """Mask of the smallest set of most likely tokens whose mass reaches top_p (a
    column; rows with top_p above 1 keep everything)."""
    import mlx.core as mx
    p = mx.exp(logprobs)
    lo = mx.zeros(p.shape[:-1] + (1,), dtype=p.dtype)       # mass(p >= lo) >= top_p
    hi = mx.max(p, axis=-1, keepdims=True) * 1.0001         # mass(p >= hi) == 0
    for _ in range(NUCLEUS_STEPS):
        mid = (lo + hi) * 0.5
        enough = mx.sum(mx.where(p >= mid, p, 0.0), axis=-1, keepdims=True) >= top_p
        lo = mx.where(enough, mid, lo)
        hi = mx.where(enough, hi, mid)
    return (p >= lo) | (top_p > 1.0)


def _draw(logits, u):
    """One token per row from softmax(logits) by inverse CDF, with a uniform per row."""
    import mlx.core as mx
    c = mx.cumsum(mx.softmax(logits, axis=-1), axis=-1)
    u = u * c[:, -1:] * (1.0 - 1e-6)
    return mx.minimum(mx.sum(c <= u, axis=-1), logits.shape[-1] - 1)
