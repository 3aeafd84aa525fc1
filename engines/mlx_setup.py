"""MLX made fast on an ordinary CPU: which BLAS it calls, which dtype weights run in.

(issue 8) Used by engines/llm.py (and vlm.py):

    configure(config=None)      before the first `import mlx` (idempotent)
    prepare(model, info=None)   right after mlx_lm's load_model; returns the model
    describe(model=None)        dict for the start banner and /api/ps

Why (measured on Linux x86_64, 2 cores, mlx[cpu] 0.32, SmolLM2-135M; see
shared/DESIGN.md section 5 and bench/llm_bench.py):

1. The Linux `mlx` CPU wheel links the reference (netlib) BLAS. MLX resolves only
   `cblas_sgemm` (plus LAPACK) from it, through the dynamic linker's global scope, so
   a BLAS loaded with RTLD_GLOBAL *before* mlx wins. We load the system OpenBLAS
   (Debian libopenblas0-pthread): a 1000x576x1536 gemm (prefill) goes ~230 ms -> ~5 ms.
2. Decoding multiplies ONE row by every weight matrix (M=1). OpenBLAS's sgemm packs
   the whole weight matrix for that, twice the memory traffic of a gemv, and MLX never
   calls sgemv. A small C shim (below, compiled once with the system C compiler
   into a private cache directory; optional) exports `cblas_sgemm` ahead of OpenBLAS
   and sends M=1 to OpenBLAS's sgemv, M=2..SMALL_M (batched decoding) to a kernel
   that reads each weight row once for all rows, shared with a helper thread that
   only takes work when it is awake, and everything else to OpenBLAS's sgemm.
   The 576x49152 head: 4.5 ms -> 2.1 ms at M=1; 8 ms -> 4.4 ms at M=4.
3. MLX's CPU quantized matmul and its float16/bfloat16 matmuls are far slower than
   float32 BLAS (576x49152 head: q4 17 ms, bf16 20 ms, f16 39 ms, f32 2 ms), so on
   a CPU the weights are dequantized to float32 when the copy fits the memory budget
   (LOCALAI_MLX_MEMORY_BUDGET, e.g. "2G"; default a quarter of RAM). On a GPU
   (Metal/CUDA) quantized weights stay: that is their fast path.
4. Threads: on a machine other processes keep busy, threads that meet at every
   split product wait for a descheduled partner; one thread measured faster there,
   so configure() samples /proc/stat for 0.2 s and says what it chose. The shim's
   helper thread takes part in products of 2..8 rows (batches), and in one stream's
   big ones without AVX-512 (there its kernels are twice as slow; with AVX-512 the
   helper competed with the Python thread building the next step), or where one core
   reads the weights slowly (measured at load: _share_one_row). That Python thread
   runs as SCHED_BATCH (graph_thread()): MLX lets it run only ~100 ops ahead of the
   stream, so it sleeps and wakes ~65 times a token, and each wake-up preempted
   MLX's stream thread or the helper in the middle of a product (4 streams: ~25
   preemptions of the stream thread a step; step 7.9-8.3 -> 7.3-7.9 ms). One
   stream keeps the normal policy.
5. MLX runs rms_norm, rope and attention on a CPU as their composed fallbacks, so a
   decoded token was ~4,300 graph nodes at ~3 us each. engines/mlx_decode.py gives
   llama/qwen2 models a decode step of ~1,100 (fused q|k|v and gate|up products,
   rope's angles once per token, compiled elementwise work). Prompts take the same
   compiled pieces, every token a row, with attention's exp compiled (MLX's Softmax
   runs a scalar exp on x86).
6. Float32 weights make decoding read 513 MB per token. The shim keeps a copy of
   each decode matrix in its quantized form ("twin": 4/8-bit values with float32
   scale and bias per group, 115 MB for SmolLM2) and computes products of up to 128
   rows from it (decoding, short prompts: OpenBLAS's sgemm packs all 4 bytes of every
   weight, which dominates below a few hundred rows), keyed by the float32 matrix's
   address range (register_quantized); bigger products (several prompts computed
   together) use OpenBLAS on the float32 copy. Without AVX-512, 16 rows and more
   take a packed product (a block of 16 weight rows dequantized to float32 once,
   tiles of 6 rows of A over it). The language engine computes a prompt in slices
   of 128 tokens (PREFILL_STEP_CPU), which stay on the twins, except with AVX-512
   where OpenBLAS's own AVX-512 sgemm is faster above 64 rows
   (QUANT_MAX_ROWS_AVX512). The 576x49152 8-bit
   head: 3.7 -> 1.1 ms at M=1 (bench/quant_bench.py); a 26-token prompt's products
   69 -> 20 ms. The twins live in 2 MB-aligned chunks advised for transparent huge
   pages (fewer TLB misses, prefetches not stopped at every 4 KB page: a decode step
   ~4% faster) and are freed with the model (release()).
7. The process around MLX: jemalloc as malloc (allocator_env(): MLX's two threads
   no longer wait on glibc's arena lock, ~900 -> ~450 futex calls a token), and
   MLX's JIT kernels built with -march=native and a vectorized exp (_native_jit()).
Outputs stay the same: float32 weights are scale*q + bias exactly, which is what
the twins compute too; logits agree with mlx-lm's own forward pass within float32
rounding (tests/test_mlx_decode.py, tests/test_shim_quant.py) and with the quantized
model within float16 rounding (tests/test_mlx_setup.py).

Result (engine in-process, greedy, quiet 2-core machine, Zen 5 with AVX-512): decode ~10 tok/s (mlx-lm)
-> ~210 tok/s (a step of ~4.8-5.5 ms, two thirds of it quantized products bound by
memory bandwidth, the rest MLX's graph scheduling), 1000-token prefill 12.5 -> ~690
tok/s (slices of 128 rows from the twins, the rest mostly attention), a 26-token
prompt ~28 ms.
A batch of 4 takes ~7.3-7.9 ms a step and of 8 ~12 ms: what grows per row is
arithmetic (the quantized products are bound by multiply-adds, ~60-65% of AVX-512
peak at 4 rows), attention's small products (MLX calls BLAS once per sequence and kv
head; the float32 keys and values come from memory), and three busy threads (MLX's
stream, the shim's helper, Python building the next step) sharing two cores. The
helper computes ~40% of a batch's product blocks, not half: it finds MLX's stream
already working on a short product it was asleep for (waking a thread on this VM
takes longer than o_proj's product; waking it early, at attention's products, did
not help). Four prompts prefilled together cost about three times one.
Without AVX-512 (Zen 3, AVX2: vectors of 8, 16 registers) the kernels have half the
width: decode ~6 (mlx-lm) -> ~75-80 tok/s, one stream sharing its big products with
the helper too; 4 streams ~165-185 tok/s, both cores busy. There the twins are laid
out for vectors across 16 weight rows (see the layout in the shim): each row of A
takes a broadcast of x[k] and two FMAs per k, a group's scale and bias apply once
per group (scale * sum(q*x) + bias * sum(x)), and every cache line of a block's
group is prefetched. A decode step's 121 products of SmolLM2 on two threads: one
row ~10 -> ~7.5 ms, four rows ~11.2 -> ~9.5 ms (vectors along k before: four loads
of A per five multiply-adds, one prefetch per group). Prompts of 16 rows and more
take a packed product instead.

Switches (environment, or the same-named lower-case attribute on the config):
    LOCALAI_MLX_BLAS        auto (shim if a C compiler exists, else OpenBLAS) |
                            openblas | off
    LOCALAI_BLAS_THREADS    BLAS threads (default: the CPUs we may run on, or 1 when
                            other processes already keep a CPU busy at start: on a
                            shared 2-core box one thread measured faster)
    LOCALAI_MLX_MEMORY_BUDGET  bytes the float32 copy may take ("512M", "4G", "0"
                            disables dequantizing); the quantized twins (about the
                            size of the model file) come on top
    LOCALAI_MLX_DTYPE       auto | float32 | keep
    LOCALAI_MLX_DECODE      auto | off (mlx_decode's step and the twins)
    LOCALAI_MALLOC          auto (jemalloc when installed; localai.py restarts itself
                            once with it preloaded) | system
"""
import ctypes
import ctypes.util
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# --- limits and defaults ------------------------------------------------------------
# Where Debian/Ubuntu/Fedora put a threaded OpenBLAS; find_library() is tried after.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
# jemalloc, where Debian/Ubuntu/Fedora put it (libjemalloc2); see allocator_env().
JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)
# Largest batch (rows) the shim's small-M kernel takes (MAX_BATCH of the llm engine
# is 8). It runs passes of 4 rows over L2-sized blocks of a weight matrix: the
# 576x49152 head at 4 rows 4.4 ms vs OpenBLAS's packing sgemm 8 ms; at 8 rows
# 17 vs 32 ms measured on a loaded machine. Above this OpenBLAS's blocked gemm wins.
SMALL_M = 8
# A machine where other processes already keep this many CPUs busy when MLX starts
# gets one BLAS thread: threads that wait for each other at every split product
# lose more to a descheduled partner than they gain (measured, see _configure).
BUSY_CORES = 0.75
BUSY_SAMPLE_SECONDS = 0.2
# With AVX-512 kernels in the shim and OpenBLAS on its SkylakeX ones, products of
# more rows than this (a prompt's 128-token slices) go to OpenBLAS's sgemm on the
# float32 copy instead of the quantized twins: SmolLM2's layer products at 128 rows
# took 169 ms from the twins, 138 from OpenBLAS, at 64 rows 89 and 88 on a Sapphire
# Rapids VM (QMAX_M's comment in the shim: 100 and 87 at 128 rows, 75 and 75 at
# 104). A 900-token prompt there: 1.74-1.81 -> 1.55-1.58 s (alternating processes).
QUANT_MAX_ROWS_AVX512 = 64
# Default memory budget for a float32 copy of the weights: a quarter of physical
# RAM, so the copy never crowds out the KV caches, other models, or the desktop.
DEFAULT_BUDGET_FRACTION = 0.25
# Added to MLX's JIT compile of mx.compile's CPU kernels (see _native_jit).
JIT_FLAGS = "-march=native -ffp-contract=off -fno-trapping-math -fno-math-errno -finline-limit=600"
# With AVX-512 the shim keeps one stream's products on one core (help_one_row in the
# shim) unless one core reads a model's quantized weights, one row's products of all
# of them, slower than this (bytes a second): then each of the two cores adds memory
# bandwidth, and one-row products of at least SHARED_ONE_ROW weights are shared with
# the helper. A Zen 5 read ~38 GB/s alone (sharing was slower there); a Sapphire
# Rapids VM 11 (a plain read loop: 13 GB/s on one core, 23-27 on two), where one
# stream of SmolLM2 decoded 63 tok/s alone, 71 sharing products of 1M weights and
# more (gate|up, the head: AVX2's limit), 77-80 with 250k-600k (q|k|v, down too).
ONE_ROW_SHARE_BELOW = 20e9
SHARED_ONE_ROW = 400_000
# There the helper also spins this many pauses for the next product before it sleeps
# (as with AVX2; 500 with AVX-512 elsewhere): a step's gaps between products are
# longer (a step of 4 streams ~17 ms, the Zen 5's ~7.5) and a pause shorter (10 ns,
# the Zen 5's 23). Alternating in one process there: 4 streams 204 -> 233-246 tok/s
# (1200: 212, 3000: 234, 6000: 237), one stream 76 -> 83.
SLOW_CORE_SPIN = 2000
# One-row sweeps over every twin behind that measurement (the fastest counts).
ONE_ROW_SWEEPS = 3
# Seconds the one-off compile of the shim may take before we give up on it.
COMPILE_TIMEOUT = 60
# The verification gemm: big enough that netlib (~100 ms) and OpenBLAS (~2 ms)
# cannot be confused, small enough to cost nothing at start.
VERIFY_N = 384

