#!/usr/bin/env bash
# Fill .whl/ (git-ignored locally) with what the lent GPU machine's Python 3.12 image lacks, at
# the versions of requirements.txt, for tools/gpu_check.sh there (README "The GPU check").
# llvmlite's wheel (60 MB) is repacked as llvmlite.tar.xz (39 MB): with it, everything fits the
# 64 MiB a device call carries. onnxsim (10 MB) is left out: the GPU engines export no ONNX.
#
#   tools/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree or submodule
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
pinned() { grep -i "^$1==" requirements.txt; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$tmp" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "$(pinned pydantic)" "pydantic-core==$(python3 -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  annotated-types typing-inspection "$(pinned platformdirs)" "$(pinned pycocotools)" \
  "$(pinned faster-coco-eval)" "$(pinned onnxslim)" "$(pinned numba)" \
  "llvmlite==$(python3 -c 'import llvmlite; print(llvmlite.__version__)')"
mkdir -p "$tmp/llvmlite"
python3 -m zipfile -e "$tmp"/llvmlite-*.whl "$tmp/llvmlite"
rm "$tmp"/llvmlite-*.whl
mkdir "$tmp/whl"
tar -C "$tmp/llvmlite" -cf - . | xz -T0 -9 > "$tmp/whl/llvmlite.tar.xz"
mv "$tmp"/*.whl "$tmp/whl/"
rm -rf .whl && mv "$tmp/whl" .whl  # the old .whl/ stays until the new one is whole
du -sh .whl
