"""Language models through mlx-lm: one thread owns MLX.

(issue 4) The neutral request/answer types below are shared with
engines/vlm.py (which offers the same generate() for vision models) and the server's
chat/completion handlers; keep their names.

Theory of operation
-------------------
    generate(req, cancel) -> iterator of Chunk      (blocking; call it off the event loop)

``generate`` does the cheap, thread-safe work in the caller's thread: it loads the
model's tokenizer (cached), renders the chat template, counts the prompt tokens,
checks them against the context length (``BadInput`` before any model work), and
queues a job (``Busy`` when the queue is full). It then returns an iterator that
reads the job's output queue.

One scheduler thread (``_Scheduler``) owns MLX: it loads models, and drives one
mlx-lm ``BatchGenerator`` per loaded model, so concurrent requests for the same
model are decoded together in one batched forward pass (continuous batching:
requests join and leave the batch between tokens). Each request has its own
sampler (own PRNG key, so a ``seed`` repeats whatever else is in the batch), its
own logits processors (penalties) and its own text-level stop sequences.
A batch whose requests have no processors is sampled in one pass
(``_batch_step``, ``sampling.sample_rows``): mlx-lm's step would first compute a
log-softmax over the whole vocabulary per row, ~0.5 ms each on a CPU, then call
each request's sampler on its own.
Between every decode step the scheduler checks each request's ``cancel`` event and
drops cancelled requests from the batch; queued requests whose cancel is set are
discarded without running. Prompt processing runs in slices of PREFILL_STEP tokens
(PREFILL_STEP_CPU on a CPU), so cancellation and other requests' decoding also get
a turn during a long prompt.
Prompts computed together are padded to the longest, so admitted requests wait
(``_feed``) until they can join prompts of about their length, shortest first.

Prompt-prefix cache: when a request finishes, its KV cache (prompt + answer) is
stored in an LRU trie (mlx-lm's ``LRUPromptCache``); the system-prompt prefix of a
chat is stored too, at the end of its prefill. The next request whose tokens start
with a stored sequence resumes from it and only computes the rest; the reused
count is reported as ``cached_tokens``.

Models are unloaded when idle past their keep-alive (Ollama semantics: default 5
minutes, 0 = right after the request, negative = never). ``loaded()`` lists them
for ``/api/ps``, with the engine's counters (requests, tokens_generated, cancelled,
cancelled_in_queue, busy_rejections, load_failures, engine_failures, peak_batch,
...) in the info dict; ``stats()`` returns the same counters.

Knobs (environment; defaults in the limits below):
    LOCALAI_LLM_BATCH       sequences decoded together (8)
    LOCALAI_LLM_QUEUE       requests that may wait for a batch slot (16); more -> Busy
    LOCALAI_LLM_MAX_LOADED  language models resident at once (2)

Shared with engines/vlm.py (its public interface beside generate/load/unload/
loaded): the types ``GenRequest``/``Chunk``/``Job``, ``check_request``, ``ensure_mlx``,
``prepare_model``, ``free_mlx_memory``, the keep-alive bookkeeping of a resident
model (``Resident``, ``next_expiry``), ``done_chunk``, ``short_error``,
``load_error`` and the limits DEFAULT_KEEP_ALIVE, MAX_QUEUE, PREFILL_STEP,
DEFAULT_CONTEXT. The sampler and the stop-sequence filter both engines use are in
engines/sampling.py.
"""
import atexit
import gc
import logging
import os
import queue
import threading
import time
import types
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from . import BadInput, Busy, EngineError, Unavailable, mlx_setup
from .sampling import StopFilter, make_sampler, sample_rows

log = logging.getLogger("localai.llm")


@dataclass
class GenRequest:
    model: "object"                      # engines.catalog.ModelInfo
    messages: Optional[list] = None      # chat: [{"role": str, "content": str}] (text only,
                                         #   parts already joined); images go in `images`
    prompt: Optional[str] = None         # completion: raw prompt text, no template
    images: list = field(default_factory=list)   # raw image bytes, in order of appearance
    image_slots: list = field(default_factory=list)  # per image: index of the message it belongs to
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: list = field(default_factory=list)
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    keep_alive: Optional[float] = None   # seconds; None = default; 0 = unload after; <0 = forever


@dataclass
class Chunk:
    """One piece of output. The last chunk has done=True and the exact counts."""
    text: str = ""
    done: bool = False
    finish_reason: Optional[str] = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    load_seconds: float = 0.0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0


def done_chunk(reason, *, prompt_tokens, completion_tokens, cached_tokens,
               load_seconds, t_admit, t_first):
    """The last Chunk of a generation (both engines): its counts, and its time
    split at the first token (t_admit, t_first: perf_counter times, None if
    that moment never came)."""
    now = time.perf_counter()
    first = t_first or now
    return Chunk(done=True, finish_reason=reason, prompt_tokens=prompt_tokens,
                 completion_tokens=completion_tokens, cached_tokens=cached_tokens,
                 load_seconds=load_seconds,
                 prompt_seconds=max(0.0, first - (t_admit or first)),
                 generate_seconds=max(0.0, now - first))


# ---------------------------------------------------------------------------
# Limits (engine-level). Environment overrides exist so that tests and small
# machines can shrink them; the server passes no other knobs.
# ---------------------------------------------------------------------------
def _env_int(name, default):
    try:
        return max(0, int(os.environ.get(name, default)))
    except ValueError:
        return default