_SHIM_C = r"""
/* localai BLAS shim: route MLX's cblas_sgemm calls by shape (see mlx_setup.py). */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
typedef void (*sgemm_t)(int, int, int, int, int, int, float, const float *, int,
                        const float *, int, float, float *, int);
typedef void (*sgemv_t)(int, int, int, int, float, const float *, int, const float *,
                        int, float, float *, int);
static sgemm_t real_sgemm;
static sgemv_t real_sgemv;
static _Atomic long n_calls, n_gemv, n_small, n_quant;
static int small_max = 0;
enum { RowMajor = 101, NoTrans = 111, Trans = 112 };

/* ---- kernel: C[m][n] = alpha * sum_k A[m][k] * B[n][k] (+ beta * C[m][n]) ----
   For a few rows of A (M <= 4 per pass): each row of B, a weight row, is read once
   for all of them. */
#ifdef __AVX512F__
#define VW 16
#else
#define VW 8
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
static inline vf ld(const float *p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < VW; i++) s += v[i]; return s; }
/* A tree sum (the scalar chain of hsum costs as much as a quarter of a row here). */
#if (__GNUC__ >= 12 || defined(__clang__)) && VW == 16
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
static inline float hsum_q(vf v) {
  vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
        + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  b += __builtin_shufflevector(b, b, 2, 3, 0, 1);
  return b[0] + b[1];
}
#elif (__GNUC__ >= 12 || defined(__clang__)) && VW == 8
typedef float vf4 __attribute__((vector_size(16)));
static inline float hsum_q(vf v) {
  vf4 b = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  b += __builtin_shufflevector(b, b, 2, 3, 0, 1);
  return b[0] + b[1];
}
#else
#define hsum_q hsum
#endif
/* Rows of B to prefetch ahead in attention's products: a long context's keys and
   values stream from memory, and the hardware prefetcher alone left them short of
   bandwidth (SmolLM2, a token after 3000 positions: 13.9-15.4 -> 11.6-13.6 ms; 4
   streams after 1000: 20.8-20.9 -> 17.0-19.8 ms; 8 or 32 rows: no better). */
#define APREFETCH 16
static inline void prefetch_row(const float *p, int n) {
  for (int i = 0; i < n; i += 64 / (int)sizeof(float)) __builtin_prefetch(p + i);
}
#define SMALL(MM)                                                                   \
  static void small_##MM(int N, int K, float alpha, const float *A, int lda,        \
                         const float *B, int ldb, float beta, float *C, int ldc) {  \
    if (VW == 16 && K == 64) {     /* attention's scores, q @ K^T: A in registers */ \
      vf a[MM][4];                                                                  \
      for (int m = 0; m < MM; m++)                                                  \
        for (int j = 0; j < 4; j++) a[m][j] = ld(A + (size_t)m * lda + 16 * j);    \
      for (int n = 0; n < N; n++) {                                                 \
        const float *b = B + (size_t)n * ldb;                                       \
        if (n + APREFETCH < N) prefetch_row(b + (size_t)APREFETCH * ldb, 64);       \
        vf b0 = ld(b), b1 = ld(b + 16), b2 = ld(b + 32), b3 = ld(b + 48);           \
        for (int m = 0; m < MM; m++) {                                              \
          float v = alpha * hsum_q(a[m][0] * b0 + a[m][1] * b1                      \
                                   + (a[m][2] * b2 + a[m][3] * b3));                \
          float *c = C + (size_t)m * ldc + n;                                       \
          *c = beta == 0.f ? v : v + beta * *c;                                     \
        }                                                                           \
      }                                                                             \
      return;                                                                       \
    }                                                                               \
    if (VW == 8 && K % VW == 0) {  /* AVX2: two rows of B at once, 2*MM FMA chains  \
      (one row's chains waited on the FMA latency: 360 products 3x90x64, a decode  \
      step of 4 streams, 839 -> 515 us on Zen 3) */                                 \
      int n = 0;                                                                    \
      for (; n + 1 < N; n += 2) {                                                   \
        const float *b = B + (size_t)n * ldb;                                       \
        if (n + APREFETCH < N) prefetch_row(b + (size_t)APREFETCH * ldb, 2 * K);    \
        vf acc[MM][2];                                                              \
        for (int m = 0; m < MM; m++) acc[m][0] = acc[m][1] = (vf){0};               \
        for (int k = 0; k < K; k += VW) {                                           \
          vf b0 = ld(b + k), b1 = ld(b + ldb + k);                                  \
          for (int m = 0; m < MM; m++) {                                            \
            vf a = ld(A + (size_t)m * lda + k);                                     \
            acc[m][0] += a * b0;                                                    \
            acc[m][1] += a * b1;                                                    \
          }                                                                         \
        }                                                                           \
        for (int m = 0; m < MM; m++)                                                \
          for (int i = 0; i < 2; i++) {                                             \
            float v = alpha * hsum_q(acc[m][i]);                                    \
            float *c = C + (size_t)m * ldc + n + i;                                 \
            *c = beta == 0.f ? v : v + beta * *c;                                   \
          }                                                                         \
      }                                                                             \
      if (n == N) return;                                                           \
      B += (size_t)n * ldb;        /* the last, odd row: below */                   \
      C += n;                                                                       \
      N -= n;                                                                       \
    }                                                                               \
    int KV = K - K % VW;                                                            \
    for (int n = 0; n < N; n++) {                                                   \
      const float *b = B + (size_t)n * ldb;                                         \
      vf acc[MM];                                                                   \
      for (int m = 0; m < MM; m++) acc[m] = (vf){0};                                \
      for (int k = 0; k < KV; k += VW) {                                            \
        vf bv = ld(b + k);                                                          \
        _Pragma("GCC unroll 16") for (int m = 0; m < MM; m++)                       \
          acc[m] += ld(A + (size_t)m * lda + k) * bv;                               \
      }                                                                             \
      for (int m = 0; m < MM; m++) {                                                \
        const float *a = A + (size_t)m * lda;                                       \
        float s = hsum_q(acc[m]);                                                   \
        for (int k = KV; k < K; k++) s += a[k] * b[k];                              \
        float *c = C + (size_t)m * ldc + n;                                         \
        *c = beta == 0.f ? alpha * s : alpha * s + beta * *c;                       \
      }                                                                             \
    }                                                                               \
  }
SMALL(1) SMALL(2) SMALL(3) SMALL(4)

/* ---- kernel: C[m][n] = alpha * sum_k A[m][k] * B[k][n] (+ beta * C[m][n]) ----
   B not transposed, a few rows of A: attention's probabilities times the values
   (rows of A: a kv head's query heads; K: the positions; N: the head size), called
   once per sequence and kv head of a decode step. OpenBLAS's sgemm packs B for it.
   Each row of B is read once for up to 4 rows of A, 4*VW columns at a time. */
static void small_nn(int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc) {
  enum { NV = 4, NB = NV * VW };
  for (int n0 = 0; n0 < N; n0 += NB) {
    int nn = N - n0 < NB ? N - n0 : NB;
    for (int m0 = 0; m0 < M; m0 += 4) {
      int mm = M - m0 < 4 ? M - m0 : 4;
      vf acc[4][NV];
      float tail[4][NB];
      for (int m = 0; m < 4; m++)
        for (int i = 0; i < NV; i++) acc[m][i] = (vf){0};
      if (nn == NB && VW == 8 && mm == 3) {  /* AVX2, a kv head's 3 query heads:
        12 accumulators and B from memory fit 16 registers (the loop below spilled) */
        for (int k = 0; k < K; k++) {
          const float *b = B + (size_t)k * ldb + n0;
          if (k + APREFETCH < K) prefetch_row(b + (size_t)APREFETCH * ldb, NB);
          _Pragma("GCC unroll 3") for (int m = 0; m < 3; m++) {
            vf av = (vf){0} + A[(size_t)(m0 + m) * lda + k];
            _Pragma("GCC unroll 4") for (int i = 0; i < NV; i++) acc[m][i] += av * ld(b + i * VW);
          }
        }
        for (int m = 0; m < 3; m++)
          for (int i = 0; i < NV; i++) __builtin_memcpy(tail[m] + i * VW, &acc[m][i], sizeof(vf));
      } else if (nn == NB) {
        for (int k = 0; k < K; k++) {
          const float *b = B + (size_t)k * ldb + n0;
          if (k + APREFETCH < K) prefetch_row(b + (size_t)APREFETCH * ldb, NB);
          vf bv[NV];
          for (int i = 0; i < NV; i++) bv[i] = ld(b + i * VW);
          for (int m = 0; m < mm; m++) {
            vf av = (vf){0} + A[(size_t)(m0 + m) * lda + k];
            for (int i = 0; i < NV; i++) acc[m][i] += av * bv[i];
          }
        }
        for (int m = 0; m < mm; m++)
          for (int i = 0; i < NV; i++) __builtin_memcpy(tail[m] + i * VW, &acc[m][i], sizeof(vf));
      } else {
        for (int m = 0; m < mm; m++)
          for (int j = 0; j < nn; j++) tail[m][j] = 0.f;
        for (int k = 0; k < K; k++) {
          const float *b = B + (size_t)k * ldb + n0;
          for (int m = 0; m < mm; m++) {
            float a = A[(size_t)(m0 + m) * lda + k];
            for (int j = 0; j < nn; j++) tail[m][j] += a * b[j];
          }
        }
      }
      for (int m = 0; m < mm; m++) {
        float *c = C + (size_t)(m0 + m) * ldc + n0;
        for (int j = 0; j < nn; j++)
          c[j] = beta == 0.f ? alpha * tail[m][j] : alpha * tail[m][j] + beta * c[j];
      }
    }
  }
}

/* ---- quantized twins: a registered float32 weight matrix W (N x K, the B of
   x @ W^T) is read from its MLX affine-quantized form instead, w = scale*q + bias per
   group of gs values along K (0.6-1.25 bytes a weight instead of 4).
   Two layouts, each read once for all M rows of A. With AVX-512 (VW 16), vectors
   along k: per weight row, per group: float scale, float bias, then the group's q:
   8-bit one byte each in order; 4-bit in chunks of 2*VW values where byte i holds
   value i (low nibble) and value VW+i (high nibble): one load and a shift give two
   vectors. Rows 2i and 2i+1 alternate group by group (the kernel reads two rows as
   one stream); a lone last row follows.
   Otherwise (AVX2, VW 8), vectors across weight rows: blocks of QB = 2*VW rows (the
   last padded with zeros); per block, per group: QB float scales, QB float biases,
   then for each k of the group the block's QB values (8-bit: QB bytes in row order;
   4-bit: VW bytes, byte i holding row i in its low nibble and row VW+i in its high
   one). One load and a shift give a k's values as two vectors of outputs; each row
   of A takes a broadcast of its x[k] and two FMAs, and no horizontal sums (with
   vectors along k, each multiply-add of four rows also loaded A). */
/* Products of up to QMAX_M rows of A take the twin (decoding, short prompts), in
   passes of up to QPASS rows (the block of B stays in L1/L2). OpenBLAS's float32 sgemm
   reads 4 bytes a weight and packs them: SmolLM2's 120 layer products with 26 rows
   took 69 ms (49 with OpenBLAS's AVX-512 kernel), with the twins 20; 104 rows: 128 (75)
   -> 75; 128 rows: 136 (87) -> 100; 256 rows: 258 (158) -> 215. Without AVX-512,
   products of 16 rows and more take the packed product below (above 32 rows
   OpenBLAS had beaten the 4-row passes there). Its products of 16-32 rows are
   1.1-1.45x faster than the passes; of 64-128 rows within ~20% of OpenBLAS's either
   way on a noisy 2-core VM (bench/quant_bench.py), while prompts computed together
   got faster end to end (below: OpenBLAS's threads spin between its products). */
#define QMAX_M 128
static int qmax_m = QMAX_M;     /* the limit in force (QUANT_MAX_ROWS_AVX512 in Python) */
void localai_quant_max_rows(int m) { qmax_m = m < 1 ? 1 : m > QMAX_M ? QMAX_M : m; }
#define QPASS 4
/* Bytes ahead of a twin's read position to prefetch: the hardware prefetcher alone left
   decoding's products short of memory bandwidth (121 products of SmolLM2: one row
   4.5 -> 3.9 ms, four rows 6.2 -> 5.2 ms; 512 was slower than none, 8192 no better). */
#define QPREFETCH 4096
struct chunk;
/* gbytes: a weight row's bytes of one group; rbytes: of all its groups; bytes: the
   twin's (padded) */
struct qmat { const float *key; int N, K, bits, gs; size_t gbytes, rbytes, bytes;
              unsigned char *data; struct chunk *chunk; };
/* Twins live in chunks of 2 MB-aligned memory that the kernel may back with huge
   pages (Linux, transparent huge pages "always" or "madvise"): a token reads every
   twin once, and with 4 KB pages (each twin its own small allocation) it pays TLB
   misses and hardware prefetches that stop at every page (SmolLM2's 120 layer
   products, one row: 2.48 -> 2.32 ms; four rows on two threads: 3.16 -> 3.07 ms; a
   decode step 5.70 -> 5.48 ms). A chunk is unmapped once its last twin is freed;
   only the newest takes new twins. */
#define CHUNK ((size_t)64 << 20)
#define HUGE_PAGE ((size_t)2 << 20)
struct chunk { unsigned char *map, *base; size_t mapped, size, used; int live;
               struct chunk *next; };
static struct chunk *chunks;                      /* newest first; under amu */
static pthread_mutex_t amu = PTHREAD_MUTEX_INITIALIZER;

static unsigned char *arena_alloc(size_t n, struct chunk **owner) {
  n = (n + 63) & ~(size_t)63;
  pthread_mutex_lock(&amu);
  struct chunk *c = chunks;
  if (!c || c->size - c->used < n) {
    size_t size = n > CHUNK ? (n + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1) : CHUNK;
    void *map = mmap(NULL, size + HUGE_PAGE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    c = map == MAP_FAILED ? NULL : calloc(1, sizeof *c);
    if (!c) {
      if (map != MAP_FAILED) munmap(map, size + HUGE_PAGE);
      pthread_mutex_unlock(&amu);
      return NULL;
    }
    c->map = map;
    c->mapped = size + HUGE_PAGE;
    c->base = (unsigned char *)(((uintptr_t)map + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    c->size = size;
#ifdef MADV_HUGEPAGE
    madvise(c->base, size, MADV_HUGEPAGE);
#endif
    c->next = chunks;
    chunks = c;
  }
  unsigned char *p = c->base + c->used;
  c->used += n;
  c->live++;
  *owner = c;
  pthread_mutex_unlock(&amu);
  return p;
}

static void arena_free(struct chunk *c) {
  pthread_mutex_lock(&amu);
  if (--c->live == 0) {
    for (struct chunk **pp = &chunks; *pp; pp = &(*pp)->next)
      if (*pp == c) { *pp = c->next; break; }
    munmap(c->map, c->mapped);
    free(c);
  }
  pthread_mutex_unlock(&amu);
}
typedef unsigned char u8v __attribute__((vector_size(VW)));
typedef int iv __attribute__((vector_size(VW * 4)));
/* VW bytes zero-extended to VW ints (GCC does not turn the generic conversion into
   one vpmovzxbd: it unpacks byte by byte, 8x slower). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline iv ldq(const unsigned char *p) {
  return (iv)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline iv ldq(const unsigned char *p) {
  return (iv)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}
#else
static inline iv ldq(const unsigned char *p) {
  u8v v; __builtin_memcpy(&v, p, sizeof v); return __builtin_convertvector(v, iv);
}
#endif
static inline vf cvt(iv u) { return __builtin_convertvector(u, vf); }
static inline void st(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
/* 4-bit with AVX-512: the group's 16 possible values, scale*j + bias, are computed
   once and each nibble picks its value with a permute (vpermps reads only an index's
   low 4 bits), instead of a conversion and an FMA per vector: the same values.
   Elsewhere: the conversion and the FMA. */
#if VW == 16
static const vf iota16 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#define QLUT_DECL(RR) vf lut[RR]
#define QLUT_SET(r) (lut[r] = iota16 * s[r] + b[r])
#define QDEQ4(r, u) ((vf)_mm512_permutexvar_ps((__m512i)(u), (__m512)lut[r]))
#else
#define QLUT_DECL(RR) (void)0
#define QLUT_SET(r) (void)0
#define QDEQ4(r, u) (cvt((u) & 15) * s[r] + b[r])
#endif
/* Loaded once into registers for both weight rows (GCC would load them again as
   memory operands of each FMA: twice the loads). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__AVX__)
#define QKEEP(x0, x1) __asm__("" : "+v"(x0), "+v"(x1))
#else
#define QKEEP(x0, x1) (void)0
#endif
#if VW == 16
#define QALIGN 2         /* a twin's rows come in pairs (a view starts on one) */
/* Weight row n's first group, and in *gst the distance between its groups: a row of
   a pair alternates with its partner (see the layout), a lone last row does not. */
static inline const unsigned char *qrow(const struct qmat *q, int n, size_t *gst) {
  if ((n & 1) || n + 1 < q->N) {
    *gst = 2 * q->gbytes;
    return q->data + (size_t)(n & ~1) * q->rbytes + (size_t)(n & 1) * q->gbytes;
  }
  *gst = q->gbytes;
  return q->data + (size_t)n * q->rbytes;
}
/* Group g of RR weight rows (p: row 0's; row r's is r*gb further on) into every row
   of A, in units of 2*VW values: two vectors w0, w1 per weight row (4-bit: the low
   and high nibbles of VW bytes; 8-bit: 2*VW bytes). */
#define QGROUP(MM, BITS, RR)                                                        \
  do {                                                                              \
    vf s[RR], b[RR];                                                                \
    QLUT_DECL(RR);                                                                  \
    for (int r = 0; r < RR; r++) {                                                  \
      float s1, b1;                /* one load each: a broadcast from memory */     \
      __builtin_memcpy(&s1, p + r * gb, sizeof s1);                                 \
      __builtin_memcpy(&b1, p + r * gb + sizeof s1, sizeof b1);                     \
      s[r] = s1 - (vf){0};         /* x - 0 == x */                                 \
      b[r] = b1 - (vf){0};                                                          \
      if (BITS == 4) QLUT_SET(r);                                                   \
    }                                                                               \
    const unsigned char *d = p + 2 * sizeof(float);                                 \
    for (int u = 0; u < gs; u += 2 * VW, k += 2 * VW) {                             \
      vf w0[RR], w1[RR];                                                            \
      for (int r = 0; r < RR; r++) {                                                \
        if (BITS == 4) {                                                            \
          iv q4 = ldq(d + r * gb);                                                  \
          w0[r] = QDEQ4(r, q4);                                                     \
          w1[r] = QDEQ4(r, q4 >> 4);                                                \
        } else {                                                                    \
          w0[r] = cvt(ldq(d + r * gb)) * s[r] + b[r];                               \
          w1[r] = cvt(ldq(d + r * gb + VW)) * s[r] + b[r];                          \
        }                                                                           \
      }                                                                             \
      d += BITS == 4 ? VW : 2 * VW;                                                 \
      _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++) {                        \
        const float *a = A + (size_t)m * lda + k;                                   \
        vf x0 = ld(a), x1 = ld(a + VW);                                             \
        if (RR > 1) QKEEP(x0, x1);                                                  \
        for (int r = 0; r < RR; r++) {                                              \
          acc[r][m][0] += x0 * w0[r];                                               \
          acc[r][m][1] += x1 * w1[r];                                               \
        }                                                                           \
      }                                                                             \
    }                                                                               \
    p += gst;                                                                       \
  } while (0)
/* RR (1 or 2) output columns from weight rows n.. (qrow: where their groups are). */
#define QROWS(MM, BITS, RR)                                                         \
  do {                                                                              \
    size_t gst;                                                                     \
    const unsigned char *p = qrow(q, n, &gst);                                      \
    vf acc[RR][MM][2];                                                              \
    for (int r = 0; r < RR; r++)                                                    \
      for (int m = 0; m < MM; m++) acc[r][m][0] = acc[r][m][1] = (vf){0};           \
    int k = 0;                                                                      \
    for (int g = 0; g < G; g++) {                                                   \
      __builtin_prefetch(p + QPREFETCH);                                            \
      QGROUP(MM, BITS, RR);                                                         \
    }                                                                               \
    for (int r = 0; r < RR; r++)                                                    \
      for (int m = 0; m < MM; m++) {                                                \
        float v = alpha * hsum_q(acc[r][m][0] + acc[r][m][1]);                      \
        float *c = C + (size_t)m * ldc + n + r;                                     \
        *c = beta == 0.f ? v : v + beta * *c;                                       \
      }                                                                             \
  } while (0)
/* Output columns [n0, n1) for MM (<= 4) rows of A. Two weight rows at a time (one
   stream in memory, see the layout): every load of A serves both, and one row of A
   still gets 4 independent accumulator chains. More rows of A take another pass (a
   kernel for 8 rows, one weight row at a time, was 1.5x slower than two passes).
   GS: the group size when known at compile time (32, the common one: no
   loop inside a group), else 0. */
#define QK(MM, BITS, GS)                                                            \
  static void qk##BITS##_##MM##_##GS(const struct qmat *q, int n0, int n1,          \
                                     float alpha, const float *A, int lda,          \
                                     float beta, float *C, int ldc) {               \
    const int gs = GS ? GS : q->gs, G = q->K / gs;                                  \
    const size_t gb = q->gbytes;                                                    \
    for (int n = n0; n < n1;) {                                                     \
      if (!(n & 1) && n + 1 < n1) {                                                 \
        QROWS(MM, BITS, 2);                                                         \
        n += 2;                                                                     \
      } else {                                                                      \
        QROWS(MM, BITS, 1);                                                         \
        n += 1;                                                                     \
      }                                                                             \
    }                                                                               \
  }
#else
#define QB (2 * VW)       /* weight rows a block */
#define QALIGN QB
/* A block's q values at one k (from *d, which moves past them) as two vectors of
   floats: rows 0..VW-1 and VW..2*VW-1 (see the layout). */
static inline void qk_values(const unsigned char **d, int bits, vf *f0, vf *f1) {
  if (bits == 4) {
    const iv q4 = ldq(*d);
    *f0 = cvt(q4 & 15);
    *f1 = cvt(q4 >> 4);
    *d += VW;
  } else {
    *f0 = cvt(ldq(*d));
    *f1 = cvt(ldq(*d + VW));
    *d += 2 * VW;
  }
}
/* Sets of accumulators: k values h, h+P, ... of a group go to set h, so that one or
   two rows of A still keep 8 independent chains (an FMA takes 4 cycles). */
#define QPH(MM) ((MM) == 1 ? 4 : (MM) == 2 ? 2 : 1)
/* Output columns [n0, n1) (n0 at a block) for MM (<= 4) rows of A. A group's sum is
   scale * sum(q * x) + bias * sum(x): its q are converted to float and multiplied by
   x directly, and its scale and bias are applied once per group and row of A (the
   rows' sums of x per group are computed once a call), not once per weight:
   4 rows of A take 8 FMAs per k of a block instead of 10. Every cache line of the
   group QPREFETCH ahead is prefetched (one row of A is bound by memory). A 3072x576
   4-bit product on one Zen 3 core, against the layout along k: 4 rows 240 -> ~210
   us, 1 row 140-165 -> ~100-110 us. GS: the group size when known at compile time
   (32, the common one), else 0. */
#define QK(MM, BITS, GS)                                                            \
  static void qk##BITS##_##MM##_##GS(const struct qmat *q, int n0, int n1,          \
                                     float alpha, const float *A, int lda,          \
                                     float beta, float *C, int ldc) {               \
    enum { P = QPH(MM) };                                                           \
    const int gs = GS ? GS : q->gs, G = q->K / gs;                                  \
    const size_t gst = QB * q->gbytes;                                              \
    float xs[MM][G];                                                                \
    for (int m = 0; m < MM; m++)                                                    \
      for (int g = 0; g < G; g++) {                                                 \
        vf t = (vf){0};                                                             \
        for (int k = 0; k < gs; k += VW) t += ld(A + (size_t)m * lda + g * gs + k); \
        xs[m][g] = hsum(t);                                                         \
      }                                                                             \
    for (int n = n0; n < n1; n += QB) {                                             \
      const unsigned char *p = q->data + (size_t)n * q->rbytes;                     \
      vf y[MM][2];                                                                  \
      for (int m = 0; m < MM; m++) y[m][0] = y[m][1] = (vf){0};                     \
      const float *a = A;                                                           \
      for (int g = 0; g < G; g++, p += gst) {                                       \
        for (size_t o = 0; o < gst; o += 64) __builtin_prefetch(p + QPREFETCH + o); \
        const unsigned char *d = p + 4 * VW * sizeof(float);                        \
        vf acc[P][MM][2];                                                           \
        for (int h = 0; h < P; h++)                                                 \
          for (int m = 0; m < MM; m++) acc[h][m][0] = acc[h][m][1] = (vf){0};       \
        _Pragma("GCC unroll 8") for (int u = 0; u < gs; u += P, a += P)             \
          _Pragma("GCC unroll 4") for (int h = 0; h < P; h++) {                     \
            vf f0, f1;                                                              \
            qk_values(&d, BITS, &f0, &f1);                                          \
            _Pragma("GCC unroll 4") for (int m = 0; m < MM; m++) {                  \
              const vf x = a[(size_t)m * lda + h] - (vf){0};                        \
              acc[h][m][0] += f0 * x;                                               \
              acc[h][m][1] += f1 * x;                                               \
            }                                                                       \
          }                                                                         \
        const float *sb = (const float *)p;                                         \
        const vf s0 = ld(sb), s1 = ld(sb + VW), b0 = ld(sb + 2 * VW),               \
                 b1 = ld(sb + 3 * VW);                                              \
        for (int m = 0; m < MM; m++) {                                              \
          vf t0 = acc[0][m][0], t1 = acc[0][m][1];                                  \
          for (int h = 1; h < P; h++) t0 += acc[h][m][0], t1 += acc[h][m][1];       \
          const vf xg = xs[m][g] - (vf){0};                                         \
          y[m][0] += t0 * s0 + b0 * xg;                                             \
          y[m][1] += t1 * s1 + b1 * xg;                                             \
        }                                                                           \
      }                                                                             \
      const int nr = n1 - n < QB ? n1 - n : QB;                                     \
      for (int m = 0; m < MM; m++) {                                                \
        float r[QB];                                                                \
        st(r, y[m][0]);                                                             \
        st(r + VW, y[m][1]);                                                        \
        float *c = C + (size_t)m * ldc + n;                                         \
        for (int i = 0; i < nr; i++)                                                \
          c[i] = beta == 0.f ? alpha * r[i] : alpha * r[i] + beta * c[i];           \
      }                                                                             \
    }                                                                               \
  }
#endif
#define QK4(BITS, GS) QK(1, BITS, GS) QK(2, BITS, GS) QK(3, BITS, GS) QK(4, BITS, GS)
QK4(4, 32) QK4(8, 32) QK4(4, 0) QK4(8, 0)
typedef void (*qk_t)(const struct qmat *, int, int, float, const float *, int, float,
                     float *, int);
#define QK_ROW(BITS, GS) {qk##BITS##_1_##GS, qk##BITS##_2_##GS, qk##BITS##_3_##GS, \
  qk##BITS##_4_##GS}
static const qk_t qkernels[2][2][QPASS] = {            /* [gs == 32][bits == 8][M - 1] */
  {QK_ROW(4, 0), QK_ROW(8, 0)}, {QK_ROW(4, 32), QK_ROW(8, 32)}};

/* The registry: twins sorted by key, B's data pointer (Python keeps that buffer alive
   while it is registered, so the address cannot be reused), searched under a mutex
   held only for the lookup. A product whose B is rows [r0, r0 + N) of a registered
   matrix is served from those rows of its twin: a module's weight that is a view of a
   fused matrix (q_proj's rows of q|k|v, which prompts multiply by) finds it too. An
   entry is freed only when unregistered, which the caller does while no product runs
   on that matrix. */
static struct qmat **qs;
static int qn, qcap;
static pthread_mutex_t qmu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic long q_count, q_bytes;

static int qpos(const float *key) {              /* entries with keys <= key; under qmu */
  int lo = 0, hi = qn;
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if ((uintptr_t)qs[mid]->key <= (uintptr_t)key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

/* 1 and *view = the twin of B's rows, if B (N x K, row stride ldb) is rows r0.. of a
   registered matrix, r0 a multiple of QALIGN and the range not ending inside a pair
   or block of rows (the layouts group them); else 0. */
static int qfind(const float *B, int N, int K, int ldb, struct qmat *view) {
  if (atomic_load_explicit(&q_count, memory_order_relaxed) == 0) return 0;
  int found = 0;
  pthread_mutex_lock(&qmu);
  int i = qpos(B) - 1;
  if (i >= 0) {
    const struct qmat *q = qs[i];                /* q->K > 0 (registration checks) */
    size_t off = (uintptr_t)B - (uintptr_t)q->key, row = (size_t)q->K * sizeof(float);
    size_t r0 = off / row;
    if (q->K == K && ldb == K && off % row == 0 && r0 % QALIGN == 0
        && r0 + N <= (size_t)q->N && (N % QALIGN == 0 || r0 + N == (size_t)q->N)) {
      *view = *q;
      view->data += r0 * q->rbytes;
      view->N = q->N - (int)r0;
      found = 1;
    }
  }
  pthread_mutex_unlock(&qmu);
  return found;
}

static struct qmat *qunlink(const float *key) {   /* under qmu */
  int i = qpos(key) - 1;
  if (i < 0 || qs[i]->key != key) return NULL;
  struct qmat *q = qs[i];
  __builtin_memmove(qs + i, qs + i + 1, (size_t)(qn - i - 1) * sizeof *qs);
  qn--;
  atomic_fetch_sub(&q_count, 1);
  atomic_fetch_sub(&q_bytes, (long)q->bytes);
  return q;
}

static void qfree(struct qmat *q) { if (q) { arena_free(q->chunk); free(q); } }

/* packed: N rows of K*bits/32 uint32 (value e at bits (e*bits)%32 of word e*bits/32);
   scales, biases: N rows of K/gs floats. Returns 0, or < 0 (nothing registered). */
int localai_quant_register(const float *key, int N, int K, int bits, int gs,
                           const uint32_t *packed, const float *scales,
                           const float *biases) {
  if (!key || N <= 0 || K <= 0 || (bits != 4 && bits != 8) ||
      (gs != 32 && gs != 64 && gs != 128) || K % gs)
    return -1;
  struct qmat *q = calloc(1, sizeof *q);
  if (!q) return -2;
  q->key = key; q->N = N; q->K = K; q->bits = bits; q->gs = gs;
  q->gbytes = 2 * sizeof(float) + (size_t)gs * bits / 8;
  q->rbytes = (size_t)(K / gs) * q->gbytes;
  const int G = K / gs, wpr = K * bits / 32, mask = (1 << bits) - 1;
#define QVAL(n, e) ((int)(packed[(size_t)(n) * wpr + (size_t)(e) * bits / 32]            \
                          >> ((size_t)(e) * bits % 32)) & mask)
#if VW == 16
  size_t total = q->rbytes * N;
  q->data = arena_alloc(total, &q->chunk);
  if (!q->data) { free(q); return -2; }
  for (int n = 0; n < N; n++) {
    /* rows 2i and 2i+1 alternate group by group; a lone last row is on its own */
    int paired = (n & 1) || n + 1 < N;
    unsigned char *p = q->data + (size_t)(n & ~1) * q->rbytes + (size_t)(n & 1) * q->gbytes;
    for (int g = 0; g < G; g++, p += (paired ? 2 : 1) * q->gbytes) {
      float sb[2] = {scales[(size_t)n * G + g], biases[(size_t)n * G + g]};
      __builtin_memcpy(p, sb, sizeof sb);
      unsigned char *d = p + sizeof sb;
      if (bits == 8) {
        for (int i = 0; i < gs; i++) d[i] = (unsigned char)QVAL(n, g * gs + i);
      } else {
        for (int c = 0; c < gs; c += 2 * VW)
          for (int i = 0; i < VW; i++)
            *d++ = (unsigned char)(QVAL(n, g * gs + c + i) | QVAL(n, g * gs + c + VW + i) << 4);
      }
    }
  }
#else
  size_t total = q->rbytes * (size_t)((N + QB - 1) / QB * QB);
  q->data = arena_alloc(total, &q->chunk);
  if (!q->data) { free(q); return -2; }
  for (int n0 = 0; n0 < N; n0 += QB)
    for (int g = 0; g < G; g++) {
      unsigned char *p = q->data + (size_t)n0 * q->rbytes + (size_t)g * QB * q->gbytes;
      float sb[2 * QB];
      for (int i = 0; i < QB; i++) {
        const int in = n0 + i < N;
        sb[i] = in ? scales[(size_t)(n0 + i) * G + g] : 0.f;
        sb[QB + i] = in ? biases[(size_t)(n0 + i) * G + g] : 0.f;
      }
      __builtin_memcpy(p, sb, sizeof sb);
      unsigned char *d = p + sizeof sb;
#define QV(i, e) (n0 + (i) < N ? QVAL(n0 + (i), e) : 0)
      for (int e = g * gs; e < (g + 1) * gs; e++)
        if (bits == 8)
          for (int i = 0; i < QB; i++) *d++ = (unsigned char)QV(i, e);
        else
          for (int i = 0; i < VW; i++) *d++ = (unsigned char)(QV(i, e) | QV(VW + i, e) << 4);
#undef QV
    }
#endif
#undef QVAL
  q->bytes = total;
  pthread_mutex_lock(&qmu);
  struct qmat *old = qunlink(key);
  if (qn == qcap) {
    struct qmat **grown = realloc(qs, (size_t)(qcap ? 2 * qcap : 256) * sizeof *qs);
    if (!grown) { pthread_mutex_unlock(&qmu); qfree(q); qfree(old); return -2; }
    qs = grown;
    qcap = qcap ? 2 * qcap : 256;
  }
  int at = qpos(key);
  __builtin_memmove(qs + at + 1, qs + at, (size_t)(qn - at) * sizeof *qs);
  qs[at] = q;
  qn++;
  atomic_fetch_add(&q_count, 1);
  atomic_fetch_add(&q_bytes, (long)total);
  pthread_mutex_unlock(&qmu);
  qfree(old);
  return 0;
}

/* Returns 1 if key was registered (now removed), else 0. */
int localai_quant_unregister(const float *key) {
  pthread_mutex_lock(&qmu);
  struct qmat *q = qunlink(key);
  pthread_mutex_unlock(&qmu);
  qfree(q);
  return q != NULL;
}

struct job { int M, N, K, lda, ldb, ldc, rows; float alpha, beta;
             const float *A, *B; float *C; const struct qmat *q;
             int mp; };
static struct job J;

/* ---- prompts from the twins without AVX-512: a packed product ----
   The 4-row kernels take 4 broadcasts of A and 8 FMAs per k of a block and convert
   the block's q values again for every 4 rows. For 16 rows and more: a block of QB
   weight rows at a time is dequantized to float32 once (an L1 block, PKC values of
   k, QB floats a k), and register tiles of PMR rows of A by the block's QB weight
   rows run over it: per k two loads of w and PMR broadcasts of A feed 2*PMR FMAs
   (12 chains, 15 of AVX2's 16 registers), A read in place. The rest of A's rows
   (M % PMR) take the 4-row passes. The same weights as the other kernels (scale*q
   + bias); each output sums its products in k order. Against the tile this replaced
   (16 rows of A, transposed once a product, by 6 weight rows; the third tile of a
   block wasted two of its six columns), one core of Zen 3, minimum of 4-6
   alternating runs: 3072x576 4-bit, 120 rows 5.9 -> 5.1 ms, 30 rows 1.62 -> 1.38
   ms; 576x1536, 120 rows 2.9 -> 2.4 ms, 30 rows 0.81 -> 0.62 ms. Below 16 rows the
   4-row passes stay faster (6, 8, 12 rows measured). */
#define PKC 256          /* a multiple of every group size */
#define PMR 6            /* rows of A a tile */
#define PACKED(M) (VW == 8 && (M) >= 2 * VW)

#if VW == 8
/* Groups [g0, g1) of the block at weight row n dequantized into w (k rows of QB). */
__attribute__((noinline)) static void qdeq_block(const struct qmat *q, int n, int g0,
                                                 int g1, float *w) {
  const size_t gst = QB * q->gbytes;
  const unsigned char *p = q->data + (size_t)n * q->rbytes + (size_t)g0 * gst;
  const int gs = q->gs;
  for (int g = g0; g < g1; g++, p += gst) {
    const float *sb = (const float *)p;
    const vf s0 = ld(sb), s1 = ld(sb + VW), b0 = ld(sb + 2 * VW), b1 = ld(sb + 3 * VW);
    const unsigned char *d = p + 4 * VW * sizeof(float);
    for (int u = 0; u < gs; u++, w += QB) {
      vf f0, f1;
      qk_values(&d, q->bits, &f0, &f1);
      st(w, f0 * s0 + b0);
      st(w + VW, f1 * s1 + b1);
    }
  }
}

/* The PMR x QB tile over kn values of k: acc[r][v][i] += sum_k a[r][k] * w[k][v*VW+i]
   (a: the tile's first row of A at its first k, rows lda apart; w: the block's k rows
   of QB). Its own function with named accumulators: inlined, or as an array, GCC
   spilled two. */
__attribute__((noinline)) static void ptile(const float *a, size_t lda, const float *w,
                                            size_t kn, vf acc[PMR][2]) {
  vf c00 = acc[0][0], c01 = acc[0][1], c10 = acc[1][0], c11 = acc[1][1],
     c20 = acc[2][0], c21 = acc[2][1], c30 = acc[3][0], c31 = acc[3][1],
     c40 = acc[4][0], c41 = acc[4][1], c50 = acc[5][0], c51 = acc[5][1];
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda,
              *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  for (size_t k = 0; k < kn; k++, w += QB) {
    vf w0 = ld(w), w1 = ld(w + VW), x;
    QKEEP(w0, w1);
#define PSTEP(r) x = a##r[k] - (vf){0}; c##r##0 += x * w0; c##r##1 += x * w1;
    PSTEP(0) PSTEP(1) PSTEP(2) PSTEP(3) PSTEP(4) PSTEP(5)
#undef PSTEP
  }
  acc[0][0] = c00; acc[0][1] = c01; acc[1][0] = c10; acc[1][1] = c11;
  acc[2][0] = c20; acc[2][1] = c21; acc[3][0] = c30; acc[3][1] = c31;
  acc[4][0] = c40; acc[4][1] = c41; acc[5][0] = c50; acc[5][1] = c51;
}

/* Output columns [n0, n1) (n0 at a block) for the first j->mp (<= QMAX_M, a multiple
   of PMR) rows of A. A block's weights are dequantized PKC values of k at a time:
   the block (PKC x QB floats, 16 KB) stays in L1 while every tile runs over it. */
static void qpacked(const struct job *j, int n0, int n1) {
  const int K = j->K, gs = j->q->gs, tiles = j->mp / PMR;
  float w[PKC * QB] __attribute__((aligned(64)));
  vf acc[QMAX_M / PMR][PMR][2];
  for (int n = n0; n < n1; n += QB) {
    const int nr = n1 - n < QB ? n1 - n : QB;
    /* the next block's weights on their way while these tiles compute: the hardware
       prefetcher sees no access to them until its dequantizing starts */
    if (n + QB < n1) {
      const unsigned char *p = j->q->data + (size_t)(n + QB) * j->q->rbytes;
      for (size_t o = 0; o < QB * j->q->rbytes; o += 64) __builtin_prefetch(p + o, 0, 2);
    }
    __builtin_memset(acc, 0, (size_t)tiles * sizeof *acc);
    for (int k0 = 0; k0 < K; k0 += PKC) {
      const int kn = K - k0 < PKC ? K - k0 : PKC;
      qdeq_block(j->q, n, k0 / gs, (k0 + kn) / gs, w);
      for (int t = 0; t < tiles; t++)
        ptile(j->A + (size_t)t * PMR * j->lda + k0, j->lda, w, kn, acc[t]);
    }
    for (int t = 0; t < tiles; t++)
      for (int r = 0; r < PMR; r++) {
        float o[QB];
        st(o, acc[t][r][0]);
        st(o + VW, acc[t][r][1]);
        float *c = j->C + (size_t)(t * PMR + r) * j->ldc + n;
        for (int i = 0; i < nr; i++)
          c[i] = j->beta == 0.f ? j->alpha * o[i] : j->alpha * o[i] + j->beta * c[i];
      }
  }
}
#else
#define qpacked(j, n0, n1) ((void)0)   /* PACKED() is never true */
#endif

/* rows [n0, n1) of the output, all M rows of A, in passes of at most 4 rows (the
   block of B stays in L2 between passes), after the packed product's j->mp rows. */
static void run_rows(const struct job *j, int n0, int n1) {
  if (j->q) {                        /* a quantized twin */
    const qk_t *k = qkernels[j->q->gs == 32][j->q->bits == 8];
    if (j->mp) qpacked(j, n0, n1);
    for (int m0 = j->mp; m0 < j->M; m0 += QPASS) {
      int mm = j->M - m0 < QPASS ? j->M - m0 : QPASS;
      k[mm - 1](j->q, n0, n1, j->alpha, j->A + (size_t)m0 * j->lda, j->lda, j->beta,
                j->C + (size_t)m0 * j->ldc, j->ldc);
    }
    return;
  }
  for (int m0 = 0; m0 < j->M; m0 += 4) {
    int mm = j->M - m0 < 4 ? j->M - m0 : 4;
    const float *A = j->A + (size_t)m0 * j->lda, *B = j->B + (size_t)n0 * j->ldb;
    float *C = j->C + (size_t)m0 * j->ldc + n0;
    int N = n1 - n0;
    switch (mm) {
      case 1: small_1(N, j->K, j->alpha, A, j->lda, B, j->ldb, j->beta, C, j->ldc); break;
      case 2: small_2(N, j->K, j->alpha, A, j->lda, B, j->ldb, j->beta, C, j->ldc); break;
      case 3: small_3(N, j->K, j->alpha, A, j->lda, B, j->ldb, j->beta, C, j->ldc); break;
      default: small_4(N, j->K, j->alpha, A, j->lda, B, j->ldb, j->beta, C, j->ldc); break;
    }
  }
}

/* ---- one helper thread that takes blocks of rows when it is awake ----
   The caller publishes a job as a ticket (generation | blocks | next block) and
   takes blocks itself; the helper claims blocks with a compare-and-swap on the same
   ticket. The caller never waits for a helper that has not started: it only waits
   for blocks the helper actually claimed, so a descheduled helper costs nothing. */
#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() do { } while (0)
#endif
#define GEN_SHIFT 40
#define TOT_SHIFT 20
#define FIELD 0xFFFFFull
static _Atomic unsigned long long ticket;
static _Atomic int done_blocks;
static _Atomic int helper_sleeping;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int helpers = 0;
static unsigned long long gen;
static int spin_limit = VW == 16 ? 500 : 2000;    /* ~12 us of pauses (~23 ns each
   on Zen 5), then sleep: longer spinning keeps the core from the Python thread, which
   (SCHED_BATCH, see graph_thread) no longer preempts the helper to get it; the
   helper's wake-up does preempt Python. A step of 2 / 4 / 8 streams with 2000 spins:
   6.07 / 7.85 / 12.33 ms, with 500: 5.27 / 7.45 / 12.17 (one process, alternating);
   100 was slower (8.3 ms at 4 streams), and 20000 before that too. With AVX2 (Zen 3,
   ~29 ns a pause) products and the gaps between them take about twice as long, and
   2000 let the helper catch more of them (4 streams ~149 -> ~153-163 tok/s). With
   AVX-512 on a machine whose single core reads slowly, Python sets 2000 too
   (mlx_setup._share_one_row). */
void localai_helper_spin(long pauses) { spin_limit = (int)pauses; }
/* One row from a quantized twin takes the helper only without AVX-512, and only for
   products of at least this many weights (gate|up, the head). With AVX-512 a decode
   step of one stream has ~3 ms of kernels, where a woken helper competes with Python
   building the next step (8.6 -> 6.8 ms a token without it). With AVX2 the kernel is
   bound by dequantizing at half the width, ~15 ms a token on one core: sharing the
   big products took one stream ~53 -> ~66 tok/s on Zen 3 (medians of 8 rounds,
   alternating in one process); sharing every product (100k weights) was slower.
   With AVX-512 on a machine whose single core reads memory slowly, Python sets a
   limit (mlx_setup._share_one_row). */
static long help_one_row = VW == 16 ? (1L << 62) : 1000000L;
void localai_share_one_row(long min_weights) { help_one_row = min_weights; }

static int claim(unsigned long long g) {
  unsigned long long v = atomic_load(&ticket);
  for (;;) {
    if ((v >> GEN_SHIFT) != g) return -1;
    unsigned long long idx = v & FIELD, tot = (v >> TOT_SHIFT) & FIELD;
    if (idx >= tot) return -1;
    if (atomic_compare_exchange_weak(&ticket, &v, v + 1)) return (int)idx;
  }
}

static void do_blocks(unsigned long long g) {
  int b;
  while ((b = claim(g)) >= 0) {
    int n0 = b * J.rows, n1 = n0 + J.rows < J.N ? n0 + J.rows : J.N;
    run_rows(&J, n0, n1);
    atomic_fetch_add(&done_blocks, 1);
  }
}

static int has_work(unsigned long long v, unsigned long long last) {
  return (v >> GEN_SHIFT) != last && (v & FIELD) < ((v >> TOT_SHIFT) & FIELD);
}

static void *helper(void *arg) {
  (void)arg;
  unsigned long long last = 0;
  for (;;) {
    unsigned long long v = atomic_load(&ticket);
    int spins = 0;
    while (!has_work(v, last)) {
      if (++spins < spin_limit) {
        cpu_relax();
      } else {
        pthread_mutex_lock(&mu);
        atomic_store(&helper_sleeping, 1);
        v = atomic_load(&ticket);
        if (!has_work(v, last)) pthread_cond_wait(&cv, &mu);
        atomic_store(&helper_sleeping, 0);
        pthread_mutex_unlock(&mu);
        spins = 0;
      }
      v = atomic_load(&ticket);
    }
    last = v >> GEN_SHIFT;
    do_blocks(last);
  }
  return NULL;
}

static atomic_flag in_use = ATOMIC_FLAG_INIT;

static void small_gemm(int M, int N, int K, float alpha, const float *A, int lda,
                       const float *B, int ldb, float beta, float *C, int ldc,
                       const struct qmat *q) {
  struct job j = {M, N, K, lda, ldb, ldc, N, alpha, beta, A, B, C, q, 0};
  if (q && PACKED(M)) j.mp = M / PMR * PMR;   /* whole tiles; the rest in 4-row passes */
  /* Small products, no helper, one row from a quantized twin (but see help_one_row),
     or another thread (a second MLX stream) already sharing the helper: do it all
     here. */
  if (helpers == 0 || (long)N * K < 65536 || (M == 1 && q && (long)N * K < help_one_row)
      || atomic_flag_test_and_set(&in_use)) {
    run_rows(&j, 0, N);
    return;
  }
  int rows = 65536 / K;              /* a block of B: ~256 KB, stays in L2 */
  if (rows < 8) rows = 8;
  if (q) rows = (rows + QALIGN - 1) / QALIGN * QALIGN;  /* the twin's pairs or blocks */
  int blocks = (N + rows - 1) / rows;
  if (blocks > (int)FIELD) {
    run_rows(&j, 0, N);
    atomic_flag_clear(&in_use);
    return;
  }
  j.rows = rows;
  J = j;
  atomic_store(&done_blocks, 0);
  gen = (gen + 1) & 0xFFFFFF;
  if (gen == 0) gen = 1;
  atomic_store(&ticket, (gen << GEN_SHIFT) | ((unsigned long long)blocks << TOT_SHIFT));
  if (atomic_load(&helper_sleeping)) {
    pthread_mutex_lock(&mu);
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
  }
  do_blocks(gen);
  while (atomic_load(&done_blocks) < blocks) cpu_relax();
  atomic_flag_clear(&in_use);
}

int localai_blas_init(const char *path, int smax, int nhelpers) {
  void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  if (!h) return -1;
  real_sgemm = (sgemm_t)dlsym(h, "cblas_sgemm");
  real_sgemv = (sgemv_t)dlsym(h, "cblas_sgemv");
  if (!real_sgemm || !real_sgemv) return -2;
  small_max = smax;
  if (nhelpers > 0 && helpers == 0) {
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &at, helper, NULL) == 0) helpers = 1;
    pthread_attr_destroy(&at);
  }
  return 0;
}
long localai_blas_count(int which) {
  switch (which) {
    case 0: return n_calls;
    case 1: return n_gemv;
    case 2: return n_small;
    case 3: return helpers;
    case 4: return n_quant;          /* products served by a quantized twin */
    case 5: return q_count;          /* matrices registered */
    case 6: return q_bytes;          /* bytes their twins take */
    case 8: return VW;               /* floats a vector: 16 AVX-512, 8 otherwise */
    case 10: return spin_limit;      /* pauses the helper spins before it sleeps */
    default: return qmax_m;          /* the most rows of A a twin serves */
  }
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta,
                 float *C, int ldc) {
  atomic_fetch_add_explicit(&n_calls, 1, memory_order_relaxed);
  struct qmat q;
  if (order == RowMajor && ta == NoTrans && tb == Trans && M >= 1 && M <= qmax_m
      && ldc >= N && qfind(B, N, K, ldb, &q)) {
    atomic_fetch_add_explicit(&n_quant, 1, memory_order_relaxed);
    small_gemm(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, &q);
    return;
  }
  if (order == RowMajor && ta == NoTrans && M == 1) {
    atomic_fetch_add_explicit(&n_gemv, 1, memory_order_relaxed);  /* one row: y = op(B)^T x, a matrix-vector product */
    if (tb == Trans)
      real_sgemv(RowMajor, NoTrans, N, K, alpha, B, ldb, A, 1, beta, C, 1);
    else
      real_sgemv(RowMajor, Trans, K, N, alpha, B, ldb, A, 1, beta, C, 1);
    return;
  }
  if (order == RowMajor && ta == NoTrans && tb == Trans && M >= 2 && M <= small_max
      && ldc >= N) {
    atomic_fetch_add_explicit(&n_small, 1, memory_order_relaxed);
    small_gemm(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL);
    return;
  }
  if (order == RowMajor && ta == NoTrans && tb == NoTrans && M >= 2 && M <= small_max
      && ldc >= N && (long)K * N <= (1L << 22)) {
    atomic_fetch_add_explicit(&n_small, 1, memory_order_relaxed);
    small_nn(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
"""

