"""engines/mlx_setup.register_quantized: the BLAS shim serves `x @ w32.T` (x of up to
max_rows rows, w32 or a view of its rows) from the quantized twin of a registered
float32 matrix, with the same results.
configure() must run before mlx is imported, so the checks run in fresh interpreters
(subprocesses) and report JSON back."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.test_mlx_setup import OPENBLAS, run_py


CHECK = r"""
import ctypes, json, os, threading
import numpy as np
from engines import mlx_setup as ms
ms.configure()
import mlx.core as mx
out = {"describe": ms.describe()}
if ms.quantized_calls() is None:
    out["skip"] = "no BLAS shim: " + "; ".join(ms.describe()["reasons"])
    print(json.dumps(out)); raise SystemExit
rng = np.random.default_rng(0)
calls = lambda: ms.quantized_calls()["calls"]

def make(n, k, bits, gs, dtype):
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32)).astype(dtype)
    q, s, b = mx.quantize(w, group_size=gs, bits=bits)
    # the exact float32 values of the quantized weights (float32 scale arithmetic)
    w32 = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=gs,
                        bits=bits)
    # MLX's own dequantize with half scales rounds every value to the half type
    w_half = mx.dequantize(q, s, b, group_size=gs, bits=bits, dtype=mx.float32)
    mx.eval(w32, w_half)
    return w32, w_half, (q, s, b, bits, gs)

def rel(got, ref):
    got, ref = np.array(got, dtype=np.float64), np.array(ref, dtype=np.float64)
    return float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-30))

# 1. every form: bits x group size x scale dtype, M = 1..8 (4-row passes) and 16, 21,
#    37 (without AVX-512: whole tiles of 16 rows packed, the rest in passes), N odd (no
#    whole blocks, a last strip of 1 weight row), one size big enough to be split with
#    the helper thread; plain, alpha, beta.
err, err_half, products, missed = 0.0, 0.0, 0, 0
ROWS = (*range(1, 9), 16, 21, 37)
for bits in (4, 8):
    for gs in (32, 64, 128):
        for dt, (n, k) in ((mx.float32, (37, 256)), (mx.float16, (1001, 128)),
                           (mx.bfloat16, (77, 384))):
            w32, w_half, quant = make(n, k, bits, gs, dt)
            assert ms.register_quantized(w32, *quant), (bits, gs, dt)
            for m in ROWS:
                x = mx.array(rng.standard_normal((m, k)).astype(np.float32))
                c = mx.array(rng.standard_normal((m, n)).astype(np.float32))
                ref = np.array(x, np.float64) @ np.array(w32, np.float64).T
                c0 = calls()
                y = x @ w32.T
                z = mx.addmm(c, x, w32.T, alpha=0.5, beta=2.0)
                mx.eval(y, z)
                products += 2
                missed += 2 - (calls() - c0)
                err = max(err, rel(y, ref), rel(z, 0.5 * ref + 2.0 * np.array(c)))
                if dt != mx.float32:
                    err_half = max(err_half, rel(y, np.array(x) @ np.array(w_half).T))
            assert ms.unregister(w32)
# tiny matrices: one row alone, one pair, a pair and a lone row (the layouts take
# weight rows in pairs or blocks); registering the same matrix twice replaces its twin.
for n in (1, 2, 3):
    for bits in (4, 8):
        w32, _, quant = make(n, 128, bits, 32, mx.float16)
        assert ms.register_quantized(w32, *quant) and ms.register_quantized(w32, *quant)
        products += 8
        for m in range(1, 9):
            x = mx.array(rng.standard_normal((m, 128)).astype(np.float32))
            c0 = calls()
            y = x @ w32.T
            mx.eval(y)
            missed += 1 - (calls() - c0)
            err = max(err, rel(y, np.array(x, np.float64) @ np.array(w32, np.float64).T))
        out.setdefault("tiny_registered", []).append(ms.quantized_calls()["matrices"])
        assert ms.unregister(w32)
