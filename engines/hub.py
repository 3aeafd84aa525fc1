"""Pull MLX models from the Hugging Face hub into the model store.

    pull(repo, models_dir, progress=True, cancel=None) -> Path

`repo` is "owner/name" (a bare name means "mlx-community/name"). The files an MLX
model needs (config, safetensors weights, tokenizer files, model card) are
downloaded with huggingface_hub (its progress bars on the terminal) into a hidden
temporary directory in the store, checked to be an MLX model directory, and renamed
to ``models_dir/<name lower-cased>``; on any failure nothing is left behind.

Offline it fails fast: HF_HUB_OFFLINE set, or the hub host not reachable within
CONNECT_TIMEOUT, raise engines.Unavailable with a clear message before any
download starts. No HTTP server code here.
"""
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from . import BadInput, NotFound, Unavailable
from .catalog import SOURCE_FILE
from .gguf import check_name

CONNECT_TIMEOUT = 5.0      # seconds to reach the hub before calling it offline
ETAG_TIMEOUT = 10          # huggingface_hub's metadata request timeout (seconds)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model",
                  "*.tiktoken", "README.md", "LICENSE*"]
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class _Cancelled(Exception):
    """Raised from the progress callback to stop a download (see pull)."""


def parse_repo(repo):
    """'mlx-community/X' or 'X' -> ('mlx-community/X', 'x'). BadInput otherwise."""
    if not isinstance(repo, str):
        raise BadInput("repository must be a string", param="model")
    repo = repo.strip()
    if "/" not in repo:
        repo = "mlx-community/" + repo
    if not _REPO_RE.match(repo) or ".." in repo:
        raise BadInput(f"invalid repository name {repo[:100]!r} (expected owner/name)",
                       param="model")
    return repo, check_name(repo.split("/", 1)[1].lower())


def hub_endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_online():
    """Raise Unavailable at once when the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False"):
        raise Unavailable("cannot pull: offline mode (HF_HUB_OFFLINE is set)")
    url = urlsplit(hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise Unavailable(f"cannot pull: the Hugging Face hub ({host}) is not "
                          f"reachable ({reason}); are you offline?") from None


def _hub_error(e, repo):
    """A huggingface_hub exception as an engine error with a message for people."""
    try:
        from huggingface_hub import errors
    except ImportError:           # older huggingface_hub: judge by the class name
        errors = None
    if errors is not None and isinstance(e, errors.GatedRepoError):
        return Unavailable(f"cannot pull {repo}: the repository is gated (accept its "
                           "terms on the hub and log in with `hf auth login`)")
    if (errors is not None and isinstance(e, (errors.RepositoryNotFoundError,
                                              errors.RevisionNotFoundError))) \
            or "NotFound" in type(e).__name__:
        return NotFound(f"repository '{repo}' not found on the hub")
    return Unavailable(f"cannot pull {repo}: {type(e).__name__}")


def pull(repo, models_dir, progress=True, cancel=None):
    """Download `repo` into the store; returns the model directory."""
    repo, name = parse_repo(repo)
    models_dir = Path(models_dir).expanduser()
    final = models_dir / name
    if final.exists():
        raise BadInput(f"model '{name}' is already installed", param="model")
    check_online()
    try:
        import huggingface_hub
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
        from huggingface_hub.utils import tqdm as hf_tqdm
    except ImportError:
        raise Unavailable("cannot pull: huggingface_hub is not installed "
                          "(pip install huggingface_hub)") from None
    if cancel is not None and cancel.is_set():
        raise Unavailable("pull cancelled")

    class CancellableTqdm(hf_tqdm):
        """huggingface_hub reports every downloaded chunk through its progress bar
        class: the one place a download can be stopped between chunks."""

        def update(self, n=1):
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            return super().update(n)

    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=models_dir))
    try:
        (enable_progress_bars if progress else disable_progress_bars)()
        try:
            huggingface_hub.snapshot_download(
                repo_id=repo, local_dir=str(tmp), allow_patterns=ALLOW_PATTERNS,
                etag_timeout=ETAG_TIMEOUT, tqdm_class=CancellableTqdm,
                endpoint=hub_endpoint())      # the endpoint check_online probed
        except Exception as e:   # the hub library's errors have many classes
            if cancel is not None and cancel.is_set():
                raise Unavailable("pull cancelled") from None
            raise _hub_error(e, repo) from None
        shutil.rmtree(tmp / ".cache", ignore_errors=True)   # hub bookkeeping
        (tmp / SOURCE_FILE).write_text(json.dumps({"repo": repo}))
        if not (tmp / "config.json").is_file() or not list(tmp.glob("model*.safetensors")):
            raise BadInput(f"'{repo}' is not an MLX model repository (no config.json and "
                           "model*.safetensors); for a GGUF file use: localai.py import FILE.gguf")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
