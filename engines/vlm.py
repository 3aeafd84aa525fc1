"""Vision-language models through mlx-vlm: the same interface as engines/llm.py.

(issue 5) The only module that touches mlx-vlm.

    generate(req: GenRequest, cancel=None) -> iterator of Chunk   (blocking)
    load(info, keep_alive=None, cancel=None) -> load seconds
    unload(info, cancel=None)
    loaded() -> [(ModelInfo, expires_at or None, info dict)]      for /api/ps

``GenRequest``/``Chunk``/``Job`` are llm's types, and request validation, model
preparation (mlx_setup) and keep-alive bookkeeping are llm's shared code;
sampling and stop sequences are engines/sampling.py's, as for text models. So
max tokens, exact counts and finish reasons behave exactly as for text models.
The prompt count includes the image tokens: it is the length of the token
sequence the model actually reads, image placeholders expanded.

Theory of operation
-------------------
One worker thread (``_Worker``) owns every mlx-vlm model and does all MLX work
for this engine (mlx-vlm's generation stream is thread-local). ``generate``
validates the request in the caller's thread, queues a job (``Busy`` when the
queue is full) and then waits until the worker has *prepared* it: images
decoded, chat template applied with each image in the message it came from,
tokens counted and checked against the context. So a caller sees ``BadInput``
before it starts a response, exactly as with llm. It then returns an iterator
over the job's output queue while the worker decodes token by token, checking
``cancel`` between tokens (a queued job whose cancel is set never runs).

Vision models are decoded one request at a time (mlx-vlm's batch path needs
equal image sizes); models are unloaded when idle past their keep-alive.

Prompt cache: each resident model keeps the KV cache of its last conversation
(mlx-vlm's ``PromptCacheState``); the next request reuses the part of its prompt
that repeats it (so turn 2 of a chat about an image neither re-encodes the image
nor re-reads the history) and reports it as ``cached_tokens``. Token ids cannot
tell two same-sized images apart, so the request's images must be byte-identical
to the cached conversation's; the cache is dropped after an early stop, and never
used by models whose prompt attends both ways (PaliGemma).
Token ids past the tokenizer's vocabulary (padded embeddings) are masked out.
Images: bytes already checked by engines/images.py, decoded here with Pillow.
Only images in user messages are accepted (as in OpenAI's API); a raw prompt
(``req.prompt``) with images is rendered as one user message, since a raw prompt
has no place for the model's image markers.
"""
import dataclasses
import hashlib
import os
import threading
import time

from . import BadInput, Busy, EngineError, Unavailable
from . import images as _images
from . import llm as _llm
from .llm import Chunk, GenRequest  # noqa: F401  (re-exported for callers)
from .llm import (Job, Resident, check_request, done_chunk, ensure_mlx,
                  free_mlx_memory, load_error, next_expiry, prepare_model, release_model,
                  short_error)
from .sampling import StopFilter, make_sampler

# Jobs waiting behind the one being decoded; past this, Busy (503 + Retry-After).
# As llm's queue: room for one request with the server's largest n (8) and more.
MAX_QUEUE = _llm.MAX_QUEUE
RETRY_AFTER = 10
# Vision models resident at once (each is large; text models have their own budget).
MAX_LOADED = 1
# (the keep-alive default is llm's DEFAULT_KEEP_ALIVE: llm.Resident keeps the time)
# Prompt tokens per prefill step (mlx-vlm's chunked prefill), as for text models.
PREFILL_STEP = _llm.PREFILL_STEP

_MISSING = "the vision engine is not installed (pip install mlx-vlm)"


def supports_images(info):
    """True for a model the catalog marked ``vision`` (config.json has vision_config)."""
    return "vision" in (getattr(info, "capabilities", None) or ())


