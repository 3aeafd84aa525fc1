"""GGUF -> MLX model directory import.

    import_gguf(src, dest_dir, name=None, progress=None) -> Path

turns a llama-architecture GGUF file (also Qwen2, whose layout differs only in q/k/v
biases and an unpermuted rotary layout) into a directory ``mlx_lm.load()`` loads:

    config.json            mlx-lm llama config (+ a "gguf" block with the source facts)
    model.safetensors      the weights; quantized tensors stay quantized
    tokenizer.json         built with `tokenizers` from the GGUF vocabulary and merges
    tokenizer_config.json  chat template, special tokens

How:
- Tensors are decoded here, one at a time, from the offsets in the GGUF header
  (numpy over the raw blocks, in ggml-quants.c's reference order). A ggml block of
  32 values with one scale and one offset *is* an MLX affine group of 32, so Q4_0,
  Q4_1, Q8_0 and the 32-value sub-blocks of Q4_K become MLX quantized triples
  (``X.weight`` uint32, ``X.scales``, ``X.biases``) without any loss; Q5_K and Q6_K
  are dequantized and re-quantized to MLX 8-bit; F32/F16/BF16 stay as they are.
  Bits differ per tensor (SmolLM2's Q4_1 file has an 8-bit Q8_0 embedding), so they
  go per layer into config.json's "quantization" block. (DESIGN.md measured
  ``mx.load`` reading GGUF; we do not use it: it reads the whole file at once,
  cannot read Q5_K, turns BF16 into float16 and decodes Q4_K wrongly.)
- llama.cpp stores the q/k projections permuted for its rotary layout;
  ``rope_traditional: true`` in the mlx-lm config matches it without un-permuting.
- Everything else (hyper-parameters, vocabulary, merges, special tokens, chat
  template, license) comes from the GGUF metadata, which we read with the small
  pure-Python header reader below *before* loading any weights, so an unsupported
  file is refused in milliseconds with a clear message.

The write is atomic: everything goes into a hidden temporary directory beside the
destination, which is renamed into place at the end; on any failure it is removed.
No HTTP here; errors are engines.BadInput (bad file, unsupported content, bad name).
"""
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

from . import BadInput

# --- limits (a GGUF header is untrusted input: bound what we allocate) -------------
MAX_GGUF_KV = 100_000          # metadata entries; real files have ~40
MAX_GGUF_TENSORS = 100_000     # a 405B llama has ~1,100
MAX_GGUF_STRING = 16 << 20     # one string (chat templates are a few KB)
MAX_GGUF_ARRAY = 4 << 20       # one array (vocabularies ~50k-260k entries, merges <1M)
MAX_GGUF_DIMS = 4              # ggml tensors have at most 4 dimensions
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}$")  # model ids: one safe path segment

# GGUF architecture -> (mlx-lm model_type, HF class, q/k permuted by llama.cpp?).
# llama.cpp's converter permutes q/k only for llama; Qwen2 keeps HF's (NeoX) layout.
ARCHS = {"llama": ("llama", "LlamaForCausalLM", True),
         "qwen2": ("qwen2", "Qwen2ForCausalLM", False)}
SUPPORTED_ARCHS = tuple(ARCHS)
# ggml tensor types we import (id -> label). We decode them ourselves (_decode),
# one tensor at a time, rather than with mx.load: mx.load's GGUF reader (gguflib)
# reads the whole file at once, cannot read Q5_K, turns BF16 into float16 (which
# can overflow) and applies each even Q4_K sub-block's scale to the odd one too.
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K",
              13: "Q5_K", 14: "Q6_K", 30: "BF16"}
# A Q4_K sub-block of 32 is exactly an MLX 4-bit group of 32 (scale d*sc, bias
# -dmin*m): kept losslessly. Q5_K and Q6_K (Q6_K has 16-value sub-blocks) are
# re-quantized to MLX 8-bit groups of 32, a quarter of their own step at most.
REQUANT_BITS = 8
REQUANT_GROUP = 32
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16",
}
# llama_ftype (general.file_type) -> the label Ollama shows as quantization_level
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0",
              9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L",
              14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
              32: "BF16"}
