"""Model catalog: what is installed, and true facts about each model.

OWNER: models helper (issue 3). Contract used by the other engines and by the
server (keep these names):

    Catalog(models_dir, hf_cache=None)
        .list() -> list[ModelInfo]        installed models, sorted by id
        .resolve(name) -> ModelInfo       case-insensitive, optional
                                          "mlx-community/" prefix and ":tag";
                                          raises engines.NotFound("model 'x' not found")
"""
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelInfo:
    id: str                    # e.g. "smollm2-135m-instruct" (lower case)
    path: Path                 # the MLX model directory (config.json, weights, tokenizer)
    family: str = ""           # e.g. "llama"
    architecture: str = ""     # e.g. "LlamaForCausalLM"
    parameter_count: int = 0   # computed from the weights
    parameter_size: str = ""   # "135M", "1.2B"
    quantization: str = ""     # "Q4_1", "Q8_0", "4bit", "F16", ...
    format: str = ""           # "gguf" (imported from GGUF) or "safetensors"
    size: int = 0              # bytes on disk
    digest: str = ""           # sha256 hex of the weights
    context_length: int = 0
    modified_at: float = 0.0   # unix seconds
    license: str = ""
    template: str = ""         # the chat template (jinja), "" if none
    capabilities: list = field(default_factory=lambda: ["completion"])  # + "vision"
    config: dict = field(default_factory=dict)  # config.json as loaded