# ---------------------------------------------------------------------------
# public interface
# ---------------------------------------------------------------------------
def generate(req: GenRequest, cancel=None):
    """Blocking iterator of Chunk; the last has done=True. Raises engines errors
    (validation, context and queue errors before the iterator is returned)."""
    check_request(req, allow_images=True)
    if req.images and not supports_images(req.model):
        raise BadInput(f"model '{req.model.id}' does not support images", param="messages")
    _images.check_count(len(req.images))
    if req.images and req.messages is not None:
        req = dataclasses.replace(req, image_slots=_slots(req))
        for s in req.image_slots:
            if not (isinstance(s, int) and 0 <= s < len(req.messages)):
                raise BadInput("image attached to no message", param="messages")
            if req.messages[s].get("role") != "user":
                raise BadInput("images are only accepted in user messages",
                               param="messages")
    job = Job(req, "generate", cancel)
    _worker().submit(job)
    first = job.next_output()              # "prepared", or the error that stopped it
    if first is None:                      # cancelled while waiting
        return iter(())
    return _consume(job)


def _slots(req):
    """Message index per image; a missing or None slot (an image given beside the
    prompt, as /api/generate does) means the last user message."""
    last_user = max((i for i, m in enumerate(req.messages) if m.get("role") == "user"),
                    default=len(req.messages) - 1)
    slots = list(req.image_slots or [])
    slots += [None] * (len(req.images) - len(slots))
    return [last_user if s is None else s for s in slots[:len(req.images)]]


def load(info, keep_alive=None, cancel=None):
    """Load a model (Ollama's empty-prompt generate). Returns load seconds."""
    job = Job(GenRequest(model=info, keep_alive=keep_alive), "load", cancel)
    _worker().submit(job, control=True)
    job.next_output()
    return job.load_seconds


def unload(info, cancel=None):
    job = Job(GenRequest(model=info, keep_alive=0), "unload", cancel)
    _worker().submit(job, control=True)
    job.next_output()
    return 0.0


def loaded():
    """[(ModelInfo, expires_at unix seconds or None, info dict)] for /api/ps."""
    w = _WORKER
    return w.snapshot() if w is not None else []


# ---------------------------------------------------------------------------
# jobs (llm.Job: the caller reads job.out through job.next_output())
# ---------------------------------------------------------------------------
_PREPARED = object()     # put on job.out once the prompt is counted and fits


def _consume(job):
    try:
        while True:
            item = job.next_output()
            if item is None:
                return
            yield item
            if item.done:
                return
    finally:
        job.close()


# ---------------------------------------------------------------------------
# the worker thread: owns MLX for this engine
# ---------------------------------------------------------------------------
class _Resident(Resident):
    def __init__(self, info, model, processor, load_seconds):
        super().__init__(info, load_seconds)
        self.model, self.processor = model, processor
        self.busy = False
        self.detokenizer = None
        self.n_tokens = 0                # ids the tokenizer knows (the embedding may be padded)
        self.cache_state = None          # mlx-vlm PromptCacheState of the last conversation
        self.cache_images = []           # sha256 of the images inside it, in order


_WORKER = None
_WORKER_LOCK = threading.Lock()


def _worker():
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
        return _WORKER


