"""Build a tiny random-weight Qwen2-VL model directory for the vision tests.

No small vision model ships on PyPI, so the tests make one: mlx-vlm's own
Qwen2-VL ``Model`` instantiated from a small config and saved with its random
parameters, beside a real processor config and a real tokenizer (byte-level BPE
over the 256 bytes, plus Qwen2-VL's special tokens and its real chat template).
The result loads through exactly the code path of an installed model
(``mlx_vlm.load``), and the catalog recognises it as vision by ``vision_config``.

    python tests/tinyvlm.py DIR        # writes DIR/config.json, model.safetensors, ...
    python tests/tinyvlm.py DIR paligemma   # the second architecture (build_paligemma)

Sizes: text hidden 64, 2 layers; vision embed 32, 2 layers, patch 4, merge 2, so
one image token covers 8x8 pixels and images are resized to at most 32x32 pixels
(16 image tokens). About 0.1M parameters; loads in milliseconds.
Why Qwen2-VL and not PaliGemma: it has a real multi-turn chat template that puts
each image where it occurs in the conversation, and supports several images.
"""
import json
import os
import sys
from pathlib import Path

# Qwen2-VL's own chat template (from its tokenizer_config.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
BASE = 256                                  # ids 0..255 are the byte tokens
IDS = {tok: BASE + i for i, tok in enumerate(SPECIAL_TOKENS)}
VOCAB_SIZE = 272                            # 263 used, rounded up
PATCH, MERGE, TEMPORAL = 4, 2, 2
MAX_PIXELS = 32 * 32                        # -> (32/8)^2 = 16 image tokens
MIN_PIXELS = 16 * 16


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (what ByteLevel BPE uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _tokenizer_json():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken
    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_TOKENS])
    assert all(tok.token_to_id(t) == i for t, i in IDS.items())
    return tok.to_str()


def config():
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB_SIZE, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "tie_word_embeddings": False,
        # head_dim 16 -> 8 rotary frequencies split over (time, height, width)
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "bos_token_id": IDS["<|endoftext|>"], "eos_token_id": IDS["<|im_end|>"],
        "pad_token_id": IDS["<|endoftext|>"],
        "image_token_id": IDS["<|image_pad|>"], "video_token_id": IDS["<|video_pad|>"],
        "vision_start_token_id": IDS["<|vision_start|>"],
        "vision_end_token_id": IDS["<|vision_end|>"],
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "qwen2_vl", "depth": 2, "embed_dim": 32, "hidden_size": 64,
            "num_heads": 2, "mlp_ratio": 2, "in_channels": 3, "patch_size": PATCH,
            "spatial_patch_size": PATCH, "spatial_merge_size": MERGE,
            "temporal_patch_size": TEMPORAL,
        },
    }


