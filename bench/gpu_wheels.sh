#!/usr/bin/env bash
# The Python 3.12 wheels the lent GPU machine lacks (megatron-core and omegaconf with its antlr4
# runtime; torch, transformers, safetensors, numpy, pyyaml, rich, psutil are in its image), put
# in .whl/ (git-ignored) for the device tool to carry:  bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl megatron-core==0.16.1 omegaconf==2.3.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only on PyPI
ls -la .whl
