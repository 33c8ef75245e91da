#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (DESIGN §9), built/downloaded on a CPU machine with network
# into the git-ignored .whl/ at the repository root; benchmarks/gpu_suite.py installs them there
# offline (pip install --no-index --no-deps --target). Usage, from anywhere:
#     bash benchmarks/gpu_wheels.sh            # then carry ".whl" with the device call
# The list must match WHEELS in benchmarks/gpu_suite.py (tests/test_gpu_suite.py checks it).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.whl"
PY=${PYTHON:-python3}
mkdir -p "$DEST"
# DeepSpeed ships only a source archive: build a pure-Python wheel (its CUDA ops are
# JIT-compiled on first use on the device; DS_BUILD_OPS=0 builds none here).
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
# cp312 binaries and pure wheels for the device's Python 3.12 (the device has numpy, pyyaml,
# packaging, psutil, py-cpuinfo, msgpack, ninja, tqdm, einops, nvidia-ml-py; typing-extensions
# travels too: pydantic needs >= 4.14.1, newer than the image may hold).
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" \
    hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
    typing-inspection==0.4.2 typing-extensions==4.16.0 webdataset==1.0.2 braceexpand==0.1.7
ls -l "$DEST"