_lock = threading.Lock()
_configured = False
_shim = None           # the loaded shim (ctypes.CDLL), if any
_openblas = None       # the loaded OpenBLAS (ctypes.CDLL), if any
_state = {             # what configure() chose; describe() reports it
    "device": "unknown",
    "blas": "mlx default",
    "blas_threads": None,
    "shim": False,
    "reasons": [],
}
_prepared = {}         # id(model) -> what prepare() chose for it
_graph_batched = {}    # thread id -> True while graph_thread() has it SCHED_BATCH
_last_prepared = None


# --- settings -------------------------------------------------------------------------
def _setting(config, name, default=None):
    """A switch: the environment wins over the config attribute, then the default."""
    env = os.environ.get("LOCALAI_" + name.upper())
    if env not in (None, ""):
        return env
    val = getattr(config, name.lower(), None) if config is not None else None
    return default if val in (None, "") else val


def parse_size(text):
    """Bytes from "123", "512M", "4G", "1.5GiB", "2GB" (binary multiples)."""
    s = str(text).strip().upper().replace(" ", "")
    for suffix in ("IB", "B"):
        if s.endswith(suffix) and len(s) > len(suffix) and not s[-len(suffix) - 1].isdigit():
            s = s[: -len(suffix)]
            break
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    if s.endswith("B"):
        s = s[:-1]
    return int(float(s))


