#!/usr/bin/env bash
# Source this on a GPU machine whose CUDA libraries come from Python wheels (nvidia-* packages)
# rather than a system CUDA install: it puts every folder holding libcublas, libcublasLt,
# libnvrtc or libnccl on LD_LIBRARY_PATH, and adds the `libnccl.so -> libnccl.so.2` link that
# the run-time loader needs (it looks for `libnccl.so` by that name). The driver itself
# (libcuda.so.1) comes from the machine.
#
#   . scripts/gpu-env.sh [SEARCH_ROOT ...]     (default: /opt /usr/local /usr/lib)
roots=("$@")
[ ${#roots[@]} -eq 0 ] && roots=(/opt /usr/local /usr/lib)
link_dir="${LAZARUS_GPU_LINK_DIR:-${TMPDIR:-/tmp}/lazarus-gpu-libs}"
mkdir -p "$link_dir"
dirs=$(find "${roots[@]}" \( -name 'libcublas.so*' -o -name 'libcublasLt.so*' \
  -o -name 'libnvrtc.so*' -o -name 'libnccl.so*' \) -printf '%h\n' 2>/dev/null |
  grep -v '/stubs' | sort -u)  # a toolkit's stub libraries would shadow the real driver
for d in $dirs; do
  case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
  if [ -e "$d/libnccl.so.2" ] && [ ! -e "$d/libnccl.so" ]; then
    ln -sf "$d/libnccl.so.2" "$link_dir/libnccl.so"
  fi
done
LD_LIBRARY_PATH="$link_dir:$LD_LIBRARY_PATH"
export LD_LIBRARY_PATH
echo "gpu-env: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
