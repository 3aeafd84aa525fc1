"""Language models through mlx-lm: one thread owns MLX.

OWNER: llm helper (issue 4). The neutral request/answer types below are shared with
engines/vlm.py (which offers the same generate() for vision models) and the server's
chat/completion handlers; keep their names.
"""
from dataclasses import dataclass, field
from typing import Optional


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


def generate(req: GenRequest, cancel=None):
    """Blocking iterator of Chunk; the last has done=True. Raises engines errors."""
    raise NotImplementedError