out.update(max_rel_err=err, max_rel_err_vs_half_dequantize=err_half,
           products=products, missed=missed)

# 2. prompts' row counts up to max_rows take the twin, one more the float32 path;
#    views of rows of the matrix take the twin where the rows start on a block of 16
#    (the layouts group rows in pairs or blocks) and do not end inside one; another K
#    on the same buffer, and everything after unregister, the float32 path. Same
#    values throughout.
w32, _, quant = make(301, 128, 4, 32, mx.float32)
assert ms.register_quantized(w32, *quant)
top = ms.quantized_calls()["max_rows"]
out["max_rows"] = top
f64 = lambda a: np.array(a, np.float64)
def product(x, w):
    c0 = calls(); y = x @ w.T; mx.eval(y)
    return [calls() - c0, rel(y, f64(x) @ f64(w).T)]
xs = {m: mx.array(rng.standard_normal((m, 128)).astype(np.float32))
      for m in (3, 9, 33, top, top + 1)}
out["rows"] = {str(m): product(x, w32) for m, x in xs.items()}
x3 = xs[3]
y3 = x3 @ w32.T; mx.eval(y3)
out["views"] = {f"{a}:{b}": product(x3, w32[a:b])
                for a, b in ((0, 160), (96, 256), (160, 301), (288, 301),  # twin
                             (101, 201), (0, 151), (99, 101))}              # not
flat = w32.reshape(-1)[: 150 * 256].reshape(150, 256)  # same buffer, other K
out["other_k"] = product(mx.array(rng.standard_normal((3, 256)).astype(np.float32)), flat)
out["registered"] = ms.quantized_calls()
out["vector_floats"] = int(ms._shim.localai_blas_count(8))  # the layout's VW
out["openblas_coretype"] = os.environ.get("OPENBLAS_CORETYPE")
out["unregister"] = [ms.unregister(w32), ms.unregister(w32)]
c0 = calls(); y3b = x3 @ w32.T; mx.eval(y3b); out["calls_after_unregister"] = calls() - c0
out["after_unregister_rel"] = rel(y3b, y3)
out["empty"] = ms.quantized_calls()

# 3. batched decode shapes (rows x 1 token) reach the twin as one product.
w32, _, quant = make(200, 64, 8, 32, mx.float16)
assert ms.register_quantized(w32, *quant)
xb = mx.array(rng.standard_normal((4, 1, 64)).astype(np.float32))
c0 = calls(); yb = xb @ w32.T; mx.eval(yb); out["calls_batched"] = calls() - c0
out["batched_rel"] = rel(yb, np.array(xb, np.float64) @ np.array(w32, np.float64).T)
assert ms.unregister(w32)

# 4. unsupported forms: nothing registered.
w32, _, (q, s, b, bits, gs) = make(64, 128, 4, 32, mx.float32)
q2, s2, b2 = mx.quantize(w32, group_size=32, bits=2)
s16, b16 = mx.repeat(s, 2, axis=1), mx.repeat(b, 2, axis=1)   # (MLX has no group 16)
q8, s8, b8 = mx.quantize(w32, group_size=32, bits=8)
wt = mx.array(np.array(w32).T.copy()).T     # the same values, column-major
out["unsupported"] = [
    ms.register_quantized(w32, q2, s2, b2, 2, 32),
    ms.register_quantized(w32, q, s16, b16, 4, 16),
    ms.register_quantized(w32, q, s, b, 8, 32),            # packed shape is not 8-bit's
    ms.register_quantized(w32, q8[:, :-1], s8, b8, 8, 32),
    ms.register_quantized(w32, q, s, None, 4, 32),
    ms.register_quantized(w32.astype(mx.float16), q, s, b, 4, 32),
    ms.register_quantized(wt, q, s, b, 4, 32),
    ms.register_quantized(w32[None], q, s, b, 4, 32),
]
out["after_unsupported"] = ms.quantized_calls()