# GGUF tokenizer.ggml.pre -> the pre-tokenizer recipe (see _build_tokenizer)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")      # digits one by one
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "starcoder", "refact", "llama-bpe",
                  "llama3", "qwen2")

ROPE_FREQS = "rope_freqs.weight"   # Llama 3.x RoPE scaling factors (see _llama3_rope)
# (low_freq_factor, high_freq_factor, original context) tried against rope_freqs:
# Meta's Llama 3.1/3.2/3.3 values first.
LLAMA3_ROPE_CANDIDATES = [(1, 4, 8192)] + [(lo, hi, ctx) for ctx in (2048, 4096, 8192, 16384, 32768)
                                            for lo in (1, 2) for hi in (2, 4, 8) if hi > lo]

_TENSOR_MAP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_MAP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)$")


# --- GGUF header reader ----------------------------------------------------------
_U64 = struct.Struct("<Q")


class _Reader:
    """Cursor over the mapped file; every read is bounds-checked."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise BadInput("not a valid GGUF file (truncated header)")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def unpack(self, fmt):
        st = struct.Struct("<" + fmt)
        return st.unpack(self.take(st.size))[0]

    def strings(self, n):
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        for _ in range(n):
            if pos + 8 > end:
                raise BadInput("not a valid GGUF file (truncated header)")
            (k,) = _U64.unpack_from(buf, pos)
            if k > MAX_GGUF_STRING or pos + 8 + k > end:
                raise BadInput("not a valid GGUF file (bad string)")
            out.append(str(buf[pos + 8:pos + 8 + k], "utf-8", "replace"))
            pos += 8 + k
        self.pos = pos
        return out

    _SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                10: "Q", 11: "q", 12: "d"}

    def value(self, vtype, depth=0):
        if vtype in self._SCALARS:
            return self.unpack(self._SCALARS[vtype])
        if vtype == 8:
            return self.strings(1)[0]
        if vtype == 9 and depth == 0:
            itype, n = self.unpack("I"), self.unpack("Q")
            if n > MAX_GGUF_ARRAY:
                raise BadInput("not a valid GGUF file (array too long)")
            if itype == 8:
                return self.strings(n)
            if itype in self._SCALARS and itype != 7:
                fmt = self._SCALARS[itype]
                return list(struct.unpack(f"<{n}{fmt}", self.take(n * struct.calcsize(fmt))))
            return [self.value(itype, depth + 1) for _ in range(n)]
        raise BadInput(f"not a valid GGUF file (unknown value type {vtype})")


def read_header(path, offsets=False):
    """Read a GGUF file's metadata and tensor table without loading tensors.

    Returns (metadata: dict, tensors: dict name -> (dims numpy-order, ggml type id)),
    plus {name: absolute file offset of its data} when `offsets` is true.
    Raises BadInput if the file is not GGUF (or a GGUF version we do not read).
    """
    import mmap
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise BadInput("not a GGUF file (too short)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Reader(buf)
            if r.take(4) != b"GGUF":
                raise BadInput("not a GGUF file (bad magic)")
            version = r.unpack("I")
            if version not in (2, 3):
                raise BadInput(f"unsupported GGUF version {version} (supported: 2, 3)")
            n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
            if n_tensors > MAX_GGUF_TENSORS or n_kv > MAX_GGUF_KV:
                raise BadInput("not a valid GGUF file (implausible counts)")
            md = {}
            for _ in range(n_kv):
                key = r.strings(1)[0]
                md[key] = r.value(r.unpack("I"))
            tensors, where = {}, {}
            for _ in range(n_tensors):
                name = r.strings(1)[0]
                nd = r.unpack("I")
                if nd > MAX_GGUF_DIMS:
                    raise BadInput("not a valid GGUF file (too many dimensions)")
                dims = [r.unpack("Q") for _ in range(nd)]
                ttype = r.unpack("I")
                where[name] = r.unpack("Q")
                tensors[name] = (tuple(reversed(dims)), ttype)
            align = md.get("general.alignment", 32)
            if not isinstance(align, int) or align <= 0:
                raise BadInput("not a valid GGUF file (bad alignment)")
            start = -(-r.pos // align) * align
    if offsets:
        return md, tensors, {k: start + v for k, v in where.items()}
    return md, tensors


# --- naming ----------------------------------------------------------------------
def default_name(src):
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct-q4_1`."""
    stem = Path(src).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    name = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-._")
    return name[:96] or "model"


