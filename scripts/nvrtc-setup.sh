#!/usr/bin/env bash
# Puts NVIDIA's run-time CUDA compiler (NVRTC, from its Python wheel on PyPI) into a folder, so
# that the kernel sources can be compiled for sm_80/sm_90 on a machine with no GPU and no CUDA
# toolkit: the CUDA build's NVRTC test uses it. Idempotent. Prints the library folder to put on
# LD_LIBRARY_PATH.
#
#   export LD_LIBRARY_PATH="$(scripts/nvrtc-setup.sh [DIR])${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
set -euo pipefail
dir="${1:-${TMPDIR:-/tmp}/lazarus-nvrtc}"
version=13.5.37
lib="$dir/nvidia/cu13/lib"
if [ ! -e "$lib/libnvrtc.so.13" ]; then
  mkdir -p "$dir/wheel"
  python3 -m pip download -q --no-deps --only-binary=:all: \
    -d "$dir/wheel" "nvidia-cuda-nvrtc==$version" >&2
  python3 -m zipfile -e "$dir"/wheel/nvidia_cuda_nvrtc-*.whl "$dir" >&2
fi
# The loader looks for libnvrtc.so before the versioned names.
[ -e "$lib/libnvrtc.so" ] || ln -s libnvrtc.so.13 "$lib/libnvrtc.so"
echo "$lib"