def _physical_ram():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _mb(n):
    return f"{n / (1 << 20):.0f} MB"


# --- the process's malloc ----------------------------------------------------------------
def allocator_env(environ=None):
    """The environment to restart this process with so that jemalloc is its malloc, or
    None (not Linux, not installed, already preloaded, LOCALAI_MALLOC=system, or a
    restart already tried).

    Why: for every op (~1,400 a decoded token) MLX's Python-side thread allocates the
    task and MLX's stream thread frees it. glibc's malloc locks an arena for such
    frees, and the two threads put each other to sleep on that lock ~450 times a
    token (futex calls per token halved with jemalloc; decode ~8-10% faster, batches
    too; measured with mimalloc and tcmalloc alike). A malloc must be in the process
    from its first instruction, so localai.py restarts itself once with LD_PRELOAD."""
    env = dict(os.environ if environ is None else environ)
    if (sys.platform != "linux" or env.get("LOCALAI_MALLOC_RESTARTED")
            or str(env.get("LOCALAI_MALLOC", "auto")).lower() in ("system", "off", "0", "no")
            or "jemalloc" in env.get("LD_PRELOAD", "")):
        return None
    path = find_jemalloc()
    if path is None:
        return None
    env["LD_PRELOAD"] = " ".join(x for x in (path, env.get("LD_PRELOAD", "")) if x)
    env["LOCALAI_MALLOC_RESTARTED"] = "1"
    return env


