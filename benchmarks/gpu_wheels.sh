#!/usr/bin/env bash
# Build .whl/: the wheels that the GPU scripts (reproduce_gpu.sh, scaling_gpu.sh, extend_gpu.sh,
# fa4_gpu_check.sh) install on a GPU machine without a package index. That image has torch, triton,
# transformers and tensorboard for CPython 3.12, but not DeepSpeed or mosaicml-streaming.
#
#   bash benchmarks/gpu_wheels.sh          # then pass carry=[".whl"] to the GPU call
#
# DeepSpeed ships only a source archive; DS_BUILD_OPS=0 builds a pure-Python wheel (its CUDA ops
# are compiled on first use, and lh_dist uses none). The rest are binary wheels for cp312.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    hjson pydantic==2.12.5 pydantic-core==2.41.5 annotated-types typing-inspection \
    mosaicml-streaming==0.13.0 brotli python-snappy cramjam zstd catalogue
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$DEST" deepspeed==0.19.8
ls "$DEST"
du -sh "$DEST"