class _Worker:
    def __init__(self):
        self.cv = threading.Condition()
        self.pending = []
        self.models = {}
        self.counters = {"requests": 0, "tokens_generated": 0, "cancelled": 0,
                         "cancelled_in_queue": 0, "busy_rejections": 0}
        self.thread = threading.Thread(target=self._run, name="localai-vlm", daemon=True)
        self.thread.start()

    def submit(self, job, control=False):
        with self.cv:
            self.pending = [j for j in self.pending if not j.cancelled()]
            if not control and len(self.pending) >= MAX_QUEUE:
                self.counters["busy_rejections"] += 1
                raise Busy(f"the vision engine is busy ({len(self.pending)} waiting); "
                           "retry shortly", retry_after=RETRY_AFTER)
            self.pending.append(job)
            self.cv.notify()

    def snapshot(self):
        with self.cv:
            return [m.ps_entry(int(m.busy), len(self.pending), self.counters,
                               engine="mlx-vlm")
                    for m in self.models.values()]

    # -- the thread ----------------------------------------------------------
    def _run(self):
        while True:
            with self.cv:
                while True:
                    dropped = [j for j in self.pending if j.cancelled()]
                    if dropped:
                        self.counters["cancelled_in_queue"] += len(dropped)
                        self.pending = [j for j in self.pending if not j.cancelled()]
                    if self.pending:
                        job = self.pending.pop(0)
                        break
                    self._expire_idle()
                    self.cv.wait(timeout=self._next_expiry())
            try:
                self._do(job)
            except EngineError as e:
                job.put(e)
            except Exception as e:           # never let one request kill the thread
                job.put(EngineError(f"vision generation failed: {type(e).__name__}: "
                                        f"{short_error(e)}"))

    def _next_expiry(self):
        return next_expiry(self.models.values())   # all idle: the worker is waiting

    def _expire_idle(self):
        now = time.time()
        for mid, m in list(self.models.items()):
            if m.expired(now):
                self._unload(mid)

    def _unload(self, mid):
        m = self.models.pop(mid, None)
        if m is not None:
            release_model(m.model)
            m.model = m.processor = None
            free_mlx_memory()

    def _get(self, info):
        m = self.models.get(info.id)
        if m is not None:
            return m
        with self.cv:                        # make room: the others are idle (one worker)
            for mid in list(self.models):
                if len(self.models) >= MAX_LOADED:
                    self._unload(mid)
        _ensure()
        from mlx_vlm.utils import load as vlm_load
        t0 = time.perf_counter()
        try:
            model, processor = vlm_load(str(info.path))
            # the project's dtype choice for this device (float32 on a CPU when it
            # fits the memory budget), exactly as llm does for text models
            model, setup_info = prepare_model(model, info)
        except Exception as e:
            raise load_error(info, e)
        m = _Resident(info, model, processor, time.perf_counter() - t0)
        m.setup_info = setup_info
        m.detokenizer = _detokenizer_prototype(processor)
        try:
            tok = processor.tokenizer if hasattr(processor, "tokenizer") else processor
            m.n_tokens = len(tok)
        except TypeError:
            m.n_tokens = 0
        with self.cv:
            self.models[info.id] = m
        return m

    def _do(self, job):
        info = job.req.model
        if job.cancelled():                  # its client left while it waited
            self.counters["cancelled_in_queue"] += 1
            return
        if job.kind == "unload":
            with self.cv:
                self._unload(info.id)
            job.put(Chunk(done=True, finish_reason="unload"))
            return
        loaded_now = info.id not in self.models
        m = self._get(info)
        job.load_seconds = m.load_seconds if loaded_now else 0.0
        m.touch(job.req.keep_alive)
        if job.kind == "load":
            job.put(Chunk(done=True, finish_reason="load",
                              load_seconds=job.load_seconds))
            return
        m.busy = True
        try:
            self._generate(m, job)
        finally:
            m.busy = False
            m.touch(job.req.keep_alive)
            if m.keep_alive == 0:
                with self.cv:
                    self._unload(info.id)

    # -- one request -------------------------------------------------------------
    def _generate(self, m, job):
        req = job.req
        t_admit = time.perf_counter()
        inputs, n_prompt = _prepare(m, req)
        ctx = _context_length(req.model)
        if n_prompt >= ctx:
            raise BadInput(f"the prompt is {n_prompt} tokens (images included), which "
                           f"does not fit the model's context length of {ctx} tokens",
                           param="messages" if req.messages is not None else "prompt")
        max_tokens = min(req.max_tokens, ctx - n_prompt)
        self.counters["requests"] += 1
        job.put(_PREPARED)

        import copy
        from mlx_vlm.generate import PromptCacheState, stream_generate
        proc = m.processor
        det = copy.copy(m.detokenizer)
        det.reset()
        stop = StopFilter(req.stop)
        # Prompt cache: the KV of the last conversation is reused for the part of
        # the new prompt that repeats it (mlx-vlm's PromptCacheState: text-only
        # suffix, mRoPE primed). Token ids alone cannot tell two same-sized images
        # apart (nor an image from text that spells its placeholder tokens), so the
        # request's images must be exactly the cached conversation's, or the cache
        # is dropped. Clients resend every image each turn, so a chat still reuses.
        digests = [hashlib.sha256(b).hexdigest() for b in req.images]
        if m.cache_state is None or m.cache_images != digests:
            m.cache_state, m.cache_images = PromptCacheState(), []
        # A model whose prompt attends both ways (PaliGemma's prefix) cannot reuse
        # a prefix: its keys/values depended on the old text after it.
        if not _causal_prompt(m.model):
            m.cache_state, m.cache_images = None, []
        gen = stream_generate(
            m.model, proc, "", input_ids=inputs.pop("input_ids"),
            pixel_values=inputs.pop("pixel_values", None),
            mask=inputs.pop("attention_mask", None), prompt_cache_state=m.cache_state,
            max_tokens=max_tokens, sampler=make_sampler(req),
            logits_processors=[_mask_padding(m.n_tokens)] if m.n_tokens else None,
            repetition_penalty=req.repetition_penalty,
            repetition_context_size=req.repetition_context_size or 1,
            presence_penalty=req.presence_penalty or None,
            presence_context_size=req.repetition_context_size or 1,
            frequency_penalty=req.frequency_penalty or None,
            frequency_context_size=req.repetition_context_size or 1,
            prefill_step_size=PREFILL_STEP, **inputs)

        n_out, reason, t_first, hit_stop, cached = 0, "length", None, False, 0
        completed = False
        try:
            for r in gen:
                if r.finish_reason is not None:  # mlx-vlm's extra last result: no new token
                    reason = "stop" if r.finish_reason == "stop" else "length"
                    continue                     # (resuming lets it store the cache)
                if t_first is None:
                    t_first = time.perf_counter()
                cached = r.cached_tokens or 0
                if job.cancelled():
                    self.counters["cancelled"] += 1
                    return
                n_out += 1
                self.counters["tokens_generated"] += 1
                try:
                    det.add_token(r.token)
                except (IndexError, KeyError, TypeError):
                    pass    # an id in the embedding's padding, outside the tokenizer: no text
                text, hit_stop = stop.feed(det.last_segment)
                job.emit(text)
                if hit_stop:
                    reason = "stop"
                    break
            else:
                completed = True
        finally:
            gen.close()
            if completed:
                m.cache_images = digests
            else:   # stopped early: the cache holds tokens its state does not know
                m.cache_state, m.cache_images = None, []
        if not hit_stop:                  # flush what the detokenizer still holds
            det.finalize()
            text, hit = stop.feed(det.last_segment, final=True)
            if hit:
                reason = "stop"
            job.emit(text)
        job.put(done_chunk(reason, prompt_tokens=n_prompt, completion_tokens=n_out,
                               cached_tokens=cached, load_seconds=job.load_seconds,
                               t_admit=t_admit, t_first=t_first))


