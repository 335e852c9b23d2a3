#!/usr/bin/env bash
# Packages for a GPU machine that cannot reach a package index, collected here into .whl/ (git
# ignores it): what scripts/gpu_check.sh installs there with --no-index. The machine this was
# written for (docs/development.md, "A GPU machine without network") has Python 3.12, a CUDA build
# of torch, nvcc and most common packages, but transformers 5.17, no FlashInfer and nothing that
# can be fetched; what travels with the checkout is capped at 64 MiB.
#
#   bash scripts/gpu_wheels.sh            # then carry .whl with the checkout
#
# FlashInfer's wheel is 101 MB zipped (717 MB of CUDA sources and headers its JIT compiles from):
# repacked as .whl/flashinfer.tar.xz (xz -9e) it is about a third. Its optional imports (CUTLASS
# DSL, cuDNN frontend, cuTile) are left out: FlashInfer imports and plans its FA2 paged kernels
# without them (checked here by importing it with each of them blocked).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FLASHINFER=${FLASHINFER:-0.7.4}
TRANSFORMERS=${TRANSFORMERS:-5.25.0}
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# transformers and what it needs newer than that machine has (huggingface-hub 2 and its new HTTP
# client), FlashInfer's one required binary package (apache-tvm-ffi).
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
  "transformers==$TRANSFORMERS" "kernels>=0.19.1,<0.20" "huggingface-hub>=2.4,<3" "regex>=2025.10.22" \
  "click>=8.4.2" httpx2 httpcore2 truststore apache-tvm-ffi tomlkit
if [ ! -f .whl/flashinfer.tar.xz ]; then
  tmp=$(mktemp -d)
  dest=$PWD/.whl
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "flashinfer-python==$FLASHINFER"
  (cd "$tmp" && mkdir unpacked && cd unpacked && "$PYTHON" -m zipfile -e "$tmp"/flashinfer_python-*.whl . \
    && tar -cf - . | xz -T0 -9e > "$dest/flashinfer.tar.xz.part")
  mv .whl/flashinfer.tar.xz.part .whl/flashinfer.tar.xz
  rm -rf "$tmp"
fi
du -ch .whl/* | tail -n 20