def find_jemalloc():
    """The installed jemalloc library's path, or None."""
    return next((p for p in JEMALLOC_CANDIDATES if os.path.exists(p)), None)


def _malloc_in_use():
    """'jemalloc' if it is this process's malloc, else 'system'."""
    try:
        with open("/proc/self/maps") as f:
            return "jemalloc" if "libjemalloc" in f.read() else "system"
    except OSError:
        return "system"


# --- configure: BLAS before mlx is imported ---------------------------------------------
def configure(config=None):
    """Choose and load the BLAS MLX will call. Call before the first `import mlx`;
    later calls do nothing. Never raises: a failure leaves MLX's default BLAS and a
    reason in describe()."""
    global _configured
    with _lock:
        if _configured:
            return
        _configured = True
        try:
            _configure(config)
        except Exception as e:  # a faster BLAS is an optimisation, never a failure
            _state["reasons"].append(f"BLAS setup failed ({type(e).__name__}: {e}); "
                                     "MLX's default BLAS is used")
        _verify()
        if sys.platform == "linux" and _state["device"] == "cpu" and hasattr(os, "SCHED_BATCH"):
            _state["graph_thread"] = "SCHED_BATCH while batching"
            _state["reasons"].append(
                "the Python thread that builds MLX's graphs runs as SCHED_BATCH while it "
                "steps a batch: its ~65 wake-ups a token no longer preempt MLX's stream "
                "thread mid-product")