# ---------------------------------------------------------------------------
# helpers (run on the worker thread)
# ---------------------------------------------------------------------------
_setup_lock = threading.Lock()
_setup_done = False


def _ensure():
    """MLX set up the project's way (llm's mlx_setup hook), then mlx-vlm imported."""
    global _setup_done
    with _setup_lock:
        if _setup_done:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # never reach for the hub
        ensure_mlx()
        try:
            import mlx_vlm.utils  # noqa: F401
            import mlx_vlm.generate  # noqa: F401
        except ImportError:
            raise Unavailable(_MISSING)
        try:   # transformers warns on every processor call about mlx-vlm's kwargs
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
        except ImportError:
            pass
        _setup_done = True


def _causal_prompt(model):
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if getattr(c, "use_bidirectional_attention", False):
            return False
    return True


def _mask_padding(n_tokens):
    """A logits processor that never lets an id past the tokenizer's vocabulary win:
    checkpoints pad the embedding (Qwen2-VL: 151936 rows, 151657 tokens), and such
    an id has no text (mlx-vlm's detokenizer fails on it)."""
    import mlx.core as mx
    masks = {}

    def mask(tokens, logits):
        width = logits.shape[-1]
        if width <= n_tokens:
            return logits
        add = masks.get(width)
        if add is None:
            add = masks[width] = mx.concatenate(
                [mx.zeros((n_tokens,)), mx.full((width - n_tokens,), -mx.inf)]).astype(logits.dtype)
        return logits + add
    return mask