def check_name(name):
    """A model id is one safe path segment: lower-case letters, digits, . _ -."""
    if not isinstance(name, str) or not NAME_RE.match(name.lower()) or ".." in name:
        raise BadInput(f"invalid model name {str(name)[:100]!r}: use letters, digits, "
                       "'.', '_' and '-' (at most 96 characters)", param="name")
    return name.lower()


# --- conversion ------------------------------------------------------------------
def _mlx_name(gguf_name):
    """GGUF tensor name (without .weight/.scales/.biases) -> mlx-lm module path."""
    if gguf_name in _TENSOR_MAP:
        return _TENSOR_MAP[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_MAP:
        return f"model.layers.{int(m.group(1))}.{_BLOCK_MAP[m.group(2)]}"
    return None


def _get(md, arch, key, default=None, required=True):
    full = f"{arch}.{key}"
    if full in md:
        return md[full]
    if required and default is None:
        raise BadInput(f"GGUF metadata lacks '{full}'")
    return default


def _check(md, tensors):
    """Refuse anything we cannot convert faithfully, before loading weights."""
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise BadInput(f"unsupported GGUF architecture {str(arch)[:50]!r} "
                       f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    for tname, (_dims, ttype) in tensors.items():
        if ttype not in GGML_TYPES:
            label = GGML_TYPE_NAMES.get(ttype, f"type {ttype}")
            raise BadInput(f"unsupported GGUF tensor type {label} in '{tname[:80]}' "
                           f"(supported: {', '.join(GGML_TYPES.values())})")
        if tname == ROPE_FREQS and arch == "llama":
            continue
        base, _, leaf = tname.rpartition(".")
        biased = arch == "qwen2" and base.rsplit(".", 1)[-1] in ("attn_q", "attn_k", "attn_v")
        if not (leaf == "weight" or (leaf == "bias" and biased)) or _mlx_name(base) is None:
            raise BadInput(f"unsupported GGUF tensor '{tname[:80]}' for a {arch} model")
    tok_model = md.get("tokenizer.ggml.model")
    if tok_model not in ("gpt2", "llama"):
        raise BadInput(f"unsupported GGUF tokenizer {str(tok_model)[:50]!r} (supported: "
                       "gpt2 (byte-level BPE), llama (SentencePiece BPE))")
    pre = md.get("tokenizer.ggml.pre", "default")
    if tok_model == "gpt2" and pre not in PRE_TOKENIZERS:
        raise BadInput(f"unsupported GGUF pre-tokenizer {str(pre)[:50]!r} "
                       f"(supported: {', '.join(PRE_TOKENIZERS)})")
    needs = "tokenizer.ggml.merges" if tok_model == "gpt2" else "tokenizer.ggml.scores"
    if "tokenizer.ggml.tokens" not in md or needs not in md:
        raise BadInput(f"GGUF file has no vocabulary or {needs.rsplit('.', 1)[1]}")
    if _get(md, arch, "rope.scaling.type", "none", required=False) not in ("none", "linear"):
        raise BadInput("unsupported rope scaling "
                       f"{md.get(arch + '.rope.scaling.type')!r} (supported: linear)")
    return arch


def quantization_label(md, tensors):
    """Ollama-style quantization level: general.file_type when known, else the most
    common type among the 2-D weights."""
    ft = md.get("general.file_type")
    if ft in FILE_TYPES:
        return FILE_TYPES[ft]
    counts = {}
    for dims, ttype in tensors.values():
        if len(dims) >= 2:
            counts[ttype] = counts.get(ttype, 0) + 1
    if not counts:
        return "F32"
    best = max(counts, key=counts.get)
    return GGML_TYPE_NAMES.get(best, f"type {best}")


def _llama3_rope(src, md, arch, tensors, offsets):
    """Llama 3.x GGUFs carry their RoPE scaling as a `rope_freqs` tensor (one factor
    per rotary pair) rather than as parameters. mlx-lm wants the parameters, so we
    find the ones that reproduce the tensor (llama.cpp's converter formula) and
    refuse the file if none does."""
    import numpy as np
    dims, ttype = tensors[ROPE_FREQS]
    factors = _decode(src, offsets[ROPE_FREQS], dims, ttype)[1]
    factors = np.asarray(factors, np.float64).reshape(-1)
    head_dim = int(_get(md, arch, "rope.dimension_count", 0, required=False)) or \
        int(_get(md, arch, "embedding_length")) // int(_get(md, arch, "attention.head_count"))
    base = float(_get(md, arch, "rope.freq_base", 10000.0, required=False))
    wavelen = 2 * np.pi * base ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(factors.max())
    if factors.shape != wavelen.shape:
        raise BadInput("GGUF rope_freqs does not match the rotary dimensions")
    for low, high, orig in LLAMA3_ROPE_CANDIDATES:
        smooth = (orig / wavelen - low) / (high - low)
        want = np.where(wavelen < orig / high, 1.0,
                        np.where(wavelen > orig / low, factor,
                                 1 / ((1 - smooth) / factor + smooth)))
        if np.allclose(want, factors, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                    "high_freq_factor": float(high), "original_max_position_embeddings": orig}
    raise BadInput("unsupported GGUF rope_freqs (not a Llama 3 RoPE scaling we recognise)")


def _build_config(md, arch, tensors, quant):
    n_head = int(_get(md, arch, "attention.head_count"))
    hidden = int(_get(md, arch, "embedding_length"))
    tokens = md["tokenizer.ggml.tokens"]
    head_dim = _get(md, arch, "attention.key_length", hidden // n_head, required=False)
    model_type, hf_class, permuted = ARCHS[arch]
    cfg = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(_get(md, arch, "block_count")),
        "intermediate_size": int(_get(md, arch, "feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_get(md, arch, "attention.head_count_kv", n_head,
                                        required=False)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(_get(md, arch, "attention.layer_norm_rms_epsilon")),
        "vocab_size": int(_get(md, arch, "vocab_size", len(tokens), required=False)),
        "rope_theta": float(_get(md, arch, "rope.freq_base", 10000.0, required=False)),
        # llama.cpp permutes llama's q/k for its rotary layout; traditional RoPE
        # (rotating adjacent pairs) matches that without un-permuting
        "rope_traditional": permuted,
        "max_position_embeddings": int(_get(md, arch, "context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False})
    if _get(md, arch, "rope.scaling.type", None, required=False) == "linear":
        cfg["rope_scaling"] = {"type": "linear",
                               "factor": float(_get(md, arch, "rope.scaling.factor"))}
    if isinstance(md.get("tokenizer.ggml.bos_token_id"), int):
        cfg["bos_token_id"] = md["tokenizer.ggml.bos_token_id"]
    # generation stops at end-of-sequence, and also at end-of-turn / end-of-message
    # where the GGUF names them (Llama 3 instruct ends turns with <|eot_id|>)
    stops = []
    for key in ("eos", "eot", "eom"):
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens) and i not in stops:
            stops.append(i)
    if stops:
        cfg["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if quant:
        cfg["quantization"] = quant
        cfg["quantization_config"] = quant
    cfg["gguf"] = {
        "file_type": quantization_label(md, tensors),
        "name": md.get("general.name", ""),
        "license": md.get("general.license", ""),
        "size_label": md.get("general.size_label", ""),
        "organization": md.get("general.organization", ""),
        "architecture": arch,
    }
    return cfg


def _bpe_tokenizer(md, vocab):
    """A byte-level BPE vocabulary (tokenizer.ggml.model "gpt2") with the
    pre-tokenizer llama.cpp uses for its `tokenizer.ggml.pre` name."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre in ("llama-bpe", "llama3", "qwen2"):
        regex = QWEN2_REGEX if pre == "qwen2" else LLAMA3_REGEX
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("smollm", "starcoder", "refact"):
        # the GPT-2 split with every digit on its own (llama.cpp's "smollm" regex)
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    return tk


def _spm_tokenizer(md, tokens, vocab):
    """A SentencePiece-BPE vocabulary (tokenizer.ggml.model "llama": Llama 2,
    TinyLlama, Mistral) as a `tokenizers` BPE, the way transformers converts one:
    merges come from the scores (a pair merges with the score of the piece it
    makes), unknown bytes fall back to <0xXX> tokens, and, as llama.cpp does, a
    space is prepended to each run of text (after every special token too)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = md["tokenizer.ggml.scores"]
    if len(scores) != len(tokens):
        raise BadInput("GGUF scores and tokens differ in length")
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)        # stable: ties keep id order
    unk = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges],
                              unk_token=unk, fuse_unk=True, byte_fallback=True))
    space = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("\u2581")] if space else []
    tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    # exactly the decoder mlx-lm recognises as SentencePiece (streaming detokenizer)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if space else []))
    return tk


def _build_tokenizer(md):
    """tokenizer.json (a `tokenizers.Tokenizer`) + tokenizer_config dict."""
    from tokenizers import AddedToken, processors

    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    spm = md.get("tokenizer.ggml.model") == "llama"
    tk = _spm_tokenizer(md, tokens, vocab) if spm else _bpe_tokenizer(md, vocab)
    # CONTROL (3) and UNKNOWN (2) tokens are special; USER_DEFINED (4) are added text
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (2, 3)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == 4]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)

    def tok(key):
        i = md.get(f"tokenizer.ggml.{'unknown' if key == 'unk' else key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    # llama.cpp adds BOS by default for SentencePiece vocabularies, not for BPE ones
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", spm)) and tok("bos")
    if add_bos:
        bos, bos_id = tok("bos"), md["tokenizer.ggml.bos_token_id"]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)])
    elif not spm:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(md.get(f"{md['general.architecture']}.context_length",
                                       2048)),
        "add_bos_token": bool(add_bos),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    for key in ("bos", "eos", "unk"):
        if tok(key):
            tcfg[f"{key}_token"] = tok(key)
    pad = md.get("tokenizer.ggml.padding_token_id")
    if isinstance(pad, int) and 0 <= pad < len(tokens):
        tcfg["pad_token"] = tokens[pad]
    if md.get("tokenizer.chat_template"):
        tcfg["chat_template"] = md["tokenizer.chat_template"]
    return tk, tcfg