def _configure(config):
    reasons = _state["reasons"]
    mode = str(_setting(config, "mlx_blas", "auto")).lower()
    if mode in ("off", "0", "no", "none", "default"):
        reasons.append("BLAS preload disabled (LOCALAI_MLX_BLAS=off)")
        return
    if sys.platform != "linux":
        reasons.append(f"{sys.platform}: MLX's own BLAS (Accelerate on macOS) is used")
        return
    _state["malloc"] = _malloc_in_use()
    reasons.append("malloc: jemalloc, preloaded at start (MLX's stream thread frees what "
                   "the Python thread allocates; glibc's arena lock made them wait)"
                   if _state["malloc"] == "jemalloc" else
                   "malloc: the system's (jemalloc frees across threads faster: Debian "
                   "libjemalloc2, used when localai.py starts)")
    if "mlx.core" in sys.modules:
        reasons.append("mlx was imported before configure(): its BLAS is already bound")
        return
    path = _find_openblas()
    if path is None:
        reasons.append("no system OpenBLAS found (Debian: apt install libopenblas0-pthread); "
                       "MLX's bundled reference BLAS is slow")
        return
    threads = int(_setting(config, "blas_threads", 0) or 0)
    if not threads:
        threads = _cpus()
        busy = _others_cpu_use() if threads > 1 else 0.0
        if busy >= BUSY_CORES:
            # Measured under load ~5 on 2 cores: one thread gave prefill 236-251 vs
            # 181-204 tok/s and 4 streams 47-67 vs 37-39 tok/s; a thread that is
            # descheduled makes the other wait at every split product.
            reasons.append(f"other processes were using {busy:.1f} of {_cpus()} CPUs: one "
                           "BLAS thread (LOCALAI_BLAS_THREADS overrides)")
            threads = 1
    # OpenBLAS reads these when it loads; an operator's own setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    _state["blas_threads"] = int(os.environ["OPENBLAS_NUM_THREADS"])
    if _has_avx512() and "OPENBLAS_CORETYPE" not in os.environ:
        # OpenBLAS 0.3.21 (Debian 12) does not know AMD Zen 4 and falls back to its
        # AVX2 "Haswell" kernels; its AVX-512 "SkylakeX" ones run the prefill gemms
        # 1.8x faster here (1000x576x1536: 6.9 -> 3.8 ms). Only when the CPU has them.
        os.environ["OPENBLAS_CORETYPE"] = "SKYLAKEX"
        reasons.append("CPU has AVX-512: OpenBLAS told to use its SkylakeX kernels")
    if mode == "auto":
        _native_jit()
        lib = _build_shim()
        if lib is not None:
            _load_with_shim(lib, path)
            return
    _load_openblas(path)


def _native_jit():
    """MLX compiles mx.compile's fused CPU kernels by running `g++ ... -shared` from
    PATH, with no -march (the Linux wheel targets any x86-64), so every multiply-add
    in them is a call to libm's fmaf: the decode step's SiLU took ~16 ns an element.
    A private `g++` first on PATH adds JIT_FLAGS (kernels are built and cached on
    this machine only, in MLX's temp directory): -march=native (a batch-of-4 step
    ~2 ms faster); -finline-limit and -fno-trapping-math let GCC inline MLX's exp
    and vectorize the loop around it (its selects may then run unconditionally),
    -fno-math-errno the rms_norm loop around sqrt (which no longer sets errno), and
    -ffp-contract=off keeps a*b+c two roundings as in MLX's own build (with
    -march=native GCC fused them: rms_norm differed in the last bit). The same bits
    as MLX's build (tests/test_mlx_setup.py checks): SiLU of 4 x 1536 45.6 -> 13.9 us,
    a batch-of-4 step ~1.5 ms faster."""
    d = _cache_dir() / "jit-bin"
    # PATH without our wrapper (a child process inherits it from its parent)
    path = [x for x in os.environ.get("PATH", "").split(os.pathsep) if x and Path(x) != d]
    gxx = shutil.which("g++", path=os.pathsep.join(path))
    if not gxx or "-march=native" in Path(gxx).read_bytes()[:200].decode("latin-1"):
        return
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _private(d) or not _private(d.parent):
            return
        script = d / "g++"
        text = f'#!/bin/sh\nexec "{gxx}" {JIT_FLAGS} "$@"\n'
        if not script.is_file() or script.read_text() != text:
            tmp = d / f".g++.{os.getpid()}"
            tmp.write_text(text)
            tmp.chmod(0o700)
            os.replace(tmp, script)
        if not _private(script):
            return
    except OSError:
        return
    os.environ["PATH"] = os.pathsep.join([str(d)] + path)
    _forget_stale_kernels()
    _state["reasons"].append("MLX's compiled CPU kernels are built with -march=native, "
                             "vectorized exp (a g++ wrapper first on PATH)")


