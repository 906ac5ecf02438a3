#!/usr/bin/env bash
# Builds the stand-in CUDA driver and cuBLASLt of kernels/emu/ into a folder and prints its path,
# so that the CUDA backend's GPU tests, and `lazarus train --device cuda`, run on a machine with
# no GPU: the kernels of kernels/cuda/ are compiled natively and run one OS thread per CUDA
# thread. Slow (a tiny model takes seconds per step) and no substitute for a GPU; it checks the
# host code, the launches and the kernels' arithmetic. Needs g++ with C++20.
#
#   export LD_LIBRARY_PATH="$(scripts/cuda-emu.sh [DIR]):$(scripts/nvrtc-setup.sh)"
#   LAZARUS_REQUIRE_GPU=1 cargo test -p lazarus-kernels -p lazarus-trainer \
#     --features lazarus-trainer/cuda
# (NVRTC is still needed: the backend compiles the cubins, which the stand-in checks and skips.)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-${TMPDIR:-/tmp}/lazarus-cuda-emu}"
rm -rf "$dir/src" && mkdir -p "$dir/src" "$dir/lib"
cp "$root/kernels/cuda/common.cuh" "$dir/src/"
for f in "$root"/kernels/cuda/*.cu; do
  # Dynamic shared memory is one buffer per launch in the stand-in.
  sed -E 's/extern __shared__ (\w+) (\w+)\[\];/\1* \2 = (\1*)g_dyn_smem;/' "$f" >"$dir/src/$(basename "$f")"
done
{
  echo '#include "shim.h"'
  for f in "$dir"/src/*.cu; do echo "#include \"$f\""; done
  python3 "$root/kernels/emu/entries.py" "$dir/src"
} >"$dir/all_kernels.inc"
# The block shapes the backend passes to NVRTC as -D options (kernels/src/cuda/compile.rs).
defs=$(python3 - "$root/kernels/src/cuda/compile.rs" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
consts = dict(re.findall(r"const (\w+): u32 = (\d+);", src))
pairs = re.findall(r'"-D(LZ_\w+)=\{(\w+)\}"', src)
assert pairs, "no -D options found in compile.rs"
print(" ".join(f"-D{k}={consts[v]}" for k, v in pairs))
PY
)
san="${LAZARUS_EMU_SANITIZE-}"  # e.g. "-fsanitize=address -fno-omit-frame-pointer"
g++ -std=c++20 -O1 -g $san -fPIC -shared -I"$root/kernels/emu" -I"$dir" -I"$dir/src" $defs \
  -Wall -Wno-unused-function "$root/kernels/emu/libcuda.cpp" -o "$dir/lib/libcuda.so" -lpthread
g++ -std=c++17 -O1 -g $san -fPIC -shared "$root/kernels/emu/libcublaslt.cpp" \
  -o "$dir/lib/libcublasLt.so"
echo "$dir/lib"
