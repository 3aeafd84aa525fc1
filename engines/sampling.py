"""Decoding pieces shared by the text (engines/llm.py) and vision (engines/vlm.py)
engines: the per-request sampler and the stop-sequence filter.

    make_sampler(req) -> sampler(logprobs) -> token ids     (mlx; one per request)
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


def make_sampler(req):
    """A per-request sampler with its own PRNG key: the same seed gives the same
    tokens whichever other requests share the batch.

    Filters run in llama.cpp's (and so Ollama's) order on the untempered
    distribution: top_k, then top_p over what is left (renormalised), then min_p;
    the temperature applies to the final draw. It avoids sorting the vocabulary,
    which costs ~20 ms per token on a CPU with MLX (mlx-lm's apply_top_p): top_k is
    a partition, top_p a bisection on the probability threshold (the same nucleus
    as a sort, ties aside), and the draw an inverse CDF (a cumsum and one uniform)."""
    import math
    import mlx.core as mx
    if req.temperature == 0:
        return _greedy
    seed = req.seed if req.seed is not None else random.SystemRandom().getrandbits(63)
    state = {"key": mx.random.key(int(seed) & ((1 << 64) - 1))}
    inv_temp, top_p, top_k, min_p = 1.0 / req.temperature, req.top_p, req.top_k, req.min_p
    log_min_p = math.log(min_p) if min_p > 0 else None

    def sampler(logprobs):
        key, sub = mx.random.split(state["key"])
        state["key"] = key
        lp, idx = logprobs, None
        if 0 < top_k < lp.shape[-1]:
            idx = mx.argpartition(-lp, kth=top_k - 1, axis=-1)[:, :top_k]
            lp = mx.take_along_axis(lp, idx, axis=-1)
            lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        if 0 < top_p < 1.0:
            lp = mx.where(_nucleus(lp, top_p), lp, -mx.inf)
        if log_min_p is not None:
            lp = mx.where(lp >= mx.max(lp, axis=-1, keepdims=True) + log_min_p, lp, -mx.inf)
        choice = _draw(lp * inv_temp, sub)
        if idx is not None:
            choice = mx.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
        return choice
    return sampler


NUCLEUS_STEPS = 24   # bisection steps: threshold resolution of max(p) / 2**24


def _nucleus(logprobs, top_p):
    """Mask of the smallest set of most likely tokens whose mass reaches top_p."""
    import mlx.core as mx
    p = mx.exp(logprobs)
    lo = mx.zeros(p.shape[:-1] + (1,), dtype=p.dtype)       # mass(p >= lo) >= top_p
    hi = mx.max(p, axis=-1, keepdims=True) * 1.0001         # mass(p >= hi) == 0
    for _ in range(NUCLEUS_STEPS):
        mid = (lo + hi) * 0.5
        enough = mx.sum(mx.where(p >= mid, p, 0.0), axis=-1, keepdims=True) >= top_p
        lo = mx.where(enough, mid, lo)
        hi = mx.where(enough, hi, mid)
    return p >= lo


def _draw(logits, key):
    """One token per row from softmax(logits) by inverse CDF."""
    import mlx.core as mx
    c = mx.cumsum(mx.softmax(logits, axis=-1), axis=-1)
    u = mx.random.uniform(shape=c.shape[:-1] + (1,), key=key) * c[:, -1:] * (1.0 - 1e-6)
    return mx.minimum(mx.sum(c <= u, axis=-1), logits.shape[-1] - 1)