BLOCK_BYTES = {2: 18, 3: 20, 8: 34, 12: 144, 13: 176, 14: 210}   # bytes per block
BLOCK_VALUES = {2: 32, 3: 32, 8: 32, 12: 256, 13: 256, 14: 256}  # values per block


def _k_scales(p):
    """The 8 six-bit sub-block scales and mins of Q4_K/Q5_K (ggml get_scale_min_k4)."""
    import numpy as np
    sc = np.concatenate([p[:, 0:4] & 63, (p[:, 8:12] & 15) | ((p[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([p[:, 4:8] & 63, (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _read(src, offset, dtype, count):
    import numpy as np
    a = np.fromfile(src, dtype=dtype, count=count, offset=offset)
    if a.size != count:
        raise BadInput("GGUF file is truncated")
    return a


def _decode(src, offset, dims, ttype):
    """One tensor, decoded in ggml-quants.c's reference order.

    Returns ("float", float32/float16 array) or ("affine", codes uint8 [rows, n],
    scales [rows, n/32], biases [rows, n/32], bits): ggml blocks of 32 values
    (Q4_0, Q4_1, Q8_0, and Q4_K's sub-blocks) are exactly MLX affine groups of 32."""
    import numpy as np
    n = 1
    for d in dims:
        n *= d
    if ttype == 0:
        return "float", _read(src, offset, "<f4", n).reshape(dims)
    if ttype == 1:
        return "float", _read(src, offset, "<f2", n).reshape(dims)
    if ttype == 30:
        raw = _read(src, offset, "<u2", n)
        return "float", (raw.astype(np.uint32) << 16).view(np.float32).reshape(dims)
    per = BLOCK_VALUES[ttype]
    if n % per or len(dims) != 2 or dims[-1] % per:
        raise BadInput(f"GGUF tensor of shape {dims} is not whole {per}-value blocks")
    nb = n // per
    b = _read(src, offset, np.uint8, nb * BLOCK_BYTES[ttype]).reshape(nb, BLOCK_BYTES[ttype])
    f16 = lambda a: a.copy().view(np.float16).astype(np.float32)   # noqa: E731
    rows = dims[0]
    if ttype in (2, 3):                               # Q4_0: (q-8)*d; Q4_1: q*d + m
        d = f16(b[:, 0:2])
        qs = b[:, 4:20] if ttype == 3 else b[:, 2:18]
        codes = np.concatenate([qs & 15, qs >> 4], axis=1)
        bias = f16(b[:, 2:4]) if ttype == 3 else -8 * d
        return "affine", codes.reshape(dims), d.reshape(rows, -1), bias.reshape(rows, -1), 4
    if ttype == 8:                                    # Q8_0: q*d, q int8 -> (q+128)*d - 128d
        d = f16(b[:, 0:2])
        codes = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return "affine", codes.reshape(dims), d.reshape(rows, -1), (-128 * d).reshape(rows, -1), 8
    if ttype == 14:                                   # Q6_K: ql, qh, int8 scales, d
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8), f16(b[:, 208:210])
        halves = []
        for h in range(2):
            lo, hi = ql[:, 64 * h:64 * h + 64], qh[:, 32 * h:32 * h + 32]
            q = np.concatenate([(lo[:, :32] & 15) | ((hi & 3) << 4),
                                (lo[:, 32:] & 15) | (((hi >> 2) & 3) << 4),
                                (lo[:, :32] >> 4) | (((hi >> 4) & 3) << 4),
                                (lo[:, 32:] >> 4) | (((hi >> 6) & 3) << 4)], axis=1)
            q = q.astype(np.float32).reshape(nb, 8, 16) - 32
            halves.append(q * sc[:, 8 * h:8 * h + 8, None].astype(np.float32))
        return "float", (np.concatenate(halves, axis=1).reshape(nb, 256) * d).reshape(dims)
    d, dmin = f16(b[:, 0:2]), f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    scale, bias = d * sc, -dmin * mn                  # [nb, 8] per 32-value sub-block
    if ttype == 12:                                   # Q4_K: nibbles, low half first
        qs = b[:, 16:144].reshape(nb, 4, 32)
        codes = np.stack([qs & 15, qs >> 4], axis=2).reshape(dims)
        return "affine", codes, scale.reshape(rows, -1), bias.reshape(rows, -1), 4
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(nb, 4, 32)   # Q5_K: + one high bit
    q = np.stack([qs & 15, qs >> 4], axis=2).reshape(nb, 8, 32).astype(np.int32)
    q += ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1).astype(np.int32) << 4
    return "float", (q * scale[:, :, None] + bias[:, :, None]).astype(np.float32).reshape(dims)


def _pack(codes, bits):
    """uint8 codes [rows, n] -> MLX packing: uint32 [rows, n*bits/32], first value in
    the lowest bits (on a little-endian host that is byte order, so 8-bit codes are
    a plain view and 4-bit codes pair up into bytes)."""
    import sys
    import numpy as np
    if sys.byteorder != "little":
        per = 32 // bits
        q = codes.astype(np.uint32).reshape(codes.shape[0], -1, per)
        return (q << (bits * np.arange(per, dtype=np.uint32))).sum(axis=2, dtype=np.uint32)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return np.ascontiguousarray(codes, dtype=np.uint8).view(np.uint32)


def _convert_weights(src, tensors, offsets, progress):
    """Read every tensor, rename to mlx-lm paths, derive per-layer quantization."""
    from . import mlx_setup
    mlx_setup.configure()       # MLX binds its BLAS at first import: let the fast one win
    import mlx.core as mx

    out, per_layer = {}, {}
    names = sorted(t for t in tensors if t != ROPE_FREQS)
    for i, tname in enumerate(names):
        base, _, leaf = tname.rpartition(".")
        path = _mlx_name(base)
        dims, ttype = tensors[tname]
        if leaf == "bias":                            # Qwen2's q/k/v biases: plain vectors
            out[f"{path}.bias"] = mx.array(_decode(src, offsets[tname], dims, ttype)[1])
            continue
        kind, *rest = _decode(src, offsets[tname], dims, ttype)
        if kind == "affine":
            codes, scales, biases, bits = rest
            out[f"{path}.weight"] = mx.array(_pack(codes, bits))
            out[f"{path}.scales"] = mx.array(scales).astype(mx.float16)
            out[f"{path}.biases"] = mx.array(biases).astype(mx.float16)
            per_layer[path] = {"group_size": 32, "bits": bits}
        elif ttype in (13, 14):                       # Q5_K / Q6_K: re-quantize
            w, scales, biases = mx.quantize(mx.array(rest[0]), group_size=REQUANT_GROUP,
                                            bits=REQUANT_BITS)
            out[f"{path}.weight"], out[f"{path}.scales"], out[f"{path}.biases"] = w, scales, biases
            per_layer[path] = {"group_size": REQUANT_GROUP, "bits": REQUANT_BITS}
        else:
            w = mx.array(rest[0])
            out[f"{path}.weight"] = w.astype(mx.bfloat16) if ttype == 30 else w
        if progress:
            progress(0.1 + 0.6 * (i + 1) / len(names), "converting tensors")
    quant = None
    if per_layer:
        # default = the most common setting; layers that differ are listed by path
        combos = {}
        for q in per_layer.values():
            combos[(q["group_size"], q["bits"])] = combos.get((q["group_size"], q["bits"]), 0) + 1
        gs, bits = max(combos, key=combos.get)
        quant = {"group_size": gs, "bits": bits, "mode": "affine"}
        quant.update({k: v for k, v in per_layer.items()
                      if (v["group_size"], v["bits"]) != (gs, bits)})
    return out, quant


def import_gguf(src, dest_dir, name=None, progress=None):
    """Convert the GGUF file `src` into the MLX model directory `dest_dir/name`.

    progress: optional callable(fraction 0..1, message). Returns the new directory.
    Raises BadInput (unsupported file, bad name, name taken); leaves nothing behind
    on failure.
    """
    src = Path(src)
    dest_dir = Path(dest_dir)
    if not src.is_file():
        raise BadInput(f"no such file: {src.name}")
    name = check_name(name if name is not None else default_name(src))
    final = dest_dir / name
    if final.exists():
        raise BadInput(f"model '{name}' already exists", param="name")

    def step(frac, msg):
        if progress:
            progress(frac, msg)

    step(0.0, "reading GGUF header")
    md, tensors, offsets = read_header(src, offsets=True)
    arch = _check(md, tensors)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=dest_dir))
    try:
        step(0.05, "building tokenizer")
        tk, tcfg = _build_tokenizer(md)
        tk.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
        step(0.1, "loading tensors")
        weights, quant = _convert_weights(src, tensors, offsets, progress)
        cfg = _build_config(md, arch, tensors, quant)
        if ROPE_FREQS in tensors:
            cfg["rope_scaling"] = _llama3_rope(src, md, arch, tensors, offsets)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        step(0.75, "writing weights")
        import mlx.core as mx
        mx.save_safetensors(str(tmp / "model.safetensors"), weights,
                            metadata={"format": "mlx"})
        del weights
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if final.exists():    # another process imported the same name meanwhile
                raise BadInput(f"model '{name}' already exists", param="name") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    step(1.0, "done")
    return final
