"""GGUF import (engines/gguf.py): the embedded SmolLM2 answers through mlx-lm, its
tokenizer reproduces the GGUF vocabulary, tiny llamas written by this file in every
supported tensor type give the logits of a reference model, and unsupported files
are refused with nothing left behind."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engines
from engines.catalog import EMBEDDED_NAME, embedded_gguf
from engines.gguf import import_gguf, read_header
from tinyvlm import bytes_to_unicode  # GPT-2 byte-level symbols, shared test helper

ROOT = Path(__file__).resolve().parent.parent


# --- a minimal GGUF v3 writer (test side; independent of the importer) ------------
F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 8, 12, 13, 14, 30


def _s(text):
    b = text.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(v):
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _s(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_s(x) for x in v)
    if isinstance(v, list) and any(isinstance(x, float) for x in v):
        return struct.pack("<IIQ", 9, 6, len(v)) + struct.pack(f"<{len(v)}f", *v)
    if isinstance(v, list):
        return struct.pack("<IIQ", 9, 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise TypeError(v)


def _blocks(a):
    return a.astype(np.float32).reshape(-1, 32)


def _q4k_block(x):
    """One Q4_K super-block (256 values, 144 bytes): d, dmin, 12 bytes of 6-bit
    sub-block scales/mins, 128 bytes of nibbles (ggml-quants.c block_q4_K)."""
    sub = x.reshape(8, 32)
    lo = np.minimum(sub.min(1), 0)
    scale, minabs = (sub.max(1) - lo) / 15, -lo
    d, dmin = np.float16(scale.max() / 63), np.float16(minabs.max() / 63)
    sc = np.clip(np.round(scale / np.float32(d)), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(minabs / np.float32(dmin)), 0, 63).astype(np.uint8) if dmin else np.zeros(8, np.uint8)
    q = np.clip(np.round((sub + np.float32(dmin) * mn[:, None]) / (np.float32(d) * sc[:, None])), 0, 15)
    q = q.astype(np.uint8)
    packed = np.zeros(12, np.uint8)
    packed[0:4] = sc[0:4] | ((sc[4:8] >> 4) << 6)
    packed[4:8] = mn[0:4] | ((mn[4:8] >> 4) << 6)
    packed[8:12] = (sc[4:8] & 15) | ((mn[4:8] & 15) << 4)
    qs = np.concatenate([q[2 * c] | (q[2 * c + 1] << 4) for c in range(4)]).astype(np.uint8)
    return d.tobytes() + dmin.tobytes() + packed.tobytes() + qs.tobytes()


def _q4k_decode(blk):
    d, dmin = blk[0:2].view(np.float16).astype(np.float32)[0], blk[2:4].view(np.float16).astype(np.float32)[0]
    p, qs = blk[4:16], blk[16:144]
    sc = np.concatenate([p[0:4] & 63, (p[8:12] & 15) | ((p[0:4] >> 6) << 4)]).astype(np.float32)
    mn = np.concatenate([p[4:8] & 63, (p[8:12] >> 4) | ((p[4:8] >> 6) << 4)]).astype(np.float32)
    out = []
    for c in range(4):
        chunk = qs[32 * c:32 * c + 32]
        out.append(d * sc[2 * c] * (chunk & 15) - dmin * mn[2 * c])
        out.append(d * sc[2 * c + 1] * (chunk >> 4) - dmin * mn[2 * c + 1])
    return np.concatenate(out).astype(np.float32)


def _q5k_block(x):
    """One Q5_K super-block (176 bytes): d, dmin, 12 bytes of scales/mins, 32 bytes
    of high bits, 128 bytes of low nibbles (block_q5_K)."""
    sub = x.reshape(8, 32)
    lo = np.minimum(sub.min(1), 0)
    scale, minabs = (sub.max(1) - lo) / 31, -lo
    d, dmin = np.float16(scale.max() / 63), np.float16(minabs.max() / 63)
    sc = np.clip(np.round(scale / np.float32(d)), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(minabs / np.float32(dmin)), 0, 63).astype(np.uint8) if dmin else np.zeros(8, np.uint8)
    q = np.clip(np.round((sub + np.float32(dmin) * mn[:, None]) / (np.float32(d) * sc[:, None])), 0, 31)
    q = q.astype(np.uint8)
    packed = np.zeros(12, np.uint8)
    packed[0:4] = sc[0:4] | ((sc[4:8] >> 4) << 6)
    packed[4:8] = mn[0:4] | ((mn[4:8] >> 4) << 6)
    packed[8:12] = (sc[4:8] & 15) | ((mn[4:8] & 15) << 4)
    qh = np.zeros(32, np.uint8)
    for sb in range(8):
        qh |= ((q[sb] >> 4) & 1) << sb
    qs = np.concatenate([(q[2 * c] & 15) | ((q[2 * c + 1] & 15) << 4) for c in range(4)]).astype(np.uint8)
    return d.tobytes() + dmin.tobytes() + packed.tobytes() + qh.tobytes() + qs.tobytes()


def _q5k_decode(blk):
    d, dmin = blk[0:2].view(np.float16).astype(np.float32)[0], blk[2:4].view(np.float16).astype(np.float32)[0]
    p, qh, qs = blk[4:16], blk[16:48], blk[48:176]
    y = []
    for j in range(4):                       # dequantize_row_q5_K, literally
        for half in range(2):
            sb = 2 * j + half
            if sb < 4:
                sc, m = p[sb] & 63, p[sb + 4] & 63
            else:
                sc = (p[sb + 4] & 0xF) | ((p[sb - 4] >> 6) << 4)
                m = (p[sb + 4] >> 4) | ((p[sb] >> 6) << 4)
            for l in range(32):
                ql = qs[32 * j + l]
                q = (ql & 0xF if half == 0 else ql >> 4) + (16 if qh[l] & (1 << sb) else 0)
                y.append(d * sc * q - dmin * m)
    return np.array(y, np.float32)


def _q6k_block(x):
    """One Q6_K super-block (210 bytes): 128 bytes low nibbles, 64 bytes high
    2-bit pairs, 16 int8 scales, d (block_q6_K)."""
    groups = x.reshape(16, 16)
    scale = np.abs(groups).max(1) / 32
    d = np.float16(scale.max() / 127)
    sc = np.clip(np.round(scale / np.float32(d)), 1, 127).astype(np.int8)
    q = (np.clip(np.round(groups / (np.float32(d) * sc[:, None])), -32, 31) + 32).astype(np.uint8).reshape(256)
    ql, qh = np.zeros(128, np.uint8), np.zeros(64, np.uint8)
    for h in range(2):
        Q = q[128 * h:128 * h + 128].reshape(4, 32)
        ql[64 * h:64 * h + 32] = (Q[0] & 15) | ((Q[2] & 15) << 4)
        ql[64 * h + 32:64 * h + 64] = (Q[1] & 15) | ((Q[3] & 15) << 4)
        qh[32 * h:32 * h + 32] = (Q[0] >> 4) | ((Q[1] >> 4) << 2) | ((Q[2] >> 4) << 4) | ((Q[3] >> 4) << 6)
    return ql.tobytes() + qh.tobytes() + sc.tobytes() + d.tobytes()


def _q6k_decode(blk):
    ql, qh, sc = blk[:128], blk[128:192], blk[192:208].view(np.int8)
    d = blk[208:210].view(np.float16).astype(np.float32)[0]
    y = np.zeros(256, np.float32)
    for n in range(2):                        # dequantize_row_q6_K, literally
        for l in range(32):
            i = l // 16
            L, H, S = ql[64 * n:], qh[32 * n:], sc[8 * n:]
            q1 = int((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
            q2 = int((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
            q3 = int((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
            q4 = int((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
            y[128 * n + l] = d * S[i] * q1
            y[128 * n + l + 32] = d * S[i + 2] * q2
            y[128 * n + l + 64] = d * S[i + 4] * q3
            y[128 * n + l + 96] = d * S[i + 6] * q4
    return y


def encode(a, ttype):
    """ggml's block encodings (ggml-quants.c reference rows)."""
    if ttype == F32:
        return a.astype("<f4").tobytes()
    if ttype == F16:
        return a.astype("<f2").tobytes()
    if ttype in (Q4_K, Q5_K, Q6_K):
        block = {Q4_K: _q4k_block, Q5_K: _q5k_block, Q6_K: _q6k_block}[ttype]
        return b"".join(block(x) for x in a.astype(np.float32).reshape(-1, 256))
    if ttype == BF16:
        return (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    out = bytearray()
    for blk in _blocks(a):
        if ttype == Q8_0:
            d = np.float16(np.abs(blk).max() / 127)
            q = np.round(blk / d if d else blk * 0).astype(np.int8)
            out += d.tobytes() + q.tobytes()
        elif ttype == Q4_0:
            m = blk[np.argmax(np.abs(blk))]
            d = m / -8
            q = np.clip((blk * (1 / d if d else 0) + 8.5).astype(np.int8), 0, 15).astype(np.uint8)
            out += np.float16(d).tobytes() + (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()
        elif ttype == Q4_1:
            lo, hi = blk.min(), blk.max()
            d = (hi - lo) / 15
            q = np.clip(np.round((blk - lo) / d if d else blk * 0), 0, 15).astype(np.uint8)
            out += np.float16(d).tobytes() + np.float16(lo).tobytes()
            out += (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()
    return bytes(out)


def decode(a, ttype):
    """What the encoding above represents, as float32 (the reference weights)."""
    if ttype == F32:
        return a.astype(np.float32)
    if ttype == F16:
        return a.astype(np.float16).astype(np.float32)
    raw = np.frombuffer(encode(a, ttype), np.uint8)
    if ttype in (Q4_K, Q5_K, Q6_K):
        size, dec = {Q4_K: (144, _q4k_decode), Q5_K: (176, _q5k_decode), Q6_K: (210, _q6k_decode)}[ttype]
        return np.concatenate([dec(b) for b in raw.reshape(-1, size)]).reshape(a.shape)
    if ttype == BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(a.shape)
    rows = []
    size = {Q8_0: 34, Q4_0: 18, Q4_1: 20}[ttype]
    for blk in raw.reshape(-1, size):
        d = blk[:2].view(np.float16).astype(np.float32)[0]
        if ttype == Q8_0:
            rows.append(blk[2:].view(np.int8).astype(np.float32) * d)
            continue
        off = 4 if ttype == Q4_1 else 2
        qs = blk[off:]
        q = np.concatenate([qs & 15, qs >> 4]).astype(np.float32)
        if ttype == Q4_0:
            rows.append((q - 8) * d)
        else:
            rows.append(q * d + blk[2:4].view(np.float16).astype(np.float32)[0])
    return np.concatenate(rows).reshape(a.shape)


def write_gguf(path, metadata, tensors):
    """tensors: [(name, float32 array numpy-order, ggml type)]."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(_s(k) + _value(v) for k, v in metadata.items())
    blobs, offset = [], 0
    for name, arr, ttype in tensors:
        raw = encode(arr, ttype)
        head += _s(name) + struct.pack("<I", arr.ndim)
        head += struct.pack(f"<{arr.ndim}Q", *reversed(arr.shape)) + struct.pack("<IQ", ttype, offset)
        raw += bytes(-len(raw) % 32)
        blobs.append(raw)
        offset += len(raw)
    head += bytes(-len(head) % 32)
    Path(path).write_bytes(head + b"".join(blobs))


TINY = dict(hidden=64, layers=2, ffn=128, heads=4, kv_heads=2, ctx=512)
TINY_K = dict(TINY, hidden=256, ffn=512)       # K-quant super-blocks span 256 values


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def llama_cpp_rope_factors(head_dim, base, sc):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, for Llama 3 scaling."""
    import math
    out = []
    low_wl = sc["original_max_position_embeddings"] / sc["low_freq_factor"]
    high_wl = sc["original_max_position_embeddings"] / sc["high_freq_factor"]
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(sc["factor"])
        else:
            smooth = (sc["original_max_position_embeddings"] / wavelen - sc["low_freq_factor"]) / \
                (sc["high_freq_factor"] - sc["low_freq_factor"])
            out.append(1 / ((1 - smooth) / sc["factor"] + smooth))
    return np.array(out, np.float32)


# A small SentencePiece-BPE vocabulary (tokenizer.ggml.model "llama"): <unk>, <s>,
# </s>, the 256 byte-fallback tokens, then pieces; scores are distinct (SentencePiece
# merges the adjacent pair making the highest-scoring piece).
SPM_PIECES = ["\u2581", "e", "h", "l", "o", "w", "r", "d", "t", "a", "ll", "\u2581h", "he", "\u2581he",
              "llo", "\u2581hello", "or", "\u2581w", "\u2581wor", "ld", "\u2581world", "\u2581t",
              "\u2581th", "th", "\u2581the", "\u2581a", "at", "\u2581\u2581"]


def spm_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) - 0.5 * (len(p) == 1) * 100
                                               for i, p in enumerate(SPM_PIECES)]
    return tokens, types, scores


def spm_reference(text, tokens, scores, add_space_prefix=True):
    """llama.cpp's llm_tokenizer_spm on one run of text: start from UTF-8 characters,
    repeatedly merge the adjacent pair whose concatenation is the highest-scoring
    piece (leftmost on ties), then map pieces to ids, unknown ones byte by byte."""
    ids = {t: i for i, t in enumerate(tokens)}
    text = ((" " if add_space_prefix else "") + text).replace(" ", "\u2581")
    sym = list(text)
    while True:
        best = None
        for i in range(len(sym) - 1):
            j = ids.get(sym[i] + sym[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        sym[i:i + 2] = [sym[i] + sym[i + 1]]
    out = []
    for p in sym:
        out += [ids[p]] if p in ids else [ids["<0x%02X>" % b] for b in p.encode("utf-8")]
    return out


def tiny_llama_gguf(path, ttype, arch="llama", seed=0, llama3_rope=False, spm=False, extra_md=None):
    """A random tiny llama written as GGUF (q/k permuted the way llama.cpp's converter
    does) and the reference mlx-lm model (HF layout, non-traditional RoPE) holding
    exactly the weights the GGUF encodes. arch "qwen2": mlx-lm's Qwen2 (q/k/v biases,
    q/k not permuted, as llama.cpp writes it); any other arch name: llama weights
    under that name (for refusal tests)."""
    dims = TINY_K if ttype in (Q4_K, Q5_K, Q6_K) else TINY
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama, qwen2
    family = qwen2 if arch == "qwen2" else llama

    theta = 500000.0 if llama3_rope else 10000.0
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    b2u = bytes_to_unicode()
    tokens = specials + [b2u[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab = len(tokens) + 5          # rows nobody uses; a vocab that is not a multiple of 32
    tokens += [f"<unused{i}>" for i in range(5)]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    if spm:
        tokens, types, scores = spm_vocab()
        vocab = len(tokens)
    args = family.ModelArgs(model_type=family.__name__.rsplit(".", 1)[1], hidden_size=dims["hidden"],
                           num_hidden_layers=dims["layers"], intermediate_size=dims["ffn"],
                           num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                           rms_norm_eps=1e-5, vocab_size=vocab, rope_theta=theta,
                           rope_traditional=False, tie_word_embeddings=False,
                           max_position_embeddings=dims["ctx"],
                           rope_scaling=dict(LLAMA3_SCALING) if llama3_rope else None)
    mx.random.seed(seed)
    ref = family.Model(args)
    params = {k: np.array(v) for k, v in tree_flatten(ref.parameters())}
    gg_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def permute(w, n_head):          # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    tensors, new_params = [], {}
    for k, w in sorted(params.items()):
        parts = k.split(".")
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        elif k == "lm_head.weight":
            name = "output.weight"
        else:
            name = "blk.%s.%s.%s" % (parts[2], gg_names[".".join(parts[3:-1])], parts[-1])
        t = ttype if w.ndim == 2 else F32              # ggml keeps norms and biases in F32
        new_params[k] = decode(w, t)                   # row-wise: commutes with the permutation
        if arch == "qwen2":
            pass                                       # llama.cpp keeps Qwen2's HF layout
        elif name.endswith("attn_q.weight"):
            w = permute(w, dims["heads"])
        elif name.endswith("attn_k.weight"):
            w = permute(w, dims["kv_heads"])
        tensors.append((name, w, t))
    if llama3_rope:
        head_dim = dims["hidden"] // dims["heads"]
        tensors.append(("rope_freqs.weight", llama_cpp_rope_factors(head_dim, theta, LLAMA3_SCALING), F32))
    ref.load_weights([(k, mx.array(v)) for k, v in new_params.items()])
    md = {
        "general.architecture": arch, "general.name": "tiny", "general.license": "mit",
        "general.file_type": {F32: 0, F16: 1, Q4_0: 2, Q4_1: 3, Q8_0: 7, Q4_K: 15, Q5_K: 17, Q6_K: 18,
                              BF16: 32}[ttype],
        f"{arch}.context_length": dims["ctx"], f"{arch}.embedding_length": dims["hidden"],
        f"{arch}.block_count": dims["layers"], f"{arch}.feed_forward_length": dims["ffn"],
        f"{arch}.attention.head_count": dims["heads"], f"{arch}.attention.head_count_kv": dims["kv_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.freq_base": theta,
        f"{arch}.vocab_size": vocab,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2" if arch == "qwen2" else "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                   "{{ m['content'] }}<|im_end|>\n{% endfor %}",
    }
    if spm:
        del md["tokenizer.ggml.merges"], md["tokenizer.ggml.pre"]
        md.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": scores,
                   "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.unknown_token_id": 0,
                   "tokenizer.ggml.token_type": types, "tokenizer.ggml.tokens": tokens})
    md.update(extra_md or {})
    write_gguf(path, md, tensors)
    return ref


def leftovers(d):
    return sorted(p.name for p in Path(d).iterdir()) if Path(d).exists() else []


# --- the embedded SmolLM2 ----------------------------------------------------------
@pytest.fixture(scope="module")
def smol(models_dir):
    return Path(models_dir) / EMBEDDED_NAME


def test_embedded_gguf_imports_and_answers(smol):
    import mlx_lm
    model, tok = mlx_lm.load(str(smol))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    answer = mlx_lm.generate(model, tok, prompt, max_tokens=24)
    assert "Paris" in answer, answer
    cfg = json.loads((smol / "config.json").read_text())
    assert cfg["rope_traditional"] is True and cfg["model_type"] == "llama"
    assert cfg["quantization"]["bits"] == 4
    assert cfg["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}


def _bpe_reference(word, ranks):
    """Textbook BPE of one pre-token by merge rank (independent of `tokenizers`)."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def test_tokenizer_matches_gguf_vocabulary(smol):
    from tokenizers import Tokenizer
    md, _ = read_header(embedded_gguf())
    vocab = md["tokenizer.ggml.tokens"]
    ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(md["tokenizer.ggml.merges"])}
    tk = Tokenizer.from_file(str(smol / "tokenizer.json"))
    b2u = bytes_to_unicode()
    samples = ["Hello world", "<|im_start|>user\nWhat is 12345?<|im_end|>\n",
               "  two  spaces\tand\ttabs\n\n", "naïve café 日本語 🙂", "<|endoftext|><jupyter_code>x=1",
               "The capital of France is Paris."]
    for text in samples:
        ids = tk.encode(text).ids
        assert tk.decode(ids, skip_special_tokens=False) == text
        for i in ids:                     # every id names the same token as in the GGUF
            assert tk.id_to_token(i) == vocab[i]
    specials = {t: vocab.index(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<jupyter_code>")}
    for t, i in specials.items():
        assert tk.encode(t).ids == [i]
        assert tk.encode("a" + t + "b").ids[1] == i
    assert [vocab[i] for i in tk.encode("12345").ids] == list("12345")   # digits split
    for word in [" capital", " France", "Hello", " tokenization", " Paris", " naïve"]:
        symbols = "".join(b2u[b] for b in word.encode("utf-8"))
        expect = [vocab.index(p) for p in _bpe_reference(symbols, ranks)]
        assert tk.encode(word).ids == expect, word


def test_tokenizer_config_loads_through_transformers(smol):
    from mlx_lm.utils import load_tokenizer
    tok = load_tokenizer(smol)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == 1


# --- tiny llamas in every supported tensor type -----------------------------------
@pytest.mark.parametrize("ttype,tol", [(F32, 1e-4), (F16, 1e-3), (BF16, 1e-3), (Q8_0, 2e-3), (Q4_0, 2e-3),
                                      (Q4_1, 2e-3), (Q4_K, 2e-3), (Q5_K, 2.5e-2), (Q6_K, 2.5e-2)],
                         ids=["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_tiny_llama_logits_match_reference(tmp_path, ttype, tol):
    """Exact types match to float rounding; Q5_K/Q6_K are re-quantized to MLX 8-bit,
    so their logits carry that (small) extra error."""
    import mlx.core as mx
    import mlx_lm
    from engines.catalog import Catalog
    ref = tiny_llama_gguf(tmp_path / "tiny.gguf", ttype)
    path = import_gguf(tmp_path / "tiny.gguf", tmp_path / "store", name="tiny")
    model, tok = mlx_lm.load(str(path))
    ids = mx.array([[1, 40, 50, 60, 259, 261, 7, 2]])
    got, want = np.array(model(ids).astype(mx.float32)), np.array(ref(ids).astype(mx.float32))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    assert tok.encode(" the", add_special_tokens=False) == [261]
    info = Catalog(tmp_path / "store", hf_cache=tmp_path / "no-hf").resolve("tiny")
    assert info.quantization == {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_0: "Q4_0",
                                 Q4_1: "Q4_1", Q4_K: "Q4_K_M", Q5_K: "Q5_K_M", Q6_K: "Q6_K"}[ttype]
    assert info.parameter_count == sum(v.size for k, v in
                                       __import__("mlx.utils").utils.tree_flatten(ref.parameters()))
    assert info.license == "mit" and info.context_length == TINY["ctx"] and info.format == "gguf"


@pytest.mark.parametrize("ttype", [F16, Q8_0])
def test_tiny_qwen2_logits_match_reference(tmp_path, ttype):
    import mlx.core as mx
    import mlx_lm
    ref = tiny_llama_gguf(tmp_path / "q.gguf", ttype, arch="qwen2")
    path = import_gguf(tmp_path / "q.gguf", tmp_path / "store", name="q")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["rope_traditional"] is False
    model, tok = mlx_lm.load(str(path))
    ids = mx.array([[1, 40, 50, 60, 259, 261, 7, 2]])
    got, want = np.array(model(ids).astype(mx.float32)), np.array(ref(ids).astype(mx.float32))
    assert np.abs(got - want).max() <= 2e-3 * max(1.0, np.abs(want).max())
    from mlx.utils import tree_flatten
    assert "model.layers.0.self_attn.q_proj.bias" in dict(tree_flatten(model.parameters()))
    assert [tok.convert_ids_to_tokens(i) for i in tok.encode("12 the", add_special_tokens=False)] == \
        ["1", "2", "Ġthe"]                                            # Qwen2 splits digits one by one


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    import mlx.core as mx
    import mlx_lm
    ref = tiny_llama_gguf(tmp_path / "l3.gguf", F16, llama3_rope=True, extra_md={"tokenizer.ggml.eot_token_id": 1})
    path = import_gguf(tmp_path / "l3.gguf", tmp_path / "store", name="l3")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_scaling"] == LLAMA3_SCALING and cfg["rope_theta"] == 500000.0
    assert cfg["eos_token_id"] == [2, 1]         # end of sequence, then end of turn
    model, _ = mlx_lm.load(str(path))
    ids = mx.array([[1, 40, 50, 60, 259, 261, 7, 2]])
    got, want = np.array(model(ids).astype(mx.float32)), np.array(ref(ids).astype(mx.float32))
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
    # far positions, where the scaling matters: the same rotation as the reference
    x = mx.random.normal((1, 4, 3, 16))
    a = model.model.layers[0].self_attn.rope(x, offset=100_000)
    half_split = x.reshape(1, 4, 3, 8, 2).swapaxes(-1, -2).reshape(1, 4, 3, 16)   # pairs (i, i+8)
    b = ref.model.layers[0].self_attn.rope(half_split, offset=100_000)
    b = b.reshape(1, 4, 3, 2, 8).swapaxes(-1, -2).reshape(1, 4, 3, 16)      # back to interleaved pairs
    assert np.abs(np.array(a) - np.array(b)).max() < 1e-3


def test_unrecognised_rope_freqs_refused(tmp_path):
    tiny_llama_gguf(tmp_path / "r.gguf", F32, llama3_rope=True)
    data = bytearray((tmp_path / "r.gguf").read_bytes())
    factors = llama_cpp_rope_factors(16, 500000.0, LLAMA3_SCALING).tobytes()
    at = data.rindex(factors)
    data[at:at + 4] = np.float32(3.0).tobytes()          # not what any Llama 3 config gives
    (tmp_path / "r.gguf").write_bytes(bytes(data))
    with pytest.raises(engines.BadInput, match="rope_freqs"):
        import_gguf(tmp_path / "r.gguf", tmp_path / "store", name="r")
    assert leftovers(tmp_path / "store") == []


def test_sentencepiece_tokenizer_matches_llama_cpp_algorithm(tmp_path):
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer
    from mlx_lm.utils import load_tokenizer
    from tokenizers import Tokenizer
    tiny_llama_gguf(tmp_path / "spm.gguf", F16, spm=True)
    path = import_gguf(tmp_path / "spm.gguf", tmp_path / "store", name="spm")
    tokens, _, scores = spm_vocab()
    tk = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in ["hello world", "the hello", "hello  world", "héllo wörld", "at the\nworld", "a", "ħ€llo 🙂"]:
        want = [1] + spm_reference(text, tokens, scores)            # add_bos_token: <s> first
        assert tk.encode(text).ids == want, text
        assert tk.decode(want, skip_special_tokens=True) == text
    # after a special token the next run of text gets its space prefix again (llama.cpp)
    want = [1] + spm_reference("hello", tokens, scores) + [2] + spm_reference("world", tokens, scores)
    assert tk.encode("hello</s>world").ids == want
    tok = load_tokenizer(path)
    assert isinstance(tok.detokenizer, SPMStreamingDetokenizer)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    detok = tok.detokenizer
    detok.reset()
    for i in tk.encode("hello world héllo").ids[1:]:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == "hello world héllo"


# --- refusals: clear message, nothing left behind ---------------------------------
def test_unsupported_architecture_refused(tmp_path):
    tiny_llama_gguf(tmp_path / "m.gguf", F32, arch="mamba")
    with pytest.raises(engines.BadInput, match="unsupported GGUF architecture 'mamba'"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "store", name="m")
    assert leftovers(tmp_path / "store") == []


def test_unsupported_tensor_type_refused(tmp_path):
    tiny_llama_gguf(tmp_path / "k.gguf", Q4_1)
    # rewrite with one tensor typed Q5_0 (ggml type 6): a type we do not import
    md, tensors = read_header(tmp_path / "k.gguf")
    data = bytearray((tmp_path / "k.gguf").read_bytes())
    needle = _s("blk.0.ffn_down.weight")
    at = data.index(needle) + len(needle) + 4 + 16
    assert struct.unpack_from("<I", data, at)[0] == Q4_1
    struct.pack_into("<I", data, at, Q5_0)
    (tmp_path / "k.gguf").write_bytes(bytes(data))
    with pytest.raises(engines.BadInput, match="unsupported GGUF tensor type Q5_0 in 'blk.0.ffn_down.weight'"):
        import_gguf(tmp_path / "k.gguf", tmp_path / "store", name="k")
    assert leftovers(tmp_path / "store") == []


def test_not_gguf_and_truncated_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(engines.BadInput, match="not a GGUF file"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "store")
    tiny_llama_gguf(tmp_path / "t.gguf", F32)
    raw = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(raw[:2000])
    with pytest.raises(engines.BadInput):
        import_gguf(tmp_path / "t.gguf", tmp_path / "store", name="t")
    assert leftovers(tmp_path / "store") == []


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import mlx.core as mx
    tiny_llama_gguf(tmp_path / "w.gguf", F16)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(OSError):
        import_gguf(tmp_path / "w.gguf", tmp_path / "store", name="w")
    assert leftovers(tmp_path / "store") == []


def test_bad_or_taken_names_refused(tmp_path):
    tiny_llama_gguf(tmp_path / "n.gguf", F16)
    for bad in ["../evil", "/abs", "a/b", "", ".hidden", "x" * 200, "a..b"]:
        with pytest.raises(engines.BadInput, match="invalid model name"):
            import_gguf(tmp_path / "n.gguf", tmp_path / "store", name=bad)
    import_gguf(tmp_path / "n.gguf", tmp_path / "store", name="Tiny-One")
    with pytest.raises(engines.BadInput, match="already exists"):
        import_gguf(tmp_path / "n.gguf", tmp_path / "store", name="tiny-one")
    assert leftovers(tmp_path / "store") == ["tiny-one"]
    assert not (tmp_path / "evil").exists()


def test_cli_import_progress_and_errors(tmp_path):
    tiny_llama_gguf(tmp_path / "Tiny-Model.Q8_0.gguf", Q8_0)
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "localai.py"), "--models-dir",
                                     str(tmp_path / "store"), *a], capture_output=True, text=True, timeout=120)
    r = run("import", str(tmp_path / "Tiny-Model.Q8_0.gguf"))
    assert r.returncode == 0, r.stderr
    assert "100%" in r.stderr and "imported tiny-model-q8_0" in r.stdout
    assert (tmp_path / "store" / "tiny-model-q8_0" / "model.safetensors").is_file()
    r = run("import", str(tmp_path / "Tiny-Model.Q8_0.gguf"), "--name", "second")
    assert r.returncode == 0 and (tmp_path / "store" / "second").is_dir()
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(8))
    r = run("import", str(tmp_path / "junk.gguf"))
    assert r.returncode == 1 and "import failed" in r.stderr and "Traceback" not in r.stderr
    r = run("import", str(tmp_path / "missing.gguf"))
    assert r.returncode == 1 and "no such file" in r.stderr
    assert leftovers(tmp_path / "store") == [".digests.json", "second", "tiny-model-q8_0"] or \
        leftovers(tmp_path / "store") == ["second", "tiny-model-q8_0"]