def _forget_stale_kernels():
    """MLX caches its compiled kernels by name only (in <tmp>/mlx/<version>/cpu), so
    kernels built before the wrapper or with other flags would stay in use: remove
    this user's cached ones once when the flags change (MLX rebuilds on demand)."""
    root = Path(tempfile.gettempdir()) / "mlx"
    for cpu in root.glob("*/cpu"):
        try:
            if cpu.stat().st_uid != os.getuid():
                continue
            mark = cpu / ".localai-jit-flags"
            if mark.is_file() and mark.read_text() == JIT_FLAGS:
                continue
            for f in cpu.iterdir():
                if f.suffix in (".so", ".cpp") and f.stat().st_uid == os.getuid():
                    f.unlink()
            mark.write_text(JIT_FLAGS)
        except OSError:
            continue


def _cpu_times():
    """(all CPUs' jiffies, their idle jiffies, this process's jiffies)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:9]]
    with open("/proc/self/stat") as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    return sum(vals), vals[3] + vals[4], int(fields[11]) + int(fields[12])


def _others_cpu_use(interval=BUSY_SAMPLE_SECONDS):
    """CPUs' worth of work other processes are doing right now (0.0 if unknown)."""
    try:
        t0, i0, s0 = _cpu_times()
        time.sleep(interval)
        t1, i1, s1 = _cpu_times()
        ncpu = os.cpu_count() or 1
        dt = t1 - t0
        if dt <= 0:
            return 0.0
        return max(0.0, ((dt - (i1 - i0)) - (s1 - s0)) / dt * ncpu)
    except (OSError, ValueError, IndexError):
        return 0.0


def graph_thread(batched):
    """The thread that builds MLX's graphs (the language engine's) calls this before
    each step. On a Linux CPU it runs as SCHED_BATCH while it steps two or more
    sequences: the same share of the CPU, but its wake-ups no longer preempt the
    threads doing the arithmetic (item 4 above). One sequence keeps the normal
    policy: measured with AVX-512, where the helper sits out one-row products, there
    was nothing to gain and one stream over HTTP decoded less evenly (with AVX2 the
    helper shares one stream's big products; not measured there as SCHED_BATCH).
    configure() decides whether this
    applies (describe()'s "graph_thread"). Never raises."""
    tid = threading.get_ident()
    if "graph_thread" not in _state or _graph_batched.get(tid, False) == batched:
        return
    _graph_batched[tid] = batched           # also on failure: not retried every step
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH if batched else os.SCHED_OTHER,
                              os.sched_param(0))
    except OSError as e:
        if not _state["graph_thread"].startswith("normal"):
            _state["reasons"].append(f"the graph thread stays at the normal policy: {e.strerror}")
        _state["graph_thread"] = f"normal ({e.strerror})"


def _has_avx512():
    flags = set(_cpu_signature().split())
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags


def _find_openblas():
    for p in OPENBLAS_CANDIDATES:
        if os.path.exists(p):
            return p
    name = ctypes.util.find_library("openblas")
    return name


def _load_openblas(path):
    global _openblas
    _openblas = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _state["blas"] = f"OpenBLAS ({path})"
    _state["reasons"].append("system OpenBLAS preloaded ahead of the wheel's reference BLAS")
    _describe_openblas()


def _load_with_shim(lib, path):
    global _shim, _openblas
    shim = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    shim.localai_blas_init.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    shim.localai_blas_count.restype = ctypes.c_long
    # One helper thread for the small-M kernel when we may use two cores or more; it
    # only takes blocks when awake, so a busy machine never makes the caller wait.
    helpers = 1 if (_state["blas_threads"] or 1) >= 2 else 0
    rc = shim.localai_blas_init(os.fsencode(path), SMALL_M, helpers)
    if rc != 0:
        _state["reasons"].append(f"BLAS shim could not bind OpenBLAS (rc {rc})")
        _load_openblas(path)
        return
    _shim = shim
    _openblas = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # already loaded: a handle
    # Kernels narrower than AVX-512's also share one stream's big products with the
    # helper (help_one_row in the shim).
    shared = ""
    if helpers:
        shared = (" (batches shared with a helper thread)" if shim.localai_blas_count(8) >= 16
                  else " (batches, and one stream's big products with these AVX2 kernels, "
                       "shared with a helper thread)")
    limit = ""
    if (shim.localai_blas_count(8) >= 16
            and os.environ.get("OPENBLAS_CORETYPE", "").upper() == "SKYLAKEX"):
        shim.localai_quant_max_rows(QUANT_MAX_ROWS_AVX512)
        limit = " (more rows: OpenBLAS's AVX-512 sgemm is faster)"
    _state["blas"] = f"OpenBLAS ({path}) via localai shim"
    _state["shim"] = True
    _state["reasons"].append(
        f"system OpenBLAS preloaded; shim computes 1..{shim.localai_blas_count(7)}-row "
        "products of a model's registered matrices (and of their rows) from their "
        f"quantized twins{limit}, other one-row products with "
        f"sgemv and 2..{SMALL_M}-row ones with its own kernels" + shared)
    _describe_openblas()


def _describe_openblas():
    try:
        _openblas.openblas_get_corename.restype = ctypes.c_char_p
        _state["blas_core"] = _openblas.openblas_get_corename().decode()
        _state["blas_threads"] = int(_openblas.openblas_get_num_threads())
    except (AttributeError, OSError):
        pass


def _cache_dir():
    base = os.environ.get("LOCALAI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "localai")
    return Path(base) / "mlx_setup"


def _cpu_signature():
    """Flags line of /proc/cpuinfo: the shim is built with -march=native, so a cache
    shared between different CPUs must not hand one CPU another's binary."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _private(path):
    """True when path is ours and nobody else can write it: we load code from it,
    so a directory someone else made (e.g. in /tmp) must never be trusted."""
    st = os.lstat(path)
    import stat
    return (not stat.S_ISLNK(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & 0o022)


def _build_shim():
    """Path of the compiled shim (built once per source+CPU), or None."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        _state["reasons"].append("no C compiler: BLAS shim skipped")
        return None
    flags = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]
    key = hashlib.sha256((_SHIM_C + " ".join(flags) + _cpu_signature()
                          + platform.machine()).encode()).hexdigest()[:16]
    for d in (_cache_dir(), Path(tempfile.gettempdir()) / f"localai-{os.getuid()}"):
        lib = d / f"libblasshim-{key}.so"
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not _private(d):
                continue
            if lib.is_file():
                if _private(lib):
                    return lib
                continue
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                src = Path(tmp) / "shim.c"
                out = Path(tmp) / "shim.so"
                src.write_text(_SHIM_C)
                # -march=native first (AVX-512 here); a compiler that refuses it
                # still builds a portable one.
                for fl in (flags, [f for f in flags if f != "-march=native"]):
                    r = subprocess.run([cc, *fl, "-o", str(out), str(src), "-ldl"],
                                       stdin=subprocess.DEVNULL, capture_output=True,
                                       timeout=COMPILE_TIMEOUT)
                    if r.returncode == 0 and out.is_file():
                        break
                if r.returncode != 0 or not out.is_file():
                    _state["reasons"].append(
                        "BLAS shim did not compile: "
                        + r.stderr.decode(errors="replace").strip()[:200])
                    return None
                os.replace(out, lib)  # atomic: concurrent starts never see half a file
            return lib
        except (OSError, subprocess.SubprocessError):
            continue
    _state["reasons"].append("no writable cache directory for the BLAS shim")
    return None


def _verify():
    """Import mlx and prove which BLAS its float32 matmul reaches (counter in the shim,
    and the speed of a gemm that netlib cannot reach)."""
    try:
        import mlx.core as mx
    except ImportError:
        _state["device"] = "unavailable"
        return
    dev = mx.default_device()
    _state["device"] = "gpu" if dev == mx.gpu else "cpu"
    try:
        with mx.stream(mx.cpu):
            a = mx.ones((VERIFY_N, VERIFY_N))
            mx.eval(a @ a)
            before = _shim.localai_blas_count(0) if _shim is not None else 0
            t0 = time.perf_counter()
            mx.eval(a @ a)
            dt = time.perf_counter() - t0
            x = mx.ones((1, VERIFY_N))
            mx.eval(x @ a)
        _state["gemm_gflops"] = round(2 * VERIFY_N ** 3 / dt / 1e9, 1)
        if _shim is not None:
            _state["shim_helpers"] = _shim_helpers()
            calls = _shim.localai_blas_count(0) - before
            gemv = _shim.localai_blas_count(1)
            if calls <= 0 or gemv <= 0:
                _state["reasons"].append("shim loaded but MLX did not call it")
                _state["shim"] = False
    except Exception as e:
        _state["reasons"].append(f"BLAS check failed: {type(e).__name__}: {e}")


def blas_calls():
    """(all sgemm calls, routed to sgemv, routed to the small-M kernel) seen by the
    shim, or None without it. For tests and the benchmark."""
    if _shim is None:
        return None
    return tuple(int(_shim.localai_blas_count(i)) for i in range(3))


# --- quantized twins: decode products read the quantized weights (issue 8) ---------------
# A decode step reads every weight matrix once per token; float32 is 4 bytes a weight,
# MLX's affine-quantized form 0.6-1.25. The shim keeps a copy of the quantized form of
# a registered float32 matrix and serves `x @ w32.T` (or of a view of rows of it) from
# it when x has up to quantized_calls()["max_rows"] rows; longer products (long
# prompts) keep the float32 BLAS path.
QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
_quant = {}                    # data pointer of a registered float32 matrix -> the matrix
_quant_lock = threading.Lock()


def _quant_lib():
    if _shim is None or not hasattr(_shim, "localai_quant_register"):
        return None
    if _shim.localai_quant_register.argtypes is None:
        p = ctypes.c_void_p
        _shim.localai_quant_register.argtypes = [p, ctypes.c_int, ctypes.c_int,
                                                 ctypes.c_int, ctypes.c_int, p, p, p]
        _shim.localai_quant_register.restype = ctypes.c_int
        _shim.localai_quant_unregister.argtypes = [p]
        _shim.localai_quant_unregister.restype = ctypes.c_int
    return _shim


def _data_pointer(w32):
    """Address of a row-contiguous float32 2-D mx.array's own buffer, or None (a numpy
    view of it, never a copy: copy=False raises if one would be needed)."""
    import numpy as np
    try:
        view = np.array(w32, copy=False)
    except (ValueError, TypeError, RuntimeError):
        return None
    if (view.dtype != np.float32 or view.ndim != 2 or not view.flags.c_contiguous
            or view.flags.owndata):
        return None
    return view.ctypes.data


