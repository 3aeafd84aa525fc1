"""Products from a weight matrix's quantized twin in the BLAS shim vs the float32 path,
in one run on the same values: decode-shaped (x of 1 or 4 rows: OpenBLAS sgemv / the
shim's small-M kernel) and prompt-shaped (16..128 rows: OpenBLAS sgemm).
(issue 8; engines/mlx_setup.register_quantized)

    python bench/quant_bench.py [--rounds 7] [--threads N] [--rows 1,4,16,32,64,128]

Each case multiplies x by several distinct copies of the matrix per evaluation, so
the weights come from memory as in a decode step (the set is larger than the L3
cache), not from a cache that one small matrix would fit. The two paths alternate
round by round; the figure is the median time per product. SmolLM2-135M's shapes:
the tied 49152x576 head (8-bit, group 32) and a 1536x576 / 576x1536 MLP layer
(4-bit, group 32).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name, N, K, bits, group size, distinct copies (quantized set > the 32 MB L3)
CASES = [
    ("head 49152x576 q8", 49152, 576, 8, 32, 2),
    ("up 1536x576 q4", 1536, 576, 4, 32, 100),
    ("down 576x1536 q4", 576, 1536, 4, 32, 100),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", default="1,4,16,32,64,128",
                    help="rows of x, comma-separated")
    ap.add_argument("--threads", type=int, default=0,
                    help="LOCALAI_BLAS_THREADS (default: mlx_setup's choice)")
    args = ap.parse_args()
    if args.threads:
        os.environ["LOCALAI_BLAS_THREADS"] = str(args.threads)
    from engines import mlx_setup as ms
    ms.configure()
    import mlx.core as mx
    import numpy as np

    d = ms.describe()
    print(f"BLAS: {d['blas']}; threads {d['blas_threads']}, shim helpers "
          f"{d.get('shim_helpers')}")
    if ms.quantized_calls() is None:
        print("no BLAS shim: nothing to compare")
        return 1
    mx.random.seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{'case':20s} {'M':>3s} {'float32 us':>11s} {'quant us':>9s} {'speed-up':>8s}"
          f" {'max rel diff':>12s}")
    for name, n, k, bits, gs, copies in CASES:
        plain, twins = [], []
        for _ in range(copies):
            w = mx.random.normal((n, k)) * 0.02
            q, s, b = mx.quantize(w, group_size=gs, bits=bits)
            # float32 scales: the dequantized values are exact in float32
            s, b = s.astype(mx.float32), b.astype(mx.float32)
            w32 = mx.dequantize(q, s, b, group_size=gs, bits=bits)
            w32b = mx.array(w32)          # same values, a separate unregistered buffer
            w32b = w32b + 0               # (a new buffer, not a view)
            mx.eval(w32, w32b)
            assert ms.register_quantized(w32, q, s, b, bits, gs), name
            twins.append(w32)
            plain.append(w32b)
            del q, s, b, w
        for m in rows:
            x = mx.random.normal((m, k))
            mx.eval(x)

            def run(ws):
                outs = [x @ w.T for w in ws]
                mx.eval(outs)
                return outs

            ref, got = run(plain), run(twins)       # warm-up, and the check
            c0 = ms.quantized_calls()["calls"]
            run(twins)
            assert ms.quantized_calls()["calls"] - c0 == copies, "twins not used"
            diff = max(float(np.abs(np.array(g) - np.array(r)).max()
                             / (np.abs(np.array(r)).max() + 1e-30))
                       for g, r in zip(got, ref))
            t_plain, t_quant = [], []
            for _ in range(args.rounds):
                for ws, out in ((plain, t_plain), (twins, t_quant)):
                    t0 = time.perf_counter()
                    run(ws)
                    out.append((time.perf_counter() - t0) / copies)
            tp, tq = statistics.median(t_plain), statistics.median(t_quant)
            print(f"{name:20s} {m:3d} {tp * 1e6:11.0f} {tq * 1e6:9.0f} {tp / tq:7.2f}x"
                  f" {diff:12.1e}", flush=True)
        for w in twins:
            ms.unregister(w)
        del plain, twins
    print("registered after the run:", ms.quantized_calls())
    return 0


if __name__ == "__main__":
    sys.exit(main())
