#!/usr/bin/env bash
# Wheels for the lent GPU machine (Python 3.12, x86-64 manylinux), written to .whl/ (git-ignored; name it in
# the run's `carry`). Exactly the packages that the harvest's steps import and the device lacks, one pinned
# version each: diffusers, at the version the tests pass with here. Its Requires-Dist (filelock,
# huggingface-hub>=1.32, numpy, regex, requests, safetensors>=0.8, Pillow; importlib_metadata only below
# Python 3.8) are all on the device (benchmarks/device_packages.txt); tests/test_harvest.py checks both.
#   bash benchmarks/prepare_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1)
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -l .whl
