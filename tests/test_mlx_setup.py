"""engines/mlx_setup.py: the BLAS MLX calls and the dtype weights run in, with outputs
unchanged. configure() must run before mlx is first imported, so every check runs in
a fresh interpreter (a subprocess) and reports JSON back."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")


def run_py(code, env=None, timeout=300):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


SHIM_CHECK = r"""
import json, numpy as np
from engines import mlx_setup as ms
ms.configure()
import mlx.core as mx
rng = np.random.default_rng(0)
errs = []
c0 = ms.blas_calls()
# Shapes the shim routes differently: one row (sgemv, both layouts of B), 2..4 rows
# (single-pass kernel, K not a multiple of the vector width, odd N), more rows (sgemm).
for M, N, K in [(1, 1000, 576), (1, 37, 19), (2, 1001, 576), (3, 64, 17), (4, 1536, 577),
                (4, 5, 1), (5, 300, 64), (8, 49, 576), (6, 3001, 100),
                (2, 50, 64), (3, 100, 64), (4, 129, 64),      # attention's scores (K 64)
                (8, 2049, 576), (9, 700, 576), (64, 96, 200)]:
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    ref = a.astype(np.float64) @ w.T.astype(np.float64)
    A, W = mx.array(a), mx.array(w)
    e1 = float(np.abs(np.array(A @ W.T) - ref).max() / (np.abs(ref).max() + 1e-9))
    e2 = float(np.abs(np.array(A @ mx.contiguous(W.T)) - ref).max() / (np.abs(ref).max() + 1e-9))
    e3 = float(np.abs(np.array(mx.addmm(mx.ones((M, N)), A, W.T, alpha=0.5, beta=2.0))
                      - (0.5 * ref + 2.0)).max() / (np.abs(ref).max() + 1e-9))
    e4 = float(np.abs(np.array(mx.addmm(mx.ones((M, N)), A, mx.contiguous(W.T), alpha=0.5,
                                        beta=2.0)) - (0.5 * ref + 2.0)).max()
               / (np.abs(ref).max() + 1e-9))
    errs.append(max(e1, e2, e3, e4))
# Two threads on two MLX streams multiply at once: the shim's shared helper must
# never mix their jobs.
import threading
a = rng.standard_normal((4, 576)).astype(np.float32)
w = rng.standard_normal((2049, 576)).astype(np.float32)
ref = a.astype(np.float64) @ w.T.astype(np.float64)
A, W = mx.array(a), mx.array(w)
def hammer(out):
    s = mx.new_stream(mx.cpu)
    with mx.stream(s):
        for i in range(30):
            out.append(float(np.abs(np.array((A * (i + 1)) @ W.T) / (i + 1) - ref).max()))
res = [[], []]
ths = [threading.Thread(target=hammer, args=(r,)) for r in res]
for t in ths: t.start()
for t in ths: t.join()
errs.append(max(res[0] + res[1]) / np.abs(ref).max())
# Which library answers `cblas_sgemm` in the global scope (where MLX's lookup lands):
# dlsym(RTLD_DEFAULT) then dladdr names the file. No timing involved.
import ctypes
class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]
libc = ctypes.CDLL(None)
libc.dlsym.restype = ctypes.c_void_p
libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
addr = libc.dlsym(None, b"cblas_sgemm")
info = DlInfo()
libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info))
print(json.dumps({"describe": ms.describe(), "before": c0, "after": ms.blas_calls(),
                  "sgemm_owner": (info.fname or b"none in the global scope").decode(),
                  "max_rel_err": max(errs), "threaded_runs": len(res[0]) + len(res[1])}))