# 5. two threads on two MLX streams multiply registered matrices at once (the helper
#    thread is shared) while a third registers and unregisters other matrices.
mats = [make(1500, 128, bits, 32, mx.float16) for bits in (4, 8)]
for w32, _, quant in mats:
    assert ms.register_quantized(w32, *quant)
xs = mx.array(rng.standard_normal((4, 128)).astype(np.float32))
refs = [np.array(xs, np.float64) @ np.array(w32, np.float64).T for w32, _, _ in mats]
stop = threading.Event()
spare = [make(40, 64, 4, 32, mx.float32) for _ in range(4)]
def churn():
    while not stop.is_set():
        for w32, _, quant in spare:
            ms.register_quantized(w32, *quant)
        for w32, _, _ in spare:
            ms.unregister(w32)
def hammer(i, res):
    st = mx.new_stream(mx.cpu)
    w32 = mats[i][0]
    with mx.stream(st):
        for r in range(40):
            xr = xs[: 1 + r % 4]
            res.append(rel(np.array((xr * (r + 1)) @ w32.T) / (r + 1), refs[i][: 1 + r % 4]))
res = [[], []]
c0 = calls()
ths = [threading.Thread(target=hammer, args=(i, res[i])) for i in range(2)]
ch = threading.Thread(target=churn)
ch.start()
for t in ths: t.start()
for t in ths: t.join()
stop.set(); ch.join()
out["threaded_err"] = max(res[0] + res[1])
out["threaded_runs"] = len(res[0]) + len(res[1])
out["threaded_calls"] = calls() - c0
out["unregister_all"] = ms.unregister_all()
out["final"] = ms.quantized_calls()

# 6. twins share chunks of memory mapped for them, unmapped when their last twin goes:
#    resident memory grows by the twins' bytes and comes back after unregistering.
import os
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = [make(2048, 4096, 4, 32, mx.float32) for _ in range(4)]
r0 = rss()
for w32, _, quant in big:
    assert ms.register_quantized(w32, *quant)
out["big_bytes"] = ms.quantized_calls()["bytes"]
r1 = rss()
x = mx.array(rng.standard_normal((3, 4096)).astype(np.float32))
out["big_rel"] = max(rel(x @ w32.T, np.array(x, np.float64) @ np.array(w32, np.float64).T)
                     for w32, _, _ in big)
r2 = rss()
for w32, _, _ in big:
    assert ms.unregister(w32)
out["rss_growth"], out["rss_returned"] = r1 - r0, r2 - rss()

# 7. one row of a big twin, on this thread alone and shared with the helper (what
#    _share_one_row chooses where one core reads memory slowly): the same numbers.
w32, _, quant = make(2048, 1024, 4, 32, mx.float16)
assert ms.register_quantized(w32, *quant)
ms._share_one_row()
out["one_row_choice"] = ms.describe().get("one_row")
out["helper_spin"] = int(ms._shim.localai_blas_count(10))
x1 = mx.array(rng.standard_normal((1, 1024)).astype(np.float32))
ys = []
for limit in (1 << 62, ms.SHARED_ONE_ROW, 1 << 62):
    ms._shim.localai_share_one_row(ctypes.c_long(limit))
    ys.append(np.array(x1 @ w32.T))
out["one_row_same"] = [bool((y == ys[0]).all()) for y in ys]
out["one_row_rel"] = rel(ys[1], np.array(x1, np.float64) @ np.array(w32, np.float64).T)
assert ms.unregister(w32)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    if not OPENBLAS.exists():
        pytest.skip("Debian libopenblas0-pthread not installed")
    out = run_py(CHECK, env={"LOCALAI_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
                             # two threads (an earlier in-process configure() may
                             # have put OPENBLAS_NUM_THREADS=1 in our environment)
                             "LOCALAI_BLAS_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"})
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