def build(dest, seed=0, embed_scale=0.1):
    """Write the tiny model into ``dest`` (created if needed); returns the Path.

    ``embed_scale`` shrinks the random token embeddings so the image features
    are not drowned by them (with full-size random embeddings different images
    gave identical greedy tokens)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = config()
    mx.random.seed(seed)
    # the same steps as mlx_vlm.utils.load_model, so the saved parameters match
    raw = json.loads(json.dumps(cfg))
    arch, _ = get_model_and_args(raw)
    raw.setdefault("text_config", {})
    mc = arch.ModelConfig.from_dict(raw)
    mc = update_module_configs(mc, arch, raw, ["text", "vision"])
    model = arch.Model(mc)
    weights = dict(tree_flatten(model.parameters()))
    key = "language_model.model.embed_tokens.weight"
    weights[key] = weights[key] * embed_scale
    # Only printable ASCII (and the end-of-turn token) can win an argmax: the
    # other output rows are zeroed, so greedy text is visible and comparable.
    keep = [b for b in range(32, 127)] + [IDS["<|im_end|>"]]
    row = mx.zeros((VOCAB_SIZE, 1))
    row[mx.array(keep)] = 1.0
    hk = "language_model.lm_head.weight"
    weights[hk] = weights[hk] * row
    # mlx-vlm's sanitize expects the torch layout (out, in, t, h, w) for the 3-D
    # patch convolution, as in every real checkpoint.
    pk = "vision_tower.patch_embed.proj.weight"
    weights[pk] = weights[pk].transpose(0, 4, 1, 2, 3)
    mx.save_safetensors(str(dest / "model.safetensors"),
                        {k: v.astype(mx.float32) for k, v in weights.items()},
                        metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    (dest / "tokenizer.json").write_text(_tokenizer_json())
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "model_max_length": 2048, "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
    }, indent=2))
    (dest / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL,
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True,
    }
    (dest / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (dest / "video_preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (dest / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [IDS["<|im_end|>"], IDS["<|endoftext|>"]],
        "pad_token_id": IDS["<|endoftext|>"]}))
    return dest


# ---------------------------------------------------------------------------
# a second architecture: PaliGemma (SigLIP + Gemma; one image, placed before the
# prompt by its processor rather than by a chat template)
# ---------------------------------------------------------------------------
PG_SPECIAL = ["<pad>", "<eos>", "<bos>", "<image>"]
PG_EXTRA = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]
PG_IMAGE_TOKENS = 16                     # 32x32 pixels, patch 8


def build_paligemma(dest, seed=0, embed_scale=0.1):
    """Write a tiny random PaliGemma (~0.2M parameters) into ``dest``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import get_model_and_args, update_module_configs
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    table = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[],
                               unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PG_SPECIAL])
    # PaliGemma's processor adds these location/segmentation tokens itself; they are
    # in the vocabulary of every real checkpoint, so the embedding covers them
    tok.add_tokens([AddedToken(t, normalized=False) for t in PG_EXTRA])
    vocab = 256 + len(PG_SPECIAL) + len(PG_EXTRA)
    ids = {t: tok.token_to_id(t) for t in PG_SPECIAL}
    cfg = {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
        "vocab_size": vocab, "image_token_index": ids["<image>"], "hidden_size": 64,
        "projection_dim": 64, "pad_token_id": ids["<pad>"], "eos_token_id": ids["<eos>"],
        "bos_token_id": ids["<bos>"],
        "text_config": {"model_type": "gemma", "hidden_size": 64, "num_hidden_layers": 2,
                        "intermediate_size": 128, "num_attention_heads": 2,
                        "num_key_value_heads": 1, "head_dim": 32, "vocab_size": vocab,
                        "max_position_embeddings": 2048},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32,
                          "num_hidden_layers": 2, "intermediate_size": 64,
                          "num_attention_heads": 2, "patch_size": 8, "image_size": 32,
                          "projection_dim": 64},
    }
    mx.random.seed(seed)
    raw = json.loads(json.dumps(cfg))
    arch, _ = get_model_and_args(raw)
    mc = update_module_configs(arch.ModelConfig.from_dict(raw), arch, raw, ["text", "vision"])
    weights = dict(tree_flatten(arch.Model(mc).parameters()))
    for k in weights:
        if k.endswith("embed_tokens.weight"):
            weights[k] = weights[k] * embed_scale
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    (dest / "tokenizer.json").write_text(tok.to_str())
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
        "eos_token": "<eos>", "pad_token": "<pad>", "image_token": "<image>",
        "add_bos_token": True}, indent=2))
    (dest / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
        "image_seq_length": PG_IMAGE_TOKENS, "size": {"height": 32, "width": 32},
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 3}, indent=2))
    return dest


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in
                                        ("qwen2_vl", "paligemma")):
        sys.exit("usage: python tests/tinyvlm.py DIR [qwen2_vl|paligemma]")
    kind = sys.argv[2] if len(sys.argv) == 3 else "qwen2_vl"
    print((build_paligemma if kind == "paligemma" else build)(sys.argv[1]))
