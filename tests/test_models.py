"""Model store (engines/catalog.py, engines/hub.py, the model handlers and CLI):
true facts in both dialects, names that only ever resolve against the installed
list, the embedded default imported once, hub pull failing fast offline."""
import hashlib
import http.client
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import engines
from engines import hub
from engines.catalog import EMBEDDED_NAME, Catalog, embedded_gguf, format_parameter_count
from engines.gguf import import_gguf, read_header

ROOT = Path(__file__).resolve().parent.parent
SMOL_FORMS = ["smollm2-135m-instruct", "SmolLM2-135M-Instruct", "mlx-community/SmolLM2-135M-Instruct",
              "MLX-Community/smollm2-135m-instruct:latest", "smollm2-135m-instruct:Q4_1",
              "  smollm2-135m-instruct  "]
HOSTILE = ["../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "http://huggingface.co/x/y",
           "https://evil.example/model.gguf", "~root", "a" * 10240, f"{EMBEDDED_NAME}/../../x",
           f"{EMBEDDED_NAME}/config.json", "..", ".", "", " ", "mlx-community/../../etc/passwd",
           "..%2f..%2fetc%2fpasswd", "nul\0byte", "C:\\Windows\\win.ini", ".digests.json",
           "mlx-community/", ":latest", "smollm2-135m-instruct/", None, 42, ["x"], {"a": 1}]