def register_quantized(w32, packed, scales, biases, bits, group_size):
    """Serve `x @ w32.T` (x of 1..max_rows rows), and the same product with a view of
    rows r0.. of w32 (r0 even, the view's rows even or reaching w32's end), from the
    quantized triple of the same matrix.

    w32: evaluated, row-contiguous float32 mx.array (N, K). packed: uint32 (N,
    K*bits/32); scales, biases: (N, K/group_size), float16/bfloat16/float32 (MLX affine
    quantization: w = scale * q + bias per group). The shim copies them (scales and
    biases as float32) and keeps a reference to w32 so its buffer, the key, cannot be
    freed and its address reused while registered. Call while no product runs on w32.
    Returns False, registering nothing, without the shim or for an unsupported form
    (bits 4/8, group sizes 32/64/128, K a multiple of group_size)."""
    lib = _quant_lib()
    if lib is None or bits not in QUANT_BITS or group_size not in QUANT_GROUP_SIZES:
        return False
    import mlx.core as mx
    import numpy as np
    if biases is None or w32.dtype != mx.float32 or w32.ndim != 2:
        return False
    n, k = w32.shape
    if (k % group_size or tuple(packed.shape) != (n, k * bits // 32)
            or packed.dtype != mx.uint32 or tuple(scales.shape) != (n, k // group_size)
            or tuple(biases.shape) != (n, k // group_size)):
        return False
    ptr = _data_pointer(w32)
    if ptr is None:
        return False
    q = np.ascontiguousarray(np.array(packed), dtype=np.uint32)
    s = np.ascontiguousarray(np.array(scales.astype(mx.float32)), dtype=np.float32)
    b = np.ascontiguousarray(np.array(biases.astype(mx.float32)), dtype=np.float32)
    with _quant_lock:
        rc = lib.localai_quant_register(ptr, n, k, bits, group_size, q.ctypes.data,
                                        s.ctypes.data, b.ctypes.data)
        if rc != 0:
            return False
        _quant[ptr] = w32
    return True


def unregister(w32):
    """Forget w32's quantized twin (C side first, then our reference). True if it had
    one. Call while no product runs on w32."""
    lib = _quant_lib()
    ptr = _data_pointer(w32) if lib is not None else None
    with _quant_lock:
        if ptr is None or ptr not in _quant:
            return False
        lib.localai_quant_unregister(ptr)
        del _quant[ptr]
    return True


def unregister_all():
    """Forget every quantized twin; returns how many there were."""
    lib = _quant_lib()
    with _quant_lock:
        count = len(_quant)
        for ptr in list(_quant):
            lib.localai_quant_unregister(ptr)
            del _quant[ptr]
    return count


def quantized_calls():
    """{"calls": products served by a quantized twin, "matrices": registered,
    "bytes": their twins' size, "max_rows": the most rows of x a twin serves}, or None
    without the shim."""
    if _quant_lib() is None:
        return None
    return {"calls": int(_shim.localai_blas_count(4)),
            "matrices": int(_shim.localai_blas_count(5)),
            "bytes": int(_shim.localai_blas_count(6)),
            "max_rows": int(_shim.localai_blas_count(7))}


def _shim_helpers():
    return int(_shim.localai_blas_count(3)) if _shim is not None else 0


# --- prepare: the dtype the weights run in ----------------------------------------------
def memory_budget(config=None):
    """Bytes a float32 copy of a model's weights may take."""
    val = _setting(config, "mlx_memory_budget", None)
    if val is None:
        return int(_physical_ram() * DEFAULT_BUDGET_FRACTION)
    return parse_size(val)


def _float32_bytes(model):
    """Bytes the model's weights take once every quantized matrix is float32."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    quantized = {name: m for name, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    total = 0
    for key, v in tree_flatten(model.parameters()):
        owner, _, leaf = key.rpartition(".")
        q = quantized.get(owner)
        if q is None:
            total += v.size * 4
        elif leaf == "weight":
            total += v.size * 32 // q.bits * 4     # packed uint32 -> elements
        elif leaf not in ("scales", "biases"):
            total += v.size * 4
    return total


def _weights_bytes(model):
    from mlx.utils import tree_flatten
    return sum(v.nbytes for _k, v in tree_flatten(model.parameters()))


def prepare(model, info=None, config=None):
    """Choose the dtype the weights run in on this device; returns the model (changed
    in place). On a CPU: float32 when the copy fits the memory budget."""
    global _last_prepared
    import mlx.core as mx
    import mlx.nn as nn

    t0 = time.perf_counter()
    chosen = {"model": getattr(info, "id", None), "reasons": []}
    reasons = chosen["reasons"]
    on_gpu = mx.default_device() == mx.gpu
    chosen["device"] = "gpu" if on_gpu else "cpu"
    quantized = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    before = _weights_bytes(model)
    chosen["weights_bytes_before"] = before
    twins = {}
    want = str(_setting(config, "mlx_dtype", "auto")).lower()
    dtypes = sorted({str(v.dtype).replace("mlx.core.", "")
                     for v in _leaves(model) if v.dtype in (mx.float16, mx.bfloat16, mx.float32)})
    if want == "keep":
        reasons.append("LOCALAI_MLX_DTYPE=keep: weights as stored")
    elif on_gpu and want != "float32":
        reasons.append("GPU: quantized/half-precision kernels are the fast path there")
    else:
        need = _float32_bytes(model)
        budget = memory_budget(config)
        chosen["float32_bytes"] = need
        chosen["memory_budget"] = budget
        if need > budget:
            reasons.append(f"float32 copy ({_mb(need)}) over the memory budget "
                           f"({_mb(budget)}, LOCALAI_MLX_MEMORY_BUDGET): weights kept as "
                           "stored (slower on a CPU)")
        elif quantized or any(d != "float32" for d in dtypes):
            twins = _to_float32(model, quantized)
            reasons.append(
                f"CPU: weights dequantized/cast to float32 ({_mb(need)} <= budget "
                f"{_mb(budget)}): float32 BLAS beats MLX's CPU quantized and half "
                "matmuls several times")
        else:
            reasons.append("weights already float32")
        if not on_gpu and str(_setting(config, "mlx_decode", "auto")).lower() != "off":
            _fast_decode(model, twins, chosen)
    quant_left = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    after_dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for v in _leaves(model)
                           if v.dtype in (mx.float16, mx.bfloat16, mx.float32)})
    chosen["dtype"] = ("quantized+" if quant_left else "") + "/".join(after_dtypes or ["?"])
    if quantized and quant_left:
        q = quantized[0][1]
        chosen["dtype"] = f"{q.bits}-bit quantized (" + "/".join(after_dtypes) + ")"
    chosen["weights_bytes"] = _weights_bytes(model)
    chosen["prepare_seconds"] = round(time.perf_counter() - t0, 3)
    _prepared[id(model)] = chosen
    _last_prepared = chosen
    return model


def _leaves(model):
    from mlx.utils import tree_flatten
    return [v for _k, v in tree_flatten(model.parameters())]


def _to_float32(model, quantized):
    """Replace quantized layers by float32 ones holding the exact dequantized values,
    one layer at a time (the peak is one layer, not a second model), then cast the
    remaining floating parameters to float32."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    new, twins = [], {}
    for name, module in quantized:
        if getattr(module, "mode", "affine") == "affine" and "biases" in module:
            twins[name] = (module.weight, module.scales, module.biases, module.bits,
                           module.group_size)
        # float32 scales and biases: with float16 ones mx.dequantize rounds every
        # weight to float16 even for a float32 result; scale*q + bias exact in
        # float32 is what llama.cpp computes, and what the shim's twins compute.
        biases = module.get("biases")
        w = mx.dequantize(module.weight, module.scales.astype(mx.float32),
                          None if biases is None else biases.astype(mx.float32),
                          group_size=module.group_size, bits=module.bits,
                          mode=getattr(module, "mode", "affine"), dtype=mx.float32)
        mx.eval(w)
        if isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(w.shape[0], w.shape[1])
        else:
            has_bias = "bias" in module
            layer = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
            if has_bias:
                layer.bias = module.bias.astype(mx.float32)
        layer.weight = w
        new.append((name, layer))
    if new:
        model.update_modules(tree_unflatten(new))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return twins


def _fast_decode(model, twins, chosen):
    """On a CPU with float32 weights: engines/mlx_decode's step (fewer graph nodes),
    and the shim's quantized twins of its matrices (fewer bytes read per token)."""
    from . import mlx_decode
    why = mlx_decode.install(model, rows=twins)
    if why is None:
        return
    chosen["reasons"].append(why)
    chosen["decode"] = "fused"
    if not twins:
        return
    done = 0
    for w, rows in mlx_decode.weights(model):
        if rows is not None and register_quantized(w, *rows):
            done += 1
    if done:
        _share_one_row()
        chosen["quantized_products"] = done
        chosen["reasons"].append(
            f"decode products read {done} weight matrices in their quantized form, and "
            "so do prompts' of up to the shim's row limit (it keeps a copy; the float32 "
            "one serves longer prompts)")


def _share_one_row():
    """With AVX-512 kernels and a helper: time one row's products over every
    registered twin on this thread alone, once a process, and share one stream's big
    products with the helper when one core reads them slower than ONE_ROW_SHARE_BELOW
    (see there). Appends the reason to _state. Never raises."""
    if (_shim is None or not _shim_helpers() or int(_shim.localai_blas_count(8)) < 16
            or "one_row" in _state):
        return
    try:
        import numpy as np
        with _quant_lock:
            mats = [(ptr, *w.shape) for ptr, w in _quant.items()]
        if not mats:
            return
        f = ctypes.c_float
        p = ctypes.c_void_p
        gemm = _shim.cblas_sgemm
        gemm.argtypes = [ctypes.c_int] * 6 + [f, p, ctypes.c_int, p, ctypes.c_int, f, p,
                                              ctypes.c_int]
        gemm.restype = None
        k_max = max(k for _, _, k in mats)
        x = np.random.default_rng(0).standard_normal(k_max).astype(np.float32)
        y = np.empty(max(n for _, n, _ in mats), np.float32)
        times = []
        for _ in range(ONE_ROW_SWEEPS + 1):           # the first faults pages in
            t0 = time.perf_counter()
            for ptr, n, k in mats:                    # RowMajor, NoTrans, Trans
                gemm(101, 111, 112, 1, n, k, 1.0, x.ctypes.data, k, ptr, k, 0.0,
                     y.ctypes.data, n)
            times.append(time.perf_counter() - t0)
        rate = int(_shim.localai_blas_count(6)) / min(times[1:])
    except Exception as e:
        _state["one_row"] = f"alone (not measured: {type(e).__name__})"
        return
    if rate < ONE_ROW_SHARE_BELOW:
        _shim.localai_share_one_row(ctypes.c_long(SHARED_ONE_ROW))
        _shim.localai_helper_spin(ctypes.c_long(SLOW_CORE_SPIN))
        _state["one_row"] = "shared"
        _state["reasons"].append(
            f"one core reads the quantized weights at {rate / 1e9:.0f} GB/s (under "
            f"{ONE_ROW_SHARE_BELOW / 1e9:.0f}): one stream's products of "
            f"{SHARED_ONE_ROW:,} weights and more are shared with the helper thread (two "
            f"cores read faster), which spins {SLOW_CORE_SPIN} pauses for the next "
            "product before it sleeps (a slow core's steps have longer gaps)")
    else:
        _state["one_row"] = "alone"
        _state["reasons"].append(
            f"one core reads the quantized weights at {rate / 1e9:.0f} GB/s: one stream's "
            "products stay on one core (a woken helper would compete with Python)")


def release(model):
    """Before a prepared model is dropped: forget the shim's quantized twins of its
    matrices (their float32 buffers may then be freed and their addresses reused)."""
    from . import mlx_decode
    matrices = mlx_decode.weights(model)
    if matrices:
        # A decode step evaluated asynchronously (mlx-lm pipelines the next token)
        # may still be reading a twin: let MLX's streams finish first.
        import mlx.core as mx
        streams = [None]
        gen = sys.modules.get("mlx_lm.generate")
        if getattr(gen, "generation_stream", None) is not None:
            streams.append(gen.generation_stream)
        for st in streams:
            mx.synchronize(st)
        for w, _rows in matrices:
            unregister(w)
    _prepared.pop(id(model), None)


# --- describe ----------------------------------------------------------------------------
def describe(model=None):
    """What was chosen and why: {device, dtype, blas, blas_threads, shim, reasons, ...}.
    With a model: that model's choice; without: the last prepared model's."""
    out = {k: (list(v) if isinstance(v, list) else v) for k, v in _state.items()}
    chosen = _prepared.get(id(model)) if model is not None else _last_prepared
    if chosen:
        out["device"] = chosen.get("device", out["device"])
        out["dtype"] = chosen.get("dtype")
        out["weights_bytes"] = chosen.get("weights_bytes")
        for k in ("float32_bytes", "memory_budget", "model", "decode",
                  "quantized_products"):
            if k in chosen:
                out[k] = chosen[k]
        out["reasons"] = out["reasons"] + chosen["reasons"]
    return out
