#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has no network), for its Python 3.12, into wheels/py312 (ignored by git;
# the device run carries it). Run here, before scripts/device_check.sh there. The versions are this project's
# pins (constraints.txt) where it pins them; the machine's own torch, numpy, opencv and scipy are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=wheels/py312
mkdir -p "$dest"
pin() { grep -i "^$1==" constraints.txt | head -1 || true; }
pkgs=(hydra-core omegaconf albumentations albucore pydantic pydantic_core monai)
specs=()
for p in "${pkgs[@]}"; do s=$(pin "$p"); specs+=("${s:-$p}"); done
pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dest" "${specs[@]}" stringzilla simsimd annotated-types typing-inspection
# antlr4's runtime (hydra's parser) is published as a source archive only: a pure-Python wheel built here.
pip wheel --quiet --no-deps -w "$dest" "$(pin antlr4-python3-runtime)"
du -sh "$dest"
ls "$dest"