# Sequences decoded together in one batch. DESIGN 5: a float32 SmolLM2 decodes
# 16.5 tok/s alone and 92 tok/s in a batch of 8 on 2 cores; beyond 8 the per-token
# latency of every user grows faster than the aggregate.
MAX_BATCH = max(1, _env_int("LOCALAI_LLM_BATCH", 8))
# Requests waiting for a batch slot. Past this a request gets Busy (503 +
# Retry-After) at once instead of waiting minutes behind the others.
MAX_QUEUE = _env_int("LOCALAI_LLM_QUEUE", 16)
# Seconds a client is told to wait when the queue is full (one short answer).
RETRY_AFTER = 5
# Ollama's default keep-alive: a model idle this long is unloaded.
DEFAULT_KEEP_ALIVE = 300.0
# Models resident at once (each has its own batch); the least recently used idle
# one is unloaded to make room.
MAX_LOADED = max(1, _env_int("LOCALAI_LLM_MAX_LOADED", 2))
# Prompt tokens processed per scheduler step: small enough that a long prompt
# does not freeze other users' decoding or delay cancellation for long on a CPU.
PREFILL_STEP = 256
# On a CPU: 128 was also the most rows a product read from the quantized weights
# (mlx_setup's shim; 64 with AVX-512 now, QUANT_MAX_ROWS_AVX512): a 1000-token
# prompt of SmolLM2 took 1.91-1.97 s in slices of 256 (OpenBLAS on float32 weights,
# its AVX2 kernels), 1.58-1.64 s in slices of 128, no better in 96 or 64; with
# OpenBLAS's AVX-512 kernels 1.49-1.53 s and 1.44-1.61 s. (A GPU keeps PREFILL_STEP:
# its products gain from more rows.)
PREFILL_STEP_CPU = 128
# Seconds an idle engine waits, before it starts a new batch, for requests that
# have arrived but are still being tokenized: requests that come together are
# prefilled together (one pass over the weights for all their prompt rows, no
# later merge of batches). A lone request never waits.
ADMIT_WINDOW = 0.01
# Prompts prefilled together are padded to the longest: only prompts whose lengths
# differ by at most PREFILL_GROUP_SLACK tokens or PREFILL_GROUP_FRACTION of the
# shortest are, shortest first (see _feed). Four chats of 43, 94, 196 and 454 tokens
# sent at once were padded to 4 x 454 rows: every first token came after 2.1-2.5 s,
# and the four took as long as one after another.
PREFILL_GROUP_SLACK = 16
PREFILL_GROUP_FRACTION = 0.25
# ...unless a request has waited this long (seconds): its group goes next, so a
# long prompt is not passed over for ever by a stream of short ones.
PREFILL_GROUP_MAX_WAIT = 2.0
# Prompt-prefix cache per model: sequences kept, and their total KV bytes.
PROMPT_CACHE_ENTRIES = 16
PROMPT_CACHE_BYTES = 1 << 30
# A chat whose template renders nothing useful still needs a token to start from.
DEFAULT_CONTEXT = 2048     # used only when a model states no context length



class EngineFailure(RuntimeError):
    """MLX failed while generating (not the client's fault): the server answers
    500, in-band if the stream had started; the engine starts a fresh batch."""


# ---------------------------------------------------------------------------
# MLX setup: engines/mlx_setup.py decides BLAS/dtype/compile.
# ---------------------------------------------------------------------------
_setup_lock = threading.Lock()
_setup_done = False


def prefill_step(mx):
    """Prompt tokens per prefill slice on MLX's default device."""
    return PREFILL_STEP_CPU if mx.default_device() == mx.cpu else PREFILL_STEP


def ensure_mlx():
    """Run mlx_setup.configure() before the first import of mlx, then import mlx-lm.
    (vlm calls it before importing mlx-vlm.)"""
    global _setup_done
    with _setup_lock:
        if _setup_done:
            return
        mlx_setup.configure()
        try:
            import mlx.core  # noqa: F401
            import mlx_lm.generate  # noqa: F401
        except ImportError as e:
            raise Unavailable(f"the MLX language engine is not installed ({e.name})")
        _setup_done = True


def prepare_model(model, info):
    """(model, setup_info): a freshly loaded model with the project's choices for
    this device applied by mlx_setup.prepare (dtype, compile), and mlx_setup's
    description of them for /api/ps. Both engines load through it; release_model
    undoes it."""
    model = mlx_setup.prepare(model, info)
    return model, dict(mlx_setup.describe(model))


def release_model(model):
    """Undo what prepare_model set up outside the model (mlx_setup.release)."""
    if model is not None:
        mlx_setup.release(model)


def free_mlx_memory():
    """After dropping a model's references: collect them, then return MLX's cached
    buffers to the system."""
    gc.collect()
    import mlx.core as mx
    mx.clear_cache()


# ---------------------------------------------------------------------------
# Tokenizers: loaded in the caller's thread (no MLX work), cached per model dir.
# ---------------------------------------------------------------------------
_tok_lock = threading.Lock()
_tokenizers = {}


def _tokenizer(info):
    key = str(info.path)
    with _tok_lock:
        tok = _tokenizers.get(key)
        if tok is not None:
            return tok
        ensure_mlx()
        from mlx_lm.tokenizer_utils import load as load_tokenizer
        eos = (info.config or {}).get("eos_token_id")
        try:
            from pathlib import Path
            tok = load_tokenizer(Path(info.path), eos_token_ids=eos)
        except Exception as e:
            raise Unavailable(f"model '{info.id}' failed to load its tokenizer: "
                              f"{type(e).__name__}: {short_error(e)}")
        _tokenizers[key] = tok
        return tok


def short_error(e, limit=200):
    """An exception's message for a client: the home directory hidden, at most
    limit characters."""
    s = str(e).replace(str(os.path.expanduser("~")), "~")
    return s if len(s) <= limit else s[:limit] + "..."


def load_error(info, e):
    """The Unavailable a client gets when loading model info raised e."""
    return Unavailable(f"model '{info.id}' failed to load: {type(e).__name__}: "
                       f"{short_error(e)}")


def context_length(info):
    cfg = info.config or {}
    return int(info.context_length or cfg.get("max_position_embeddings")
               or DEFAULT_CONTEXT)


def _render_chat(tok, messages):
    """Token ids of a chat rendered by the model's template (generation prompt on)."""
    msgs = [dict(m) for m in messages]
    try:
        if getattr(tok, "has_chat_template", False):
            return list(tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                tokenize=True))
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in msgs)
        return list(tok.encode(text + "assistant: "))
    except Exception as e:
        raise BadInput(f"the model's chat template rejected the messages: {short_error(e)}",
                       param="messages")


def _system_prefix_len(tok, messages, prompt):
    """Length of the prompt's leading system-prompt part (0 if none): that prefix
    is cached on its own so that other conversations with the same system prompt
    reuse it (mlx-lm server does the same)."""
    n_sys = 0
    for m in messages:
        if m.get("role") != "system":
            break
        n_sys += 1
    if not n_sys or not getattr(tok, "has_chat_template", False):
        return 0
    try:
        sys_tokens = tok.apply_chat_template(
            [dict(m) for m in messages[:n_sys]] + [{"role": "user", "content": ""}],
            add_generation_prompt=False, tokenize=True)
    except Exception:
        return 0
    end = 0
    for a, b in zip(sys_tokens, prompt):
        if a != b:
            break
        end += 1
    return end if 0 < end < len(prompt) - 1 else 0