"""


@pytest.mark.skipif(not OPENBLAS.exists(), reason="Debian libopenblas0-pthread not installed")
def test_configure_routes_mlx_matmuls_through_openblas_and_shim(tmp_path):
    # Two threads forced, so the helper thread's shared path is the one checked.
    out = run_py(SHIM_CHECK, env={"LOCALAI_CACHE_DIR": str(tmp_path),
                                  "LOCALAI_BLAS_THREADS": "2"})
    d = out["describe"]
    assert d["blas_threads"] == 2
    assert d["device"] == "cpu"
    assert "OpenBLAS" in d["blas"], d
    # The global cblas_sgemm (the one MLX's lookup reaches) is the shim's or OpenBLAS's,
    # not the wheel's reference BLAS. (Speed is for bench/llm_bench.py, not a test.)
    owner = Path(out["sgemm_owner"]).name
    assert owner.startswith("libblasshim-" if d["shim"] else "libopenblas"), out["sgemm_owner"]
    assert out["max_rel_err"] < 1e-5
    assert out["threaded_runs"] == 60
    if d["shim"]:
        before, after = out["before"], out["after"]
        assert after[0] > before[0]          # MLX's cblas_sgemm calls reach the shim
        assert after[1] > before[1]          # one-row products went to sgemv
        assert after[2] > before[2]          # 2..4-row products to the small kernel
        assert d["shim_helpers"] == 1
        assert list(tmp_path.glob("mlx_setup/libblasshim-*.so"))


def test_busy_machine_measure():
    from engines.mlx_setup import _others_cpu_use
    busy = _others_cpu_use(0.05)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 0.5


def test_blas_off_leaves_mlx_alone():
    out = run_py("import json\nfrom engines import mlx_setup as ms\nms.configure()\n"
                 "import mlx.core as mx\nprint(json.dumps(ms.describe()))",
                 env={"LOCALAI_MLX_BLAS": "off"})
    assert out["blas"] == "mlx default" and out["shim"] is False
    assert any("disabled" in r for r in out["reasons"])


def test_parse_size():
    from engines.mlx_setup import parse_size
    assert parse_size("123") == 123
    assert parse_size("512M") == 512 << 20
    assert parse_size("4G") == 4 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("2GB") == 2 << 30
    assert parse_size("0") == 0


SAME_OUTPUT = r"""
import json, sys
from pathlib import Path
from engines import mlx_setup as ms
ms.configure()
import mlx.core as mx
from mlx_lm.utils import load_model
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.models.cache import make_prompt_cache

path = Path(sys.argv[1])
tok = load_tokenizer(path)
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                              add_generation_prompt=True, tokenize=True)

def run(model, n=24):
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)[0].astype(mx.float32)
    mx.eval(logits)
    out = []
    y = logits[-1].argmax()
    for _ in range(n):
        t = y.item()
        out.append(t)
        if t in tok.eos_token_ids:
            break
        y = model(mx.array([[t]]), cache=cache)[0, -1].argmax()
    return logits, out

plain, _ = load_model(path)
ref_logits, ref_ids = run(plain)
del plain
fast, _ = load_model(path)
fast = ms.prepare(fast)
got_logits, got_ids = run(fast)
diff = float(mx.abs(got_logits - ref_logits).max())
scale = float(mx.abs(ref_logits).max())
agree = float((got_logits.argmax(-1) == ref_logits.argmax(-1)).astype(mx.float32).mean())
print(json.dumps({"describe": ms.describe(fast), "diff": diff, "scale": scale,
                  "argmax_agree": agree, "ref": tok.decode(ref_ids), "got": tok.decode(got_ids),
                  "ref_ids": ref_ids, "got_ids": got_ids}))