# --- fixtures ----------------------------------------------------------------------
def _tree_size(path):
    return sum(os.stat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs)


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _hf_entry(cache, repo_name, src_dir, org="mlx-community"):
    """Lay `src_dir` out the way huggingface_hub does: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{org}--{repo_name}"
    rev = hashlib.sha1(repo_name.encode()).hexdigest()
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in Path(src_dir).iterdir():
        blob = repo / "blobs" / _sha256(f)
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return repo


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """A Hugging Face cache holding a 4-bit tiny llama, a tiny vision model, a repo of
    another organisation and a broken repo. Returns (cache, expected facts)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    import tinyvlm

    base = tmp_path_factory.mktemp("hf-src")
    cache = tmp_path_factory.mktemp("hf-cache")
    args = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300,
                rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=4096)
    mx.random.seed(1)
    model = llama.Model(llama.ModelArgs(**args))
    expected_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    nn.quantize(model, group_size=32, bits=4)
    src = base / "tiny4"
    src.mkdir()
    mx.save_safetensors(str(src / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (src / "config.json").write_text(json.dumps(dict(args, architectures=["LlamaForCausalLM"],
                                                     quantization={"group_size": 32, "bits": 4})))
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (src / "README.md").write_text("---\nlicense: mit\nlibrary_name: mlx\n---\n# Tiny\n")
    _hf_entry(cache, "Tiny-Llama-4bit", src)
    vis = tinyvlm.build(base / "vision")
    _hf_entry(cache, "Tiny-Qwen2-VL", vis)
    _hf_entry(cache, "Other-Model", src, org="someone")
    broken = base / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    _hf_entry(cache, "Broken", broken)
    vis_params = sum(v.size for v in mx.load(str(vis / "model.safetensors")).values())
    return cache, {"tiny4_params": expected_params, "vision_params": vis_params, "tiny4_src": src,
                   "tiny4_size": _tree_size(src), "tiny4_digest": _sha256(src / "model.safetensors")}


@pytest.fixture(scope="module")
def catalog(models_dir, hf_cache):
    return Catalog(models_dir, hf_cache=hf_cache[0])


# --- facts -------------------------------------------------------------------------
def test_embedded_model_facts_are_true(catalog, models_dir):
    info = catalog.resolve(EMBEDDED_NAME)
    md, tensors = read_header(embedded_gguf())
    gguf_params = 0
    for dims, _ in tensors.values():
        n = 1
        for d in dims:
            n *= d
        gguf_params += n
    assert info.parameter_count == gguf_params          # the unquantized count, from the weights
    assert info.parameter_size == "135M" == format_parameter_count(gguf_params)
    assert info.quantization == "Q4_1" and info.format == "gguf"
    assert info.family == "llama" and info.architecture == "LlamaForCausalLM"
    assert info.context_length == 8192
    path = Path(models_dir) / EMBEDDED_NAME
    assert info.size == _tree_size(path)
    assert info.digest == _sha256(path / "model.safetensors")
    assert info.license == "apache-2.0"
    assert info.template == md["tokenizer.chat_template"] and "<|im_start|>" in info.template
    assert info.capabilities == ["completion"]
    assert abs(info.modified_at - max(p.stat().st_mtime for p in path.iterdir())) < 1e-3
    assert info.owned_by == "HuggingFaceTB"


def test_hf_cache_models_listed_with_true_facts(catalog, hf_cache):
    _, facts = hf_cache
    ids = [m.id for m in catalog.list()]
    assert ids == sorted(ids)
    assert set(ids) == {EMBEDDED_NAME, "tiny-llama-4bit", "tiny-qwen2-vl"}   # no other org, no broken repo
    tiny = catalog.resolve("mlx-community/Tiny-Llama-4bit")
    assert tiny.repo == "mlx-community/Tiny-Llama-4bit" and tiny.owned_by == "mlx-community"
    assert tiny.parameter_count == facts["tiny4_params"]                 # packed 4-bit counted unpacked
    assert tiny.parameter_size == format_parameter_count(facts["tiny4_params"])
    assert tiny.quantization == "4bit" and tiny.format == "safetensors" and tiny.family == "llama"
    assert tiny.size == facts["tiny4_size"] and tiny.digest == facts["tiny4_digest"]
    assert tiny.license == "mit" and tiny.context_length == 4096 and tiny.template == "{{ messages }}"
    assert tiny.capabilities == ["completion"]
    vis = catalog.resolve("tiny-qwen2-vl")
    assert vis.capabilities == ["completion", "vision"]
    assert vis.parameter_count == facts["vision_params"] and vis.quantization == "F32"
    assert vis.family == "qwen2_vl" and vis.template


def test_store_wins_over_hf_cache_for_the_same_id(hf_cache, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(hf_cache[1]["tiny4_src"], store / "Tiny-Llama-4bit")
    info = Catalog(store, hf_cache=hf_cache[0]).resolve("mlx-community/tiny-llama-4bit")
    assert info.path == store / "Tiny-Llama-4bit" and info.repo == "" and info.owned_by == "local"
    assert [m.id for m in Catalog(store, hf_cache=hf_cache[0]).list()] == ["tiny-llama-4bit", "tiny-qwen2-vl"]


def test_parameter_size_format():
    assert [format_parameter_count(n) for n in (134_515_008, 1_235_814_400, 8_030_261_248, 112_320, 999)] \
        == ["135M", "1.2B", "8B", "112K", "999"]


def test_digest_cached_by_path_size_mtime(tmp_path):
    from test_gguf import F16, tiny_llama_gguf
    tiny_llama_gguf(tmp_path / "t.gguf", F16)
    store = tmp_path / "store"
    path = import_gguf(tmp_path / "t.gguf", store, name="t")
    real = Catalog(store, hf_cache=tmp_path / "none").resolve("t").digest
    assert real == _sha256(path / "model.safetensors")
    cache = json.loads((store / ".digests.json").read_text())
    assert list(cache.values()) == [real]
    # a fresh catalog (a new process) trusts the cache while path, size and mtime hold...
    (store / ".digests.json").write_text(json.dumps({k: "f" * 64 for k in cache}))
    assert Catalog(store, hf_cache=tmp_path / "none").resolve("t").digest == "f" * 64
    # ...and hashes again when the file changes
    st = (path / "model.safetensors").stat()
    os.utime(path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert Catalog(store, hf_cache=tmp_path / "none").resolve("t").digest == real


def test_store_skips_half_written_and_foreign_entries(tmp_path):
    store = tmp_path / "store"
    (store / ".import-x-123").mkdir(parents=True)              # an import in progress
    (store / ".import-x-123" / "config.json").write_text("{}")
    (store / "notes").mkdir()                                   # not a model
    (store / "Bad Name!").mkdir()
    (store / "stray.txt").write_text("x")
    for name, config, weights in [("list-config", "[]", b""), ("bad-json", "{", b""),
                                  ("bad-weights", "{}", b"\xff" * 8 + b"{}"),
                                  ("weights-not-json", "{}", struct.pack("<Q", 2) + b"[]")]:
        (store / name).mkdir()
        (store / name / "config.json").write_text(config)
        (store / name / "model.safetensors").write_bytes(weights)
    assert Catalog(store, hf_cache=tmp_path / "none").list() == []
    assert Catalog(tmp_path / "missing", hf_cache=tmp_path / "none").list() == []


# --- names -------------------------------------------------------------------------
@pytest.mark.parametrize("name", SMOL_FORMS)
def test_name_forms_resolve(catalog, name):
    assert catalog.resolve(name).id == EMBEDDED_NAME


def test_hf_name_forms_resolve(catalog):
    for name in ["tiny-llama-4bit", "Tiny-Llama-4bit", "mlx-community/tiny-llama-4bit:latest",
                 "MLX-COMMUNITY/TINY-LLAMA-4BIT"]:
        assert catalog.resolve(name).id == "tiny-llama-4bit"
    with pytest.raises(engines.NotFound):
        catalog.resolve("someone/Other-Model")
    with pytest.raises(engines.NotFound):
        catalog.resolve("other-model")


class _Audit:
    """Records file opens, directory scans and socket use while active."""
    events = None

    @classmethod
    def hook(cls, event, args):
        if cls.events is not None and (event in ("open", "os.scandir", "os.listdir")
                                       or event.startswith("socket.")):
            cls.events.append((event, args[0] if args else None))


sys.addaudithook(_Audit.hook)


def test_hostile_names_open_nothing_outside_the_store(catalog, models_dir, hf_cache):
    catalog.list()                                      # warm (digest already cached)
    roots = [str(Path(models_dir).resolve()), str(Path(hf_cache[0]).resolve())]
    _Audit.events = []
    try:
        for name in HOSTILE:
            with pytest.raises(engines.NotFound) as err:
                catalog.resolve(name)
            assert "not found" in err.value.message and len(err.value.message) < 200
    finally:
        events, _Audit.events = _Audit.events, None
    assert any(e[0] == "os.scandir" for e in events)                  # the hook saw the listing
    assert not [e for e in events if e[0].startswith("socket.")]          # no network tried
    for event, path in events:
        if isinstance(path, int):
            continue
        real = os.path.realpath(os.fsdecode(path))
        assert any(real == r or real.startswith(r + os.sep) for r in roots), (event, path)


# --- the server: both dialects through real clients --------------------------------
@pytest.fixture
def server(start_server, models_dir, hf_cache):
    return start_server("--models-dir", str(models_dir), env={"HF_HUB_CACHE": str(hf_cache[0])})


def _req(server, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, json.loads(raw) if raw else None


def test_openai_models_endpoints(server, catalog):
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {EMBEDDED_NAME, "tiny-llama-4bit", "tiny-qwen2-vl"}
    smol = catalog.resolve(EMBEDDED_NAME)
    m = models[EMBEDDED_NAME]
    assert m.object == "model" and m.created == int(smol.modified_at) and m.owned_by == "HuggingFaceTB"
    extra = m.model_dump()
    assert extra["capabilities"] == {"completion_chat": True, "completion_fim": False,
                                     "function_calling": False, "vision": False, "fine_tuning": False}
    assert extra["name"] == EMBEDDED_NAME and "135M" in extra["description"] and "Q4_1" in extra["description"]
    assert models["tiny-qwen2-vl"].model_dump()["capabilities"]["vision"] is True
    assert models["tiny-llama-4bit"].model_dump()["aliases"] == ["mlx-community/Tiny-Llama-4bit"]
    one = client.models.retrieve("mlx-community/SmolLM2-135M-Instruct")
    assert one.id == EMBEDDED_NAME and one.model_dump() == extra
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["message"] == "model 'no-such-model' not found"
    assert err.value.body["type"] == "not_found_error"


def test_ollama_tags_show_and_errors(server, catalog, models_dir):
    import ollama
    client = ollama.Client(host=server.url)
    tags = {m.model: m for m in client.list().models}
    assert set(tags) == {EMBEDDED_NAME, "tiny-llama-4bit", "tiny-qwen2-vl"}
    smol, t = catalog.resolve(EMBEDDED_NAME), tags[EMBEDDED_NAME]
    assert t.size == _tree_size(Path(models_dir) / EMBEDDED_NAME) == smol.size
    assert t.digest == _sha256(Path(models_dir) / EMBEDDED_NAME / "model.safetensors")
    assert (t.details.format, t.details.family, t.details.parameter_size, t.details.quantization_level) \
        == ("gguf", "llama", "135M", "Q4_1")
    assert t.details.families == ["llama"]
    assert abs(t.modified_at.timestamp() - smol.modified_at) < 1.0
    assert tags["tiny-llama-4bit"].details.quantization_level == "4bit"
    show = client.show("SmolLM2-135M-Instruct:latest")
    assert show.modelinfo["general.architecture"] == "llama"
    assert show.modelinfo["llama.context_length"] == 8192
    assert show.modelinfo["general.parameter_count"] == smol.parameter_count
    assert show.template == smol.template and show.license == "apache-2.0"
    assert show.capabilities == ["completion"] and show.details.parameter_size == "135M"
    assert "num_ctx 8192" in show.parameters and "<|im_end|>" in show.parameters
    assert show.modelfile is None
    assert client.show("tiny-qwen2-vl").capabilities == ["completion", "vision"]
    with pytest.raises(ollama.ResponseError) as err:
        client.show("missing-model")
    assert err.value.status_code == 404 and err.value.error == "model 'missing-model' not found"


def test_api_show_verbose_and_name_field(server):
    status, short = _req(server, "POST", "/api/show", {"name": "smollm2-135m-instruct"})
    assert status == 200 and "modelfile" not in short and "messages" not in short
    assert set(short) >= {"license", "parameters", "template", "details", "model_info", "capabilities",
                          "modified_at"}
    status, full = _req(server, "POST", "/api/show", {"model": "smollm2-135m-instruct", "verbose": True})
    assert status == 200 and full["messages"] == []
    assert full["modelfile"].startswith("# Modelfile generated by localai\nFROM smollm2-135m-instruct\n")
    assert "PARAMETER num_ctx 8192" in full["modelfile"]
    info = full["model_info"]
    assert info["llama.embedding_length"] == 576 and info["llama.block_count"] == 30
    assert info["llama.attention.head_count"] == 9 and info["llama.attention.head_count_kv"] == 3
    assert info["llama.vocab_size"] == 49152 and set(short["model_info"]) < set(info)
    assert _req(server, "POST", "/api/show", {}) == (400, {"error": "'model' is required"})
    assert _req(server, "POST", "/api/show", {"model": 5})[0] == 400
    assert _req(server, "POST", "/api/show", {"model": "x", "verbose": "yes"})[0] == 400
    assert _req(server, "POST", "/api/show", b"not json")[0] == 400


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "http://huggingface.co/x/y",
                                  "a" * 10240, "mlx-community/../../etc/passwd"])
def test_hostile_names_over_http(server, name):
    status, body = _req(server, "POST", "/api/show", {"model": name})
    assert status == 404 and body["error"].startswith("model '") and body["error"].endswith("' not found")
    assert "root:" not in json.dumps(body)
    from urllib.parse import quote
    if len(name) < 1000:
        for path in ("/v1/models/" + quote(name, safe=""), "/v1/models/" + name.lstrip("/")):
            status, body = _req(server, "GET", path)
            assert status == 404 and body["error"]["type"] == "not_found_error", path


def test_api_ps_lists_loaded_models(server, catalog):
    assert _req(server, "GET", "/api/ps") == (200, {"models": []})
    t0 = time.time()
    status, body = _req(server, "POST", "/api/generate",
                        {"model": EMBEDDED_NAME, "prompt": "Hi", "stream": False, "keep_alive": "5m",
                         "options": {"num_predict": 2}})
    if status == 501:
        pytest.skip("/api/generate is not implemented yet")
    assert status == 200, body
    status, ps = _req(server, "GET", "/api/ps")
    assert status == 200 and [m["model"] for m in ps["models"]] == [EMBEDDED_NAME]
    m, smol = ps["models"][0], catalog.resolve(EMBEDDED_NAME)
    assert m["name"] == EMBEDDED_NAME and m["digest"] == smol.digest
    # memory of the loaded weights: as stored, or widened to float16/float32 by the engine
    assert m["size"] == smol.size or any(abs(m["size"] - smol.parameter_count * w) < 0.05 * smol.parameter_count * w
                                         for w in (2, 4)), m["size"]
    assert m["size_vram"] == 0
    assert m["details"]["parameter_size"] == "135M" and m["context_length"] == 8192
    expires = time.mktime(time.strptime(m["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert t0 + 240 < expires < time.time() + 301


# --- the embedded default on first start -------------------------------------------
def test_first_start_imports_default_once(start_server, tmp_path):
    store = tmp_path / "fresh-store"
    env = {"LOCALAI_MODELS_DIR": str(store), "LOCALAI_NO_AUTO_IMPORT": "0",
           "HF_HUB_CACHE": str(tmp_path / "no-hf")}
    first = start_server(env=env)
    assert "importing the embedded default smollm2-135m-instruct" in first.output()
    assert "100%" in first.output()
    status, tags = _req(first, "GET", "/api/tags")
    assert status == 200 and [m["name"] for m in tags["models"]] == [EMBEDDED_NAME]
    weights = store / EMBEDDED_NAME / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    # The import ran MLX before any request: it must not have bound MLX to the wheel's
    # slow reference BLAS for the whole run (the banner says what the engine chose).
    deadline = time.time() + 60
    while "language engine:" not in first.output() and time.time() < deadline:
        time.sleep(0.1)
    engine_line = next(l for l in first.output().splitlines() if "language engine:" in l)
    if Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0").exists():
        assert "OpenBLAS" in engine_line, first.output()
    assert "imported before configure" not in first.output()
    first.stop()
    second = start_server(env=env)
    assert "importing" not in second.output()
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".digests")) == [EMBEDDED_NAME]
    assert [m["name"] for m in _req(second, "GET", "/api/tags")[1]["models"]] == [EMBEDDED_NAME]


def test_concurrent_first_starts_import_once(tmp_path):
    import threading
    from engines.catalog import ensure_default
    store, results, errors = tmp_path / "store", [], []

    def run():
        try:
            results.append(ensure_default(store))
        except Exception as e:          # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sum(r is not None for r in results) >= 1
    assert sorted(p.name for p in store.iterdir()) in ([EMBEDDED_NAME], [".digests.json", EMBEDDED_NAME])
    assert ensure_default(store) is None                               # installed: nothing to do


def test_no_auto_import_when_a_model_exists(start_server, tmp_path, hf_cache):
    store = tmp_path / "store"
    s = start_server(env={"LOCALAI_MODELS_DIR": str(store), "LOCALAI_NO_AUTO_IMPORT": "0",
                          "HF_HUB_CACHE": str(hf_cache[0])})
    assert "importing" not in s.output() and not (store / EMBEDDED_NAME).exists()


# --- CLI: list, pull ---------------------------------------------------------------
def _cli(*args, env=None, timeout=60):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "localai.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=e)


def test_cli_list_table(models_dir, hf_cache, tmp_path):
    r = _cli("--models-dir", str(models_dir), "list", env={"HF_HUB_CACHE": str(hf_cache[0])})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "PARAMS", "QUANT", "FORMAT", "CONTEXT", "SIZE",
                                "MODIFIED", "DIGEST"]
    row = next(line.split() for line in lines if line.startswith(EMBEDDED_NAME + " "))
    assert row[1:6] == ["llama", "135M", "Q4_1", "gguf", "8192"]
    assert any(line.startswith("tiny-llama-4bit ") and " 4bit " in line for line in lines)
    r = _cli("--models-dir", str(tmp_path / "empty"), "list", env={"HF_HUB_CACHE": str(tmp_path / "x")})
    assert r.returncode == 0 and "no models installed" in r.stdout


def test_cli_pull_fails_fast_offline(tmp_path):
    store = tmp_path / "store"
    t0 = time.monotonic()
    r = _cli("--models-dir", str(store), "pull", "mlx-community/SmolLM2-360M-Instruct-4bit",
             env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "offline" in r.stderr and "Traceback" not in r.stderr
    # not flagged offline, but the hub does not answer (a closed local port): same, at once
    r = _cli("--models-dir", str(store), "pull", "SmolLM2-360M-Instruct-4bit",
             env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 1 and "not reachable" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30
    r = _cli("--models-dir", str(store), "pull", "../../etc")
    assert r.returncode == 1 and "invalid repository name" in r.stderr
    assert not store.exists() or [p for p in store.iterdir() if p.name != ".digests.json"] == []


class _FakeHub:
    """Just enough of the Hugging Face hub API for huggingface_hub.snapshot_download:
    revision info, the file tree, HEAD/GET of files (ETag, X-Repo-Commit)."""

    def __init__(self, repo, src, slow=0.0):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        files = {p.name: p.read_bytes() for p in Path(src).iterdir()}
        sha = hashlib.sha1(repo.encode()).hexdigest()
        self.requests = []
        self.weights_requested = threading.Event()
        self.weights_completed = False
        hub_self = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                hub_self.requests.append((self.command, self.path))

            def do_HEAD(self):
                self.reply(head=True)

            def do_GET(self):
                self.reply(head=False)

            def reply(self, head):
                body, headers = None, {}
                if self.path.startswith(f"/api/models/{repo}/revision/"):
                    body = json.dumps({"id": repo, "sha": sha,
                                       "siblings": [{"rfilename": n} for n in files]}).encode()
                elif self.path.startswith(f"/api/models/{repo}/tree/"):
                    body = json.dumps([{"type": "file", "path": n, "size": len(d),
                                        "oid": hashlib.sha1(d).hexdigest()} for n, d in files.items()]).encode()
                elif self.path.startswith(f"/{repo}/resolve/"):
                    body = files.get(self.path.rsplit("/", 1)[1])
                    headers = {"X-Repo-Commit": sha, "ETag": '"%s"' % hashlib.sha256(body or b"").hexdigest()}
                if self.path.startswith("/api/models/mlx-community/Gated-Model/"):
                    self.send_response(403)
                    self.send_header("X-Error-Code", "GatedRepo")
                    self.send_header("X-Error-Message", "Access to model is restricted")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if body is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                if slow and self.path.endswith(".safetensors"):   # a long download
                    hub_self.weights_requested.set()
                    step = max(1, len(body) // 20)
                    try:
                        for i in range(0, len(body), step):
                            self.wfile.write(body[i:i + step])
                            self.wfile.flush()
                            time.sleep(slow)
                        hub_self.weights_completed = True
                    except OSError:
                        pass                  # the client went away
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_cli_pull_from_a_hub(hf_cache, tmp_path):
    """The real pull path (huggingface_hub, progress bar, atomic rename) against a
    local stand-in for the hub, since the real one is unreachable here."""
    facts = hf_cache[1]
    fake = _FakeHub("mlx-community/Tiny-Pulled-4bit", facts["tiny4_src"])
    store = tmp_path / "store"
    env = {"HF_ENDPOINT": fake.url, "HF_HUB_OFFLINE": "", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        r = _cli("--models-dir", str(store), "pull", "mlx-community/Tiny-Pulled-4bit", env=env)
        assert r.returncode == 0, r.stderr
        assert "pulled tiny-pulled-4bit" in r.stdout and "100%" in r.stderr
        assert any(m == "GET" and p.endswith("/model.safetensors") for m, p in fake.requests)
        info = Catalog(store, hf_cache=tmp_path / "hf").resolve("mlx-community/tiny-pulled-4bit:latest")
        assert info.repo == "mlx-community/Tiny-Pulled-4bit" and info.owned_by == "mlx-community"
        assert info.digest == facts["tiny4_digest"] and info.size == facts["tiny4_size"]
        assert info.quantization == "4bit" and info.license == "mit"
        r = _cli("--models-dir", str(store), "pull", "Tiny-Pulled-4bit", env=env)
        assert r.returncode == 1 and "already installed" in r.stderr
        r = _cli("--models-dir", str(store), "pull", "mlx-community/No-Such-Repo", env=env)
        assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
        r = _cli("--models-dir", str(store), "pull", "mlx-community/Gated-Model", env=env)
        assert r.returncode == 1 and "gated" in r.stderr and "Traceback" not in r.stderr
    finally:
        fake.close()
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".digests")) == ["tiny-pulled-4bit"]


def test_pull_stops_when_cancelled(hf_cache, tmp_path, monkeypatch):
    # huggingface_hub reports progress every 10 MB: a 25 MB file sent over 2 s
    src = tmp_path / "big"
    src.mkdir()
    shutil.copy(hf_cache[1]["tiny4_src"] / "config.json", src)
    (src / "model.safetensors").write_bytes(bytes(25 << 20))
    fake = _FakeHub("mlx-community/Tiny-Pulled-4bit", src, slow=0.1)
    for k, v in {"HF_ENDPOINT": fake.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)            # read once, at import
    cancel, store, errors = threading.Event(), tmp_path / "store", []

    def run():
        try:
            hub.pull("mlx-community/Tiny-Pulled-4bit", store, progress=False, cancel=cancel)
        except engines.EngineError as e:
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    try:
        assert fake.weights_requested.wait(30)
        cancel.set()
        t.join(30)
    finally:
        fake.close()
    assert not t.is_alive()
    assert not fake.weights_completed                                 # stopped mid-download
    assert [e.message for e in errors] == ["pull cancelled"]
    assert [p.name for p in store.iterdir()] == []                  # nothing half-written


def test_api_pull_offline_and_from_a_hub(start_server, hf_cache, tmp_path):
    import ollama
    store = tmp_path / "store"
    offline = start_server(env={"LOCALAI_MODELS_DIR": str(store), "HF_HUB_OFFLINE": "1",
                                "LOCALAI_NO_AUTO_IMPORT": "1"})
    client = ollama.Client(host=offline.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("mlx-community/Tiny-Pulled-4bit")
    assert err.value.status_code == 503 and "offline" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("../../etc")
    assert err.value.status_code == 400
    # streaming: the failure arrives in-band after the first status line
    conn = http.client.HTTPConnection("127.0.0.1", offline.port, timeout=30)
    conn.request("POST", "/api/pull", body=json.dumps({"model": "x", "stream": True}))
    r = conn.getresponse()
    lines = [json.loads(line) for line in r.read().splitlines()]
    conn.close()
    assert r.status == 200 and lines[0] == {"status": "pulling x"} and "offline" in lines[-1]["error"]
    offline.stop()
    fake = _FakeHub("mlx-community/Tiny-Pulled-4bit", hf_cache[1]["tiny4_src"])
    try:
        online = start_server(env={"LOCALAI_MODELS_DIR": str(store), "HF_HUB_OFFLINE": "",
                                   "HF_ENDPOINT": fake.url, "HF_HUB_DISABLE_XET": "1",
                                   "HF_HUB_CACHE": str(tmp_path / "hf"), "LOCALAI_NO_AUTO_IMPORT": "1"})
        client = ollama.Client(host=online.url)
        assert [r.status for r in client.pull("Tiny-Pulled-4bit", stream=True)] == \
            ["pulling Tiny-Pulled-4bit", "success"]
        assert [m.model for m in client.list().models] == ["tiny-pulled-4bit"]
        assert client.show("tiny-pulled-4bit").details.quantization_level == "4bit"
    finally:
        fake.close()


def test_hub_names():
    assert hub.parse_repo("Llama-3.2-1B-Instruct-4bit") == ("mlx-community/Llama-3.2-1B-Instruct-4bit",
                                                           "llama-3.2-1b-instruct-4bit")
    for bad in ["", "a/b/c", "../x", "http://x/y", "x/" + "y" * 200, None]:
        with pytest.raises(engines.BadInput):
            hub.parse_repo(bad)