def count_tokens(info, text):
    """The model tokenizer's own count of `text` (no special tokens added)."""
    return len(_tokenizer(info).encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------
# Request validation (vlm's too: the same limits for every model)
# ---------------------------------------------------------------------------
def check_request(req, allow_images=False):
    """BadInput (with its param) for a request no model can take; images only
    when allow_images (vlm checks them itself)."""
    def bad(msg, param):
        raise BadInput(msg, param=param)
    if req.messages is None and req.prompt is None:
        bad("either messages or prompt is required", "messages")
    if req.images and not allow_images:
        bad(f"model '{req.model.id}' does not support images", "messages")
    if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
        bad("max_tokens must be a positive integer", "max_tokens")
    if not (0.0 <= req.temperature <= 100.0):
        bad("temperature must be between 0 and 100", "temperature")
    if not (0.0 < req.top_p <= 1.0):
        bad("top_p must be in (0, 1]", "top_p")
    if req.top_k < 0:
        bad("top_k must be >= 0", "top_k")
    if not (0.0 <= req.min_p <= 1.0):
        bad("min_p must be in [0, 1]", "min_p")
    if req.repetition_penalty is not None and req.repetition_penalty <= 0:
        bad("repetition_penalty must be > 0", "repetition_penalty")
    if req.repetition_context_size < 0:
        bad("repeat_last_n must be >= 0", "repeat_last_n")
    for name in ("presence_penalty", "frequency_penalty"):
        if not (-2.0 <= getattr(req, name) <= 2.0):
            bad(f"{name} must be between -2 and 2", name)
    if any(not isinstance(s, str) for s in req.stop):
        bad("stop must be a string or a list of strings", "stop")


# ---------------------------------------------------------------------------
# Jobs (vlm's too) and the public interface
# ---------------------------------------------------------------------------
class Job:
    """One request between its caller's thread and an engine thread (both
    engines). The engine thread puts Chunks on ``out`` (or the exception that
    ends the request); the caller reads them with next_output(). ``closed`` is
    set once the caller stops reading; ``cancel`` is the caller's
    threading.Event (the server's bridge sets it when the client leaves)."""

    __slots__ = ("req", "kind", "cancel", "out", "closed", "load_seconds", "sink", "lock")

    def __init__(self, req, kind, cancel):
        self.req, self.kind, self.cancel = req, kind, cancel   # kind: generate|load|unload
        self.out = queue.SimpleQueue()
        self.closed = threading.Event()
        self.load_seconds = 0.0
        self.sink = None                # deliver(): items go here instead of out
        self.lock = threading.Lock()

    def put(self, item):
        """(engine thread) Hand the caller an item: to its sink if it attached one
        (_Stream.deliver), else onto ``out`` for next_output()."""
        with self.lock:
            sink = self.sink
            if sink is None:
                self.out.put(item)
        if sink is not None:
            sink(item)

    def cancelled(self):
        return self.closed.is_set() or (self.cancel is not None and self.cancel.is_set())

    def close(self):
        """The caller is done with it: the engine drops it at its next check."""
        self.closed.set()

    def next_output(self):
        """The next item put on ``out`` (an exception put there is raised), or None
        once the job is cancelled; both ways of ending close the job. Waits at
        most 0.1 s between checks of cancel."""
        while True:
            try:
                item = self.out.get(timeout=0.1)
            except queue.Empty:
                if self.cancelled():
                    self.close()
                    return None
                continue
            if isinstance(item, BaseException):
                self.close()
                raise item
            return item

    def emit(self, text):
        """(engine thread) Put a piece of answer text, if any."""
        if text:
            self.put(Chunk(text=text))


class _Job(Job):
    __slots__ = ("info", "prompt", "sys_len", "max_tokens", "stop", "uid", "det",
                 "n_out", "t_submit", "t_admit", "t_first", "cached", "eos",
                 "finished", "loaded", "insert", "prefill", "early")

    def __init__(self, req, kind="generate", cancel=None):
        super().__init__(req, kind, cancel)
        self.info = req.model
        self.prompt, self.sys_len, self.max_tokens = [], 0, 0
        self.stop = StopFilter(req.stop)
        self.uid = None
        self.det = None
        self.n_out = 0
        self.t_submit = time.perf_counter()
        self.t_admit = self.t_first = None
        self.cached = 0
        self.eos = set()
        self.finished = False
        self.loaded = None
        self.insert = None              # mlx-lm's insert arguments, until _feed
        self.prefill = 0                # prompt tokens still to compute (after the cache)
        self.early = None               # a token _tokens_now handed out before the batch

    def close(self):
        if not self.closed.is_set():
            self.closed.set()
            if _SCHED is not None:
                _SCHED.wake()       # so that a waiting scheduler drops it at once


def generate(req: GenRequest, cancel=None, arrival=None):
    """Blocking iterator of Chunk; the last has done=True. Raises engines errors.

    Validation, tokenization, the context check and the queue check happen now,
    before the iterator is returned, so a caller sees BadInput/Busy before it
    starts a response."""
    arrival = arrival or expect()
    try:
        check_request(req)
        job = _prepare(req, cancel)
    except BaseException:
        arrival.done()
        raise
    _scheduler().submit(job, arrival=arrival)
    return _Stream(job)


class Arrival:
    """A request on its way to generate(), counted by an idle engine that is about to
    start a batch (ADMIT_WINDOW) until it is submitted, fails, or is dropped."""

    __slots__ = ("sched", "live")

    def __init__(self, sched):
        self.sched, self.live = sched, True
        sched.arrive(1)

    def done(self):
        if self.live:
            self.live = False
            self.sched.arrive(-1)

    __del__ = done


def expect():
    """Announce a request before its generate() call (the server does this when a
    request is read, before it is handed to a thread); pass it as ``arrival``."""
    return Arrival(_scheduler())


def expect_if_running():
    """expect() once the engine's thread runs, else None (the server announces a
    request as soon as its route is known, before it knows the model or engine)."""
    return Arrival(_SCHED) if _SCHED is not None else None


def _prepare(req, cancel):
    """The job for req: its prompt tokenized and checked against the context."""
    info = req.model
    tok = _tokenizer(info)
    job = _Job(req, cancel=cancel)
    if req.messages is not None:
        job.prompt = _render_chat(tok, req.messages)
        job.sys_len = _system_prefix_len(tok, req.messages, job.prompt)
        param = "messages"
    else:
        job.prompt = list(tok.encode(req.prompt))
        param = "prompt"
        if not job.prompt:
            raise BadInput("prompt must not be empty", param="prompt")
    ctx = context_length(info)
    if len(job.prompt) >= ctx:
        raise BadInput(f"the prompt is {len(job.prompt)} tokens, which does not fit "
                       f"the model's context length of {ctx} tokens", param=param)
    job.max_tokens = min(req.max_tokens, ctx - len(job.prompt))
    job.eos = set(tok.eos_token_ids or ())
    return job


class _Stream:
    """The iterator generate() returns. Closing it (or dropping it) cancels the
    job: a queued job never runs, a running one leaves the batch at the next token."""

    def __init__(self, job):
        self.job = job
        self._done = False

    def __iter__(self):
        return self

    def __next__(self):
        if not self._done:
            try:
                item = self.job.next_output()
            except BaseException:
                self._done = True
                raise
            if item is not None:
                if item.done:
                    self.close()
                return item
            self._done = True
        raise StopIteration

    def deliver(self, sink):
        """From now on the engine's thread calls sink(item) with each item (a Chunk,
        or the exception that ends the request) instead of queueing it for
        __next__; items already waiting go first. The server's event loop takes
        its streams this way, without a thread of its own per request waking for
        every token. The stream ends with the done Chunk or an exception."""
        job = self.job
        with job.lock:
            while True:
                try:
                    item = job.out.get_nowait()
                except queue.Empty:
                    break
                sink(item)
            job.sink = sink

    def close(self):
        self._done = True
        self.job.close()

    def __del__(self):
        self.close()


def load(info, keep_alive=None, cancel=None):
    """Load a model (Ollama's empty-prompt /api/generate). Returns load seconds."""
    return _control(info, "load", keep_alive, cancel)


def unload(info, cancel=None):
    """Unload a model now if loaded (Ollama's keep_alive: 0 with no prompt)."""
    return _control(info, "unload", 0, cancel)


def _control(info, kind, keep_alive, cancel):
    job = _Job(GenRequest(model=info, keep_alive=keep_alive), kind, cancel)
    _scheduler().submit(job, control=True)
    for chunk in _Stream(job):
        return chunk.load_seconds
    return 0.0


def loaded():
    """[(ModelInfo, expires_at unix seconds or None, info dict)] for /api/ps."""
    s = _SCHED
    if s is None:
        return []
    return s.snapshot()


def stats():
    """Engine-wide counters (also inside every loaded() info dict)."""
    s = _SCHED
    return dict(s.counters) if s is not None else dict(_zero_counters())


def _zero_counters():
    return {"requests": 0, "tokens_generated": 0, "prompt_tokens_computed": 0,
            "cached_tokens": 0, "cancelled": 0, "cancelled_in_queue": 0,
            "busy_rejections": 0, "load_failures": 0, "engine_failures": 0,
            "peak_batch": 0, "peak_admitted": 0}


# ---------------------------------------------------------------------------
# Resident models (vlm's too): keep-alive bookkeeping and /api/ps rows
# ---------------------------------------------------------------------------
class Resident:
    """What every engine keeps about a loaded model: when it may be unloaded
    (Ollama's keep-alive) and how it shows in loaded()."""

    def __init__(self, info, load_seconds):
        self.info, self.load_seconds = info, load_seconds
        self.setup_info = {}       # mlx_setup's description of its choices (prepare_model)
        self.touch(None)

    def touch(self, keep_alive):
        """Restart its idle clock: keep_alive seconds (None: DEFAULT_KEEP_ALIVE;
        0: unload as soon as it is idle; negative: never unload)."""
        ka = DEFAULT_KEEP_ALIVE if keep_alive is None else float(keep_alive)
        self.keep_alive = ka
        self.last_used = time.monotonic()
        self.expires_at = time.time() + max(ka, 0.0)

    def expired(self, now):
        """Past its keep-alive at unix time now (the engine unloads it if idle)."""
        return self.keep_alive >= 0 and now >= self.expires_at

    def ps_entry(self, active, queued, counters, **extra):
        """Its loaded() row: (ModelInfo, expires_at unix seconds or None, info dict)."""
        return (self.info, None if self.keep_alive < 0 else self.expires_at,
                {"active": active, "queued": queued, "keep_alive": self.keep_alive,
                 "load_seconds": round(self.load_seconds, 3),
                 **extra, **counters, **self.setup_info})


def next_expiry(models):
    """How long an engine thread may sleep before one of these (idle) models'
    keep-alive runs out: seconds (at least 0.05), or None if none ever does."""
    now = time.time()
    times = [m.expires_at - now for m in models if m.keep_alive >= 0]
    return max(0.05, min(times)) if times else None


# ---------------------------------------------------------------------------
# The scheduler thread
# ---------------------------------------------------------------------------
class _Loaded(Resident):
    """One resident model: weights, tokenizer, its batch, its prompt cache."""

    def __init__(self, info, model, tok, load_seconds):
        super().__init__(info, load_seconds)
        self.model, self.tok = model, tok
        self.gen = None
        self.jobs = {}             # uid -> _Job, in the batch
        self.waiting = []          # admitted jobs not yet in the batch (see _feed)
        self.prompt_cache = None

    def active(self):
        return len(self.jobs) + len(self.waiting)


# What _batch_step uses of mlx-lm's GenerationBatch (0.32); another layout keeps
# mlx-lm's own step.
_STEP_ATTRS = ("model", "uids", "prompt_cache", "tokens", "samplers",
               "logits_processors", "_next_tokens", "_next_logprobs")
# What _batch_next uses of mlx-lm's BatchGenerator (0.32.2).
_NEXT_ATTRS = ("model", "sampler", "prefill_step_size", "prefill_batch_size",
               "completion_batch_size", "_prompt_batch", "_generation_batch",
               "_unprocessed_sequences", "_currently_processing", "_counters",
               "_make_batch")


class _EarlyToken:
    """A token read as soon as it is computed (_Scheduler._tokens_now), shaped like
    mlx-lm's generation response."""
    __slots__ = ("uid", "token", "finish_reason")
    prompt_cache = all_tokens = None

    def __init__(self, uid, token, finish_reason):
        self.uid, self.token, self.finish_reason = uid, token, finish_reason


def _batch_step(self):
    """mlx-lm's GenerationBatch._step, bound to our batch, sampling the whole batch
    in one pass (sampling.sample_rows) when no request has a logits processor
    (penalties): mlx-lm's step calls one sampler per request and first takes a
    log-softmax over the whole vocabulary for every row, ~0.5 ms per row per token
    on a CPU (MLX's x86 exp is scalar); greedy rows need only the argmax and top_k
    rows only their k logits. Nobody reads the logprobs (the server refuses
    logprobs), so none are kept. Any other batch takes mlx-lm's step unchanged.
    Same pipelining as mlx-lm: the next token is computed asynchronously while this
    one is handed out."""
    samplers = self.samplers
    if any(self.logits_processors) or len(samplers) != len(self.uids) or not samplers:
        return type(self)._step(self)
    import mlx.core as mx
    self._current_tokens = inputs = self._next_tokens
    self._current_logprobs = self._next_logprobs
    logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
    self._next_tokens = sample_rows(samplers, logits)
    self._next_logprobs = [None] * len(self.uids)
    mx.async_eval(self._next_tokens)
    mx.eval(inputs, self._current_logprobs)
    inputs = inputs.tolist()
    for sti, ti in zip(self.tokens, inputs):
        sti.append(ti)
    return inputs, self._current_logprobs


def _batch_next(self):
    """mlx-lm 0.32.2's BatchGenerator._next (requirements.txt pins it), bound to our
    generator, with one change: a prompt's last token is computed in its last
    prefill slice, where the first answer token is sampled from its logits, instead
    of in a step of its own. mlx-lm prefills all tokens but the last, then runs the
    last through a one-token step for the new sequences alone, before they join the
    batch: a second pass over every weight, one scheduler step later (a short
    chat's first token: prefill ~9 ms, then that step ~7 ms on 2 cores). In the
    slice it is one more row of products that read the weights anyway, and the
    final norm and head run for that token only (mlx_decode.last_logits). Taken by
    sequences without logits processors (penalties need mlx-lm's step) whose last
    slice has room for the token (bound only for models with our prompt pass);
    anything else goes mlx-lm's way, in the same call."""
    from . import mlx_decode
    import mlx.core as mx
    from mlx_lm.generate import GenerationBatch, PromptProcessingBatch
    prompt_responses, generation_responses = [], []
    if len(self._generation_batch) > 0:
        tic = time.perf_counter()
        generation_responses = self._generation_batch.next()
        self._counters.decode_time += time.perf_counter() - tic
        self._counters.generation_tokens += len(generation_responses)
        self._counters.generation_steps += 1
        if self._counters.generation_steps % 512 == 0:
            mx.clear_cache()
    if len(self._generation_batch) >= self.completion_batch_size:
        return prompt_responses, generation_responses
    n = min(self.prefill_batch_size - len(self._prompt_batch),
            self.completion_batch_size - len(self._generation_batch),
            len(self._unprocessed_sequences))
    if n > 0:
        self._prompt_batch.extend(self._make_batch(n))
    # sequences left with only their last token (mlx-lm's way) start generating
    split = [i for i, seq in enumerate(self._currently_processing)
             if len(seq[0]) == 1 and len(seq[0][0]) == 1]
    if split:
        last_inputs = [self._currently_processing[i][0][0] for i in split]
        progress = [(self._currently_processing[i][2],) * 2 for i in split]
        self._currently_processing = [seq for i, seq in enumerate(self._currently_processing)
                                      if i not in split]
        gen_batch = self._prompt_batch.split(split).generate(last_inputs)
        for uid, p in zip(gen_batch.uids, progress):
            prompt_responses.append(PromptProcessingBatch.Response(uid, p, True, True))
        self._generation_batch.extend(gen_batch)
    pb = self._prompt_batch
    fast = mlx_decode.last_logits(self.model, pb.prompt_cache) if pb.uids else None
    prompts, ends = [], []
    for i, seq in enumerate(self._currently_processing):
        response = PromptProcessingBatch.Response(pb.uids[i], 0, False, False)
        segments = seq[0]
        n = min(len(segments[0]), self.prefill_step_size)
        prompts.append(segments[0][:n])
        segments[0] = segments[0][n:]
        if len(segments[0]) == 0:
            segments.pop(0)
            response.end_of_segment = True
            if (fast is not None and len(segments) == 1 and len(segments[0]) == 1
                    and n < self.prefill_step_size and not pb.logits_processors[i]):
                prompts[-1] = prompts[-1] + segments.pop()      # the last token too
                response.end_of_prompt = True
                ends.append(i)
        seq[1] += len(prompts[-1])
        response.progress = (seq[1], seq[2])
        prompt_responses.append(response)
    self._counters.prompt_tokens += sum(len(p) for p in prompts)
    tic = time.perf_counter()
    if not ends:
        pb.prompt(prompts)
    else:
        first = _prefill_last(pb, prompts, ends, fast)
        if len(ends) == len(pb.uids):
            gen = pb
            self._prompt_batch = PromptProcessingBatch.empty(
                self.model, self.sampler, prefill_step_size=self.prefill_step_size)
        else:
            gen = pb.split(ends)
        self._currently_processing = [seq for i, seq in enumerate(self._currently_processing)
                                      if i not in ends]
        # a generation batch whose next tokens are these (its constructor would
        # step the model when given sequences: they are set after it)
        batch = GenerationBatch(self.model, [], first, gen.prompt_cache, gen.tokens, [],
                                gen.fallback_sampler, [], gen.stop_sequences, gen.max_tokens)
        batch.uids, batch.samplers = gen.uids, gen.samplers
        batch.logits_processors = gen.logits_processors
        batch._num_tokens = [0] * len(gen.uids)
        batch._next_logprobs = [None] * len(gen.uids)
        self._generation_batch.extend(batch)
    self._counters.prompt_time += time.perf_counter() - tic
    return prompt_responses, generation_responses


def _prefill_last(pb, tokens, rows, last_logits):
    """PromptProcessingBatch.prompt(tokens) for one slice (every prompt's tokens
    fit in one pass), computing and sampling the last token of each of rows: their
    first answer tokens (len(rows),), being computed when this returns."""
    import mlx.core as mx
    from mlx_lm.generate import _right_pad_prompts
    for sti, ti in zip(pb.tokens, tokens):
        sti += ti                        # the tokens in the KV cache, as mlx-lm keeps them
    lengths = [len(t) for t in tokens]
    width = max(lengths)
    padding = [width - n for n in lengths]
    if max(padding) > 0:
        inputs = _right_pad_prompts(tokens, max_length=width)
        for c in pb.prompt_cache:
            c.prepare(lengths=lengths, right_padding=padding)
    else:
        inputs = mx.array(tokens)
    logits = last_logits(inputs, rows, [lengths[i] - 1 for i in rows])
    if max(padding) > 0:
        for c in pb.prompt_cache:
            c.finalize()
    first = sample_rows([pb.samplers[i] for i in rows], logits)
    mx.async_eval(first)
    mx.eval([c.state for c in pb.prompt_cache])
    mx.clear_cache()
    return first


def _keep_cache(m, tokens, cache, **kw):
    """Put a sequence's KV cache in the model's prompt cache, its arrays computed now.
    mlx-lm extracts a sequence's cache from the batch lazily: kept as it is, each
    entry would hold on to the whole batch's key and value buffers until evicted, so
    every new batch faulted in fresh memory (4 streams of SmolLM2 while the prompt
    cache filled: 5,000-27,000 page faults a batch, its prefill 150-250 ms instead of
    ~110; aggregate 400 -> 440 tokens/s)."""
    import mlx.core as mx
    mx.async_eval([a for c in cache for a in c.state if isinstance(a, mx.array)])
    m.prompt_cache.insert_cache(m.info.id, list(tokens), cache, **kw)


_SCHED = None
_SCHED_LOCK = threading.Lock()


def _scheduler():
    global _SCHED
    with _SCHED_LOCK:
        if _SCHED is None:
            _SCHED = _Scheduler()
        return _SCHED


class _Scheduler:
    def __init__(self):
        self.cv = threading.Condition()
        self.pending = deque()     # jobs not yet admitted (FIFO)
        self.n_arriving = 0        # generate() calls still preparing their job
        self.models = {}           # model id -> _Loaded
        self.counters = _zero_counters()
        self.last_load_error = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="localai-mlx",
                                       daemon=True)
        self.thread.start()
        # MLX aborts the process if its thread is still alive at exit: stop it
        atexit.register(self.shutdown)

    def shutdown(self, timeout=10.0):
        """Stop the MLX thread (pending and running requests are cancelled)."""
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    # -- called from other threads ------------------------------------------
    def submit(self, job, control=False, arrival=None):
        with self.cv:
            if arrival is not None and arrival.live:
                arrival.live = False
                self.n_arriving -= 1
            waiting = sum(1 for j in self.pending if not j.cancelled())
            active = sum(m.active() for m in self.models.values())
            if not control and waiting + active >= MAX_BATCH + MAX_QUEUE:
                self.counters["busy_rejections"] += 1
                raise Busy(f"the language engine is busy ({active} generating, "
                           f"{waiting} waiting); retry shortly",
                           retry_after=RETRY_AFTER)
            self.pending.append(job)
            self.cv.notify()

    def wake(self):
        with self.cv:
            self.cv.notify()

    def arrive(self, n):
        """One more (1) or one fewer (-1) request on its way (see Arrival)."""
        with self.cv:
            self.n_arriving += n
            if n < 0:
                self.cv.notify()

    def snapshot(self):
        with self.cv:
            return [m.ps_entry(m.active(),
                               sum(1 for j in self.pending
                                   if j.info.id == m.info.id and not j.cancelled()),
                               self.counters, max_batch=MAX_BATCH, max_queue=MAX_QUEUE,
                               prompt_cache_entries=len(m.prompt_cache or ()))
                    for m in self.models.values()]

    # -- the MLX thread --------------------------------------------------------
    def _run(self):
        try:
            ensure_mlx()
        except EngineError as e:
            self._fail_all_forever(e)
            return
        while not self.stopping:
            admit = []
            try:
                admit = self._wait_for_work()
                n = sum(1 for job in admit if job.kind == "generate")
                if n > self.counters["peak_admitted"]:
                    self.counters["peak_admitted"] = n     # prefilled together
                for job in admit:
                    self._admit(job)
                busy = [m for m in self.models.values() if m.active()]
                for m in busy:
                    self._step(m)
                self._reap()
            except Exception as e:     # a bug here must not hang every client
                log.exception("language engine step failed")
                for m in list(self.models.values()):
                    if m.active():
                        self._engine_failed(m, e)
                for job in admit:
                    if job.uid is None:
                        job.put(EngineFailure(f"generation failed: {type(e).__name__}"))
                        for m in self.models.values():
                            m.waiting = [j for j in m.waiting if j is not job]
        stop = Unavailable("the server is shutting down")
        with self.cv:
            jobs = list(self.pending) + [j for m in self.models.values()
                                         for j in [*m.jobs.values(), *m.waiting]]
            self.pending.clear()
        for job in jobs:
            job.put(stop)
        for mid in list(self.models):
            self._unload(mid)
        import mlx.core as mx
        if hasattr(mx, "clear_streams"):
            # MLX needs its thread's streams destroyed before that thread ends, or
            # the process aborts at exit (ml-explore/mlx#3126, mlx-vlm#1945)
            mx.clear_streams()

    def _wait_for_work(self):
        """Block until there is something to do; return the jobs to admit now."""
        with self.cv:
            while True:
                self._drop_cancelled_pending()
                active = sum(m.active() for m in self.models.values())
                if self.pending and (active < MAX_BATCH
                                     or self.pending[0].kind != "generate"):
                    break
                if active or self.stopping:
                    return []
                if self._expired():
                    break
                self.cv.wait(timeout=self._next_expiry())
            if not active and self.pending:
                # a new batch: let requests that are still arriving join it
                deadline = time.perf_counter() + ADMIT_WINDOW
                while self.n_arriving and not self.stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self.cv.wait(timeout=left)
            admit = []
            while self.pending and (active < MAX_BATCH
                                    or self.pending[0].kind != "generate"):
                job = self.pending.popleft()
                admit.append(job)
                if job.kind == "generate":
                    active += 1
            return admit

    def _drop_cancelled_pending(self):
        if any(j.cancelled() for j in self.pending):
            keep = deque()
            for j in self.pending:
                if j.cancelled():
                    self.counters["cancelled_in_queue"] += 1
                else:
                    keep.append(j)
            self.pending = keep

    def _next_expiry(self):
        return next_expiry(m for m in self.models.values() if not m.active())

    def _expired(self):
        """Ids of idle models past their keep-alive (or with keep_alive 0)."""
        now = time.time()
        return [mid for mid, m in self.models.items() if not m.active() and m.expired(now)]

    def _unload(self, mid):
        with self.cv:
            m = self.models.pop(mid, None)
        if m is None:
            return
        release_model(m.model)
        m.gen = m.model = m.prompt_cache = None
        free_mlx_memory()

    def _fail_all_forever(self, err):
        while True:
            with self.cv:
                while not self.pending:
                    self.cv.wait()
                job = self.pending.popleft()
            job.put(err)

    # -- admission ---------------------------------------------------------------
    def _get_model(self, job):
        """The resident model for job (loading it, evicting an idle one), or None
        after reporting a load failure to the job."""
        info = job.info
        m = self.models.get(info.id)
        if m is not None:
            return m
        if len(self.models) >= MAX_LOADED:
            idle = sorted((x for x in self.models.values() if not x.active()),
                          key=lambda x: x.last_used)
            if idle:
                self._unload(idle[0].info.id)
        t0 = time.perf_counter()
        try:
            from pathlib import Path
            from mlx_lm.utils import load_model
            model, _config = load_model(Path(info.path))
            model, setup_info = prepare_model(model, info)
            tok = _tokenizer(info)
        except EngineError as e:
            self._load_failed(job, e)
            return None
        except Exception as e:
            self._load_failed(job, load_error(info, e))
            return None
        m = _Loaded(info, model, tok, time.perf_counter() - t0)
        m.setup_info = setup_info
        self._new_batch(m)
        with self.cv:
            self.models[info.id] = m
        self.last_load_error = None
        job.load_seconds = m.load_seconds
        return m

    def _load_failed(self, job, err):
        self.counters["load_failures"] += 1
        self.last_load_error = err.message
        gc.collect()
        job.put(err)

    def _new_batch(self, m):
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.models.cache import LRUPromptCache
        import mlx.core as mx
        m.gen = BatchGenerator(m.model, completion_batch_size=MAX_BATCH,
                               prefill_batch_size=MAX_BATCH,
                               prefill_step_size=prefill_step(mx),
                               stop_tokens=[[t] for t in m.tok.eos_token_ids])
        gb = getattr(m.gen, "_generation_batch", None)
        if gb is not None and all(hasattr(gb, a) for a in _STEP_ATTRS):
            gb._step = types.MethodType(_batch_step, gb)
        from . import mlx_decode
        if (all(hasattr(m.gen, a) for a in _NEXT_ATTRS)
                and mlx_decode.last_logits(m.model, []) is not None):   # our prompt pass
            m.gen._next = types.MethodType(_batch_next, m.gen)
        if m.prompt_cache is None:
            m.prompt_cache = LRUPromptCache(max_size=PROMPT_CACHE_ENTRIES,
                                            max_bytes=PROMPT_CACHE_BYTES)

    def _admit(self, job):
        if job.cancelled():
            self.counters["cancelled_in_queue"] += 1
            return
        if job.kind == "unload":
            m = self.models.get(job.info.id)
            if m is not None:
                m.touch(0)                 # unloaded now if idle, else when it is
            self._reap()
            job.put(Chunk(done=True, finish_reason="unload"))
            return
        m = self._get_model(job)
        if m is None:
            return
        m.touch(job.req.keep_alive)
        if job.kind == "load":
            job.put(Chunk(done=True, finish_reason="load",
                              load_seconds=job.load_seconds))
            return
        try:
            self._insert(m, job)
        except Exception as e:  # a broken request must not take the thread down
            self.counters["engine_failures"] += 1
            job.put(EngineFailure(f"generation failed: {type(e).__name__}"))

    def _insert(self, m, job):
        from mlx_lm.generate import StopSequences
        from mlx_lm.models.cache import trim_prompt_cache, can_trim_prompt_cache
        from mlx_lm.sample_utils import make_logits_processors
        prompt = job.prompt
        cache, rest = m.prompt_cache.fetch_nearest_cache(m.info.id, prompt)
        if cache is not None and not rest:
            # the whole prompt is cached: recompute its last token to get logits
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        job.cached = len(prompt) - len(rest)
        segments = [rest]
        sys_cut = job.sys_len - job.cached
        seg_types = []     # a stack: the type of each segment that ends early
        if 0 < sys_cut < len(rest) - 1:
            segments = [rest[:sys_cut], rest[sys_cut:]]
            seg_types = ["system"]
        req = job.req
        # repeat_last_n = 0 disables the penalties (Ollama); they look at the
        # last n tokens of the context (prompt and answer), as llama.cpp does
        n_last = req.repetition_context_size
        procs = make_logits_processors(
            None, req.repetition_penalty if n_last else None, n_last,
            (req.presence_penalty or None) if n_last else None, n_last,
            (req.frequency_penalty or None) if n_last else None, n_last)
        job.insert = dict(segments=segments, max_tokens=job.max_tokens, caches=cache,
                          all_tokens=prompt[:job.cached], samplers=make_sampler(req),
                          logits_processors=procs,
                          stop_sequences=StopSequences([[t] for t in job.eos]))
        job.prefill = len(rest)
        job.det = m.tok.detokenizer
        job.t_admit = time.perf_counter()
        job.loaded = (m, seg_types)
        m.waiting.append(job)
        self.counters["requests"] += 1
        self.counters["cached_tokens"] += job.cached
        self.counters["prompt_tokens_computed"] += len(rest)

    def _feed(self, m):
        """Move waiting jobs into the batch, so that prompts prefilled together
        have about the same length (mlx-lm pads them all to the longest).
        When no prompt is being computed: the shortest waiting prompt (or, once
        one has waited PREFILL_GROUP_MAX_WAIT, the longest-waiting one) and those
        within PREFILL_GROUP_SLACK/FRACTION of its length. While a prompt still
        needs more than one prefill slice: everyone waiting, each padded to
        at most one slice instead of waiting for all of its slices. During a
        prompt's last slice: nobody (the next step starts the next group)."""
        if not m.waiting:
            return
        left = max((j.prefill for j in m.jobs.values()), default=0)  # 1: the last token
        if 1 < left <= m.gen.prefill_step_size + 1:
            return
        group = m.waiting
        if left <= 1:
            first = min(m.waiting, key=lambda j: j.t_admit)
            if time.perf_counter() - first.t_admit < PREFILL_GROUP_MAX_WAIT:
                first = min(m.waiting, key=lambda j: j.prefill)
            near = max(PREFILL_GROUP_SLACK, PREFILL_GROUP_FRACTION * first.prefill)
            group = [j for j in m.waiting if abs(j.prefill - first.prefill) <= near]
        m.waiting = [j for j in m.waiting if j not in group]
        for job in group:       # all in mlx-lm's queue before its next step takes them
            try:
                (job.uid,) = m.gen.insert_segments(**{k: [v] for k, v in job.insert.items()})
            except Exception as e:  # a broken request must not take the batch down
                self.counters["engine_failures"] += 1
                job.put(EngineFailure(f"generation failed: {type(e).__name__}"))
                continue
            job.insert = None
            m.jobs[job.uid] = job

    # -- one scheduler step for one model ------------------------------------------
    def _step(self, m):
        # drop cancelled requests before spending a token on them
        gone = [uid for uid, j in m.jobs.items() if j.cancelled()]
        if gone:
            self._remove(m, gone)
            self.counters["cancelled"] += len(gone)
        waiting = [j for j in m.waiting if not j.cancelled()]
        self.counters["cancelled"] += len(m.waiting) - len(waiting)
        m.waiting = waiting
        self._feed(m)
        if not m.jobs:
            return
        if len(m.jobs) > self.counters["peak_batch"]:
            self.counters["peak_batch"] = len(m.jobs)
        mlx_setup.graph_thread(batched=len(m.jobs) > 1)
        try:
            prompt_resps, gen_resps = m.gen.next()
        except Exception as e:
            self._engine_failed(m, e)
            return
        for r in prompt_resps:
            job = m.jobs.get(r.uid)
            if job is None:
                continue
            if r.end_of_prompt:
                job.prefill = 0
            elif getattr(r, "progress", None):
                job.prefill = r.progress[1] - r.progress[0]
            seg_types = job.loaded[1]
            if r.end_of_segment and not r.end_of_prompt and seg_types:
                kind = seg_types.pop()
                for _uid, (cache, toks) in m.gen.extract_cache([r.uid]).items():
                    _keep_cache(m, toks, cache, cache_type=kind)
        finished = []

        def feed(responses):
            for r in responses:
                job = m.jobs.get(r.uid)
                if job is None or job in finished:
                    continue
                if job.early is not None and not isinstance(r, _EarlyToken):
                    job.early = None         # this token went out a step ago
                    continue
                if self._on_token(m, job, r):
                    finished.append(job)
        feed(self._tokens_now(m, [r.uid for r in prompt_resps if r.end_of_prompt]))
        feed(gen_resps)
        feed(self._tokens_now(m, [uid for uid, j in m.jobs.items() if j not in finished
                                  and j.early is None and j.n_out == j.max_tokens - 1]))
        if finished:
            live = [j.uid for j in finished if not j.finished]
            for j in finished:
                j.finished = True
                m.jobs.pop(j.uid, None)
            # those stopped by a stop string are still in the batch: take them out
            if live:
                self._leave_batch(m, live)
            for j in finished:
                m.touch(j.req.keep_alive)

    def _tokens_now(self, m, uids):
        """The tokens the batch is computing for these sequences, read now: mlx-lm
        hands token t out with the next step (it computes t+1 while t goes out), so
        each would wait a whole step more (~15 ms for SmolLM2 on 2 cores, ~25 with 4
        streams). The engine reads a sequence's first token so (its prompt just
        finished: a step sooner to the first token) and its last by max_tokens (the
        answer ends a step sooner, and no step is computed after it). The next
        step's copy of a token read so is skipped (job.early). A token that ends the
        answer (end of sequence, max_tokens, a stop string) ends it now, and the
        sequence leaves the batch (_dropped; as after a stop string)."""
        gb = getattr(m.gen, "_generation_batch", None)
        uids = [uid for uid in uids if uid in m.jobs]
        if not uids or gb is None or getattr(gb, "_next_tokens", None) is None:
            return []
        at = {uid: i for i, uid in enumerate(gb.uids)}
        tokens = gb._next_tokens.tolist()
        out = []
        for uid in uids:
            job, i = m.jobs[uid], at.get(uid)
            if i is not None:
                job.early = t = tokens[i]
                out.append(_EarlyToken(uid, t, "stop" if t in job.eos else "length"
                                       if job.n_out + 1 >= job.max_tokens else None))
        return out

    def _on_token(self, m, job, r):
        """Feed one generated token to job; True when the job is finished."""
        now = time.perf_counter()
        if job.t_first is None:
            job.t_first = now
        self.counters["tokens_generated"] += 1
        reason = r.finish_reason
        if reason == "stop" and r.token in job.eos:
            # end of sequence: the token has no text; flush the detokenizer
            job.det.finalize()
            job.emit(job.stop.feed(job.det.last_segment, final=True)[0])
            self._dropped(m, job, r)
            self._finish(job, "stop")
            return True
        job.n_out += 1
        job.det.add_token(r.token)
        if reason is not None:
            job.det.finalize()
        text, hit = job.stop.feed(job.det.last_segment, final=reason is not None)
        job.emit(text)
        if reason is None and not hit:
            return False
        if reason is not None:
            self._dropped(m, job, r)
        self._finish(job, "length" if reason == "length" and not hit else "stop")
        return True

    def _dropped(self, m, job, r):
        """Job ended by its token r: keep its KV cache for the next turn (before its
        done chunk goes out). The batch finished it itself (it is out of the batch
        already), or a token read early (_tokens_now) ended it: it leaves the batch
        now."""
        job.finished = True
        if isinstance(r, _EarlyToken):
            self._leave_batch(m, [job.uid])
        elif r.prompt_cache is not None:
            _keep_cache(m, r.all_tokens, r.prompt_cache)

    def _leave_batch(self, m, uids):
        """Take these sequences out of mlx-lm's batch, their KV caches kept."""
        for _uid, (cache, toks) in m.gen.remove(uids, return_prompt_caches=True).items():
            _keep_cache(m, toks, cache)

    def _finish(self, job, reason):
        job.put(done_chunk(
            reason, prompt_tokens=len(job.prompt), completion_tokens=job.n_out,
            cached_tokens=job.cached, load_seconds=job.load_seconds,
            t_admit=job.t_admit, t_first=job.t_first))

    def _remove(self, m, uids):
        for uid in uids:
            m.jobs.pop(uid, None)
        try:
            m.gen.remove(uids)
        except Exception as e:
            self._engine_failed(m, e)

    def _engine_failed(self, m, err):
        """The batch broke: fail its requests cleanly, start a fresh batch."""
        self.counters["engine_failures"] += 1
        for job in m.jobs.values():
            job.put(EngineFailure(f"generation failed: {type(err).__name__}: "
                                    f"{short_error(err)}"))
        m.jobs.clear()
        try:
            self._new_batch(m)
        except Exception:
            self._unload(m.info.id)

    def _reap(self):
        """Unload idle models whose keep-alive has run out (0: at once). The lock
        is not held while memory is freed, so /api/ps never waits on it."""
        with self.cv:
            expired = self._expired()
        for mid in expired:
            self._unload(mid)