def test_twin_products_equal_the_float32_products(checked):
    # bits 4/8 x groups 32/64/128 x float32/float16/bfloat16 scales x M 1..8, 16, 21,
    # 37, plain and addmm (alpha, beta), all through the twin.
    assert checked["products"] == 2 * 3 * 3 * 11 * 2 + 3 * 2 * 8
    assert checked["missed"] == 0
    assert checked["tiny_registered"] == [1] * 6          # re-registering replaces
    assert checked["max_rel_err"] < 1e-5
    # MLX's own dequantize with half scales rounds each weight to the half type; the
    # twin computes scale*q+bias in float32 (exactly): they differ by that rounding.
    assert checked["max_rel_err_vs_half_dequantize"] < 1e-2


def test_prompt_rows_and_row_views_use_the_twin(checked):
    # 128 rows (without AVX-512 from 16 rows on a packed product); with AVX-512 and
    # OpenBLAS on its AVX-512 kernels, 64 (QUANT_MAX_ROWS_AVX512: OpenBLAS is faster
    # above)
    top = checked["max_rows"]
    fast_openblas = (checked["vector_floats"] == 16
                     and (checked["openblas_coretype"] or "").upper() == "SKYLAKEX")
    assert top == (64 if fast_openblas else 128)
    rows = checked["rows"]
    ms = (3, 9, 33, top, top + 1)
    assert [rows[str(m)][0] for m in ms] == [int(m <= top) for m in ms]
    assert max(err for _, err in rows.values()) < 1e-5
    views = checked["views"]
    assert {k: v[0] for k, v in views.items()} == {
        "0:160": 1, "96:256": 1, "160:301": 1, "288:301": 1,
        "101:201": 0, "0:151": 0, "99:101": 0}
    assert max(err for _, err in views.values()) < 1e-5
    assert checked["other_k"][0] == 0 and checked["other_k"][1] < 1e-5


def test_unregistered_takes_the_float32_path(checked):
    assert checked["registered"]["matrices"] == 1
    # 4 groups of 32 a row: with AVX-512 (16 floats a vector) rows in pairs and a
    # lone last one (301); without, the rows fill blocks of 16 (304)
    rows = 301 if checked["vector_floats"] == 16 else 304
    assert checked["registered"]["bytes"] == rows * 4 * (8 + 16)
    assert checked["unregister"] == [True, False]
    assert checked["calls_after_unregister"] == 0
    assert checked["after_unregister_rel"] < 1e-5
    assert checked["empty"]["matrices"] == 0 and checked["empty"]["bytes"] == 0


def test_batched_decode_shape_uses_the_twin(checked):
    assert checked["calls_batched"] == 1
    assert checked["batched_rel"] < 1e-5


def test_one_row_alone_or_shared_with_the_helper_gives_the_same_numbers(checked):
    assert checked["one_row_same"] == [True, True, True]
    assert checked["one_row_rel"] < 1e-5
    # AVX-512 kernels measure whether one core reads the twins fast enough alone
    # (mlx_setup._share_one_row); narrower kernels always share big products.
    # A slow core also gets the helper's longer spin (AVX2's).
    if checked["vector_floats"] == 16:
        assert checked["one_row_choice"] in ("shared", "alone")
        assert checked["helper_spin"] == (2000 if checked["one_row_choice"] == "shared"
                                          else 500)
    else:
        assert checked["one_row_choice"] is None and checked["helper_spin"] == 2000


def test_unsupported_forms_register_nothing(checked):
    assert checked["unsupported"] == [False] * 8
    assert checked["after_unsupported"]["matrices"] == 0


def test_concurrent_products_and_registration(checked):
    assert checked["describe"]["shim_helpers"] == 1
    assert checked["threaded_runs"] == 80
    assert checked["threaded_calls"] == 80
    assert checked["threaded_err"] < 1e-5
    assert checked["unregister_all"] == 2
    assert checked["final"]["matrices"] == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux /proc")