"""


def test_prepared_model_gives_the_same_output(models_dir, tmp_path):
    path = next(p for p in Path(models_dir).iterdir() if (p / "config.json").is_file())
    code = SAME_OUTPUT.replace("sys.argv[1]", repr(str(path)))
    out = run_py(code, env={"LOCALAI_CACHE_DIR": str(tmp_path)})
    d = out["describe"]
    assert d["device"] == "cpu" and d["dtype"] == "float32", d
    assert d["weights_bytes"] == d["float32_bytes"]
    assert any("float32" in r for r in d["reasons"])
    # Greedy text identical; logits within float16 rounding of the quantized model's
    # (it computes in float16: its scales are float16).
    assert out["got_ids"] == out["ref_ids"], (out["ref"], out["got"])
    assert "Paris" in out["got"]
    assert out["diff"] <= 0.02 * out["scale"], out
    assert out["argmax_agree"] >= 0.95


def test_memory_budget_keeps_quantized_weights(models_dir, tmp_path):
    path = next(p for p in Path(models_dir).iterdir() if (p / "config.json").is_file())
    code = ("import json\nfrom pathlib import Path\nfrom engines import mlx_setup as ms\n"
            "ms.configure()\nfrom mlx_lm.utils import load_model\n"
            f"m, _ = load_model(Path({str(path)!r}))\nm = ms.prepare(m)\n"
            "import mlx.core as mx\n"
            "y = m(mx.array([[1, 2, 3]]))\nmx.eval(y)\n"
            "print(json.dumps(ms.describe(m)))")
    d = run_py(code, env={"LOCALAI_MLX_MEMORY_BUDGET": "100M",
                          "LOCALAI_CACHE_DIR": str(tmp_path)})
    assert "quantized" in d["dtype"], d
    assert d["memory_budget"] == 100 << 20
    assert any("over the memory budget" in r for r in d["reasons"]), d


def test_shim_cache_must_be_private(tmp_path):
    """The shim is code we load: a directory or file others can write (say one made
    in /tmp by another user) is never used."""
    from engines.mlx_setup import _private
    d = tmp_path / "mine"
    d.mkdir(mode=0o700)
    assert _private(d)
    d.chmod(0o777)
    assert not _private(d)
    f = tmp_path / "lib.so"
    f.write_bytes(b"x")
    f.chmod(0o755)
    assert _private(f)
    f.chmod(0o666)
    assert not _private(f)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "mine")
    assert not _private(link)


def test_allocator_env():
    from engines import mlx_setup as ms
    lib = ms.find_jemalloc()
    if lib is None:
        pytest.skip("libjemalloc2 is not installed")
    env = ms.allocator_env({"PATH": "/bin", "LD_PRELOAD": "/x/libother.so"})
    assert env["LD_PRELOAD"] == lib + " /x/libother.so" and env["PATH"] == "/bin"
    # once: never a second restart, nor against the operator's choice or preload
    for given in ({"LOCALAI_MALLOC_RESTARTED": "1"}, {"LOCALAI_MALLOC": "system"},
                  {"LD_PRELOAD": "/opt/libjemalloc.so"}):
        assert ms.allocator_env(given) is None, given


def test_server_restarts_itself_on_jemalloc(start_server):
    """The server's own process (same pid: it execs itself) has jemalloc as its malloc
    and says so; LOCALAI_MALLOC=system keeps the system's. Both serve."""
    from engines import mlx_setup as ms
    if ms.find_jemalloc() is None:
        pytest.skip("libjemalloc2 is not installed")
    import http.client
    for env, want in (({"LD_PRELOAD": ""}, True),
                      ({"LD_PRELOAD": "", "LOCALAI_MALLOC": "system"}, False)):
        server = start_server(env=env)
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert ("libjemalloc" in maps) is want, env
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", "/api/version")
        assert conn.getresponse().status == 200
        server.stop()


KERNELS = r"""
import json, sys, numpy as np
from engines import mlx_setup
mlx_setup.configure()
import mlx.core as mx, mlx.nn as nn
rng = np.random.default_rng(0)
g = mx.array(rng.standard_normal((4, 3072)).astype(np.float32) * 6)
s = mx.array(rng.standard_normal((4, 3, 3, 100)).astype(np.float32) * 30)
silu = mx.compile(lambda g, u: nn.silu(g) * u)
exp_minus = mx.compile(lambda x, m: mx.exp(x - m), shapeless=True)
gelu = mx.compile(nn.gelu)
norm = mx.compile(lambda x, w: mx.fast.rms_norm(x, w, 1e-5))
outs = [silu(g[:, :1536], g[:, 1536:]), silu(g[:, 1536:] * 1, g[:, :1536] * 1),
        exp_minus(s, mx.max(s, axis=-1, keepdims=True)), gelu(g),
        norm(g, g[0] * 0.1), norm(g[:, :576], g[1, :576])]
np.save(sys.argv[1], np.concatenate([np.array(o).ravel() for o in outs]))
print(json.dumps({"reasons": mlx_setup.describe()["reasons"]}))
"""


def test_jit_flags_change_no_value(tmp_path):
    """mx.compile's kernels built through our g++ wrapper (-march=native, inlined and
    vectorized exp and sqrt) give the same bits as MLX's own build of them (no wrapper: the
    BLAS setup off). Separate temp directories: MLX caches kernels by name."""
    outs = {}
    plain_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                 if "jit-bin" not in p)
    for name, env in (("ours", {}), ("mlx", {"LOCALAI_MLX_BLAS": "off", "PATH": plain_path})):
        tmp = tmp_path / name
        tmp.mkdir()
        out = tmp / "out.npy"
        res = run_py(KERNELS.replace("sys.argv[1]", repr(str(out))), env={"TMPDIR": str(tmp), **env})
        outs[name] = (np.load(out), res["reasons"])
    assert any("vectorized exp" in r for r in outs["ours"][1])
    assert not any("vectorized exp" in r for r in outs["mlx"][1])
    assert outs["ours"][0].tobytes() == outs["mlx"][0].tobytes()