def _detokenizer_prototype(processor):
    """mlx-lm's streaming detokenizer of the same kind mlx-vlm chose, on the
    processor's own tokenizer: text streams exactly as it does for text models
    (mlx-lm's BPE one releases each token once its UTF-8 is complete; mlx-vlm's
    holds text back until the next space). Falls back to mlx-vlm's."""
    tok = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    name = type(getattr(processor, "detokenizer", None)).__name__
    try:
        import mlx_lm.tokenizer_utils as lm_tok
        cls = getattr(lm_tok, name, None) if name.endswith("StreamingDetokenizer") else None
        if cls is not None:
            return cls(tok)
    except Exception:
        pass
    return processor.detokenizer


def _context_length(info):
    cfg = info.config or {}
    text = cfg.get("text_config") or {}
    return int(info.context_length or cfg.get("max_position_embeddings")
               or text.get("max_position_embeddings") or _llm.DEFAULT_CONTEXT)


def _prepare(m, req):
    """(model inputs dict, prompt token count) with the images in place."""
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens
    pics = [_images.decode(b) for b in req.images]
    cfg = m.model.config
    model_type = getattr(cfg, "model_type", "")
    if req.messages is not None or pics:
        if req.messages is not None:
            msgs, slots = req.messages, list(req.image_slots or [])
        else:
            msgs, slots = [{"role": "user", "content": req.prompt}], [0] * len(pics)
        chat = []
        for i, msg in enumerate(msgs):
            k = slots.count(i)
            text = msg.get("content") or ""
            if k:
                content = [{"type": "image"}] * k + [{"type": "text", "text": text}]
            else:
                content = text
            chat.append({"role": msg.get("role", "user"), "content": content})
        try:
            prompt = apply_chat_template(m.processor, cfg, chat, num_images=len(pics))
        except ValueError as e:            # e.g. "does not support multi-image chat"
            raise BadInput(f"model '{req.model.id}': {short_error(e)}", param="messages")
        if not isinstance(prompt, str):    # single-turn formats hand back the message
            prompt = prompt.get("content") if isinstance(prompt, dict) else str(prompt)
            if isinstance(prompt, list):
                prompt = " ".join(p.get("text", "") for p in prompt if isinstance(p, dict))
    else:
        prompt = req.prompt
    try:
        inputs = prepare_inputs(
            m.processor, images=pics or None, prompts=prompt,
            image_token_index=getattr(cfg, "image_token_index", None)
            or getattr(cfg, "image_token_id", None),
            add_special_tokens=should_add_special_tokens(model_type, m.processor))
    except (ValueError, TypeError, IndexError) as e:
        raise BadInput(f"model '{req.model.id}' could not take these inputs: "
                       f"{short_error(e)}", param="messages")
    inputs = dict(inputs)
    n = int(inputs["input_ids"].size)
    if n == 0:
        raise BadInput("prompt must not be empty", param="prompt")
    return inputs, n