def test_twin_memory_is_returned_when_unregistered(checked):
    twins = checked["big_bytes"]
    assert twins == 4 * 2048 * (4096 // 32) * (2 * 4 + 16)     # scale, bias, 32 nibbles
    assert checked["big_rel"] < 1e-5
    assert checked["rss_growth"] > 0.9 * twins
    assert checked["rss_returned"] > 0.9 * twins


def test_without_the_shim_nothing_registers():
    out = run_py(
        "import json\nfrom engines import mlx_setup as ms\nms.configure()\n"
        "import mlx.core as mx\n"
        "w = mx.random.normal((64, 64)); q = mx.quantize(w, group_size=32, bits=4)\n"
        "w32 = mx.dequantize(*q, group_size=32, bits=4); mx.eval(w32)\n"
        "print(json.dumps([ms.register_quantized(w32, *q, 4, 32), ms.unregister(w32),"
        " ms.quantized_calls()]))", env={"LOCALAI_MLX_BLAS": "off"})
    assert out == [False, False, None]


PORTABLE = r"""
import ctypes, json, sys
import numpy as np
lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_LOCAL)
assert lib.localai_blas_init(sys.argv[2].encode(), 8, 1) == 0
P = ctypes.c_void_p
lib.localai_quant_register.argtypes = [P, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, P, P, P]
lib.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, P, ctypes.c_int, P,
                            ctypes.c_int, ctypes.c_float, P, ctypes.c_int]
lib.localai_blas_count.restype = ctypes.c_long
rng = np.random.default_rng(1)
err = 0.0
for bits, gs, n, k in ((4, 32, 1001, 128), (8, 64, 77, 256), (4, 128, 300, 384)):
    q = rng.integers(0, 1 << bits, (n, k))
    s = rng.standard_normal((n, k // gs)).astype(np.float32)
    b = rng.standard_normal((n, k // gs)).astype(np.float32)
    w = (np.repeat(s, gs, 1) * q + np.repeat(b, gs, 1)).astype(np.float32)
    packed = np.zeros((n, k * bits // 32), np.uint32)
    for e in range(k):                    # value e at bits (e*bits)%32 of word e*bits/32
        packed[:, e * bits // 32] |= (q[:, e].astype(np.uint32) << (e * bits % 32))
    assert lib.localai_quant_register(w.ctypes.data, n, k, bits, gs, packed.ctypes.data,
                                      s.ctypes.data, b.ctypes.data) == 0
    for m in (*range(1, 9), 16, 21, 37):
        x = rng.standard_normal((m, k)).astype(np.float32)
        c = np.zeros((m, n), np.float32)
        lib.cblas_sgemm(101, 111, 112, m, n, k, 1.0, x.ctypes.data, k, w.ctypes.data, k,
                        0.0, c.ctypes.data, n)
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        err = max(err, float(np.abs(c - ref).max() / np.abs(ref).max()))
print(json.dumps({"err": err, "quant_calls": lib.localai_blas_count(4)}))
"""


@pytest.mark.skipif(not OPENBLAS.exists(), reason="Debian libopenblas0-pthread not installed")
@pytest.mark.parametrize("flags", [["-mavx2", "-mfma"], []], ids=["avx2", "generic"])
def test_kernel_without_avx512(tmp_path, flags):
    # The shim is built with -march=native (AVX-512 here); other CPUs get the AVX2 or
    # the generic vector code: same results. The kernel is called directly.
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    from engines import mlx_setup as ms
    src, lib = tmp_path / "shim.c", tmp_path / "shim.so"
    src.write_text(ms._SHIM_C)
    subprocess.run([cc, "-O3", *flags, "-shared", "-fPIC", "-pthread", "-o", str(lib),
                    str(src), "-ldl"], check=True, capture_output=True, timeout=120)
    r = subprocess.run([sys.executable, "-c", PORTABLE, str(lib), str(OPENBLAS)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["quant_calls"] == 3 * 11
    assert out["err"] < 1e-5
