#!/usr/bin/env bash
# Download, here, the Python wheels the GPU image lacks into .whl/ (git-ignored), for the device call's carry list.
#
# The image (/work/.library/device/KINDS.md) has torch 2.11, triton 3.6, transformers, numpy, safetensors, click,
# rich, pyyaml, onnx, onnxruntime, pytest, hypothesis, pytest-timeout, matplotlib, psutil; of trtfalcon's own
# dependencies it lacks pydantic (the build config schema), which needs pydantic-core (a compiled cp312 wheel),
# annotated-types, typing-inspection and typing-extensions >= 4.16 (the image's may be older). The versions are
# constraints/cpu.txt's. About 3 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
names='^(pydantic|pydantic_core|annotated-types|typing-inspection|typing_extensions)=='
mapfile -t pins < <(grep -E "$names" constraints/cpu.txt)
[ "${#pins[@]}" -eq 5 ] || { echo "fetch_wheels.sh: expected 5 pins in constraints/cpu.txt, found: ${pins[*]}" >&2; exit 1; }
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls -l .whl
