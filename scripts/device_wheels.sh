#!/usr/bin/env bash
# Fetch the pure-Python packages the GPU machine lacks into .whl/ (git-ignored), on a machine with
# PyPI access. That machine has python3.12 with torch, numpy, safetensors, PyYAML, pytest and
# hypothesis, and no network; the sampler, its benchmark and tests/test_cuda.py need only these
# and omegaconf. Then run scripts/gpu_bench.sh there with .whl carried along.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl omegaconf==2.3.1
# antlr4-python3-runtime 4.9.3 (omegaconf's parser) is published as an sdist only: build a wheel
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl
