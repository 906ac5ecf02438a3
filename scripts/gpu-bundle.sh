#!/usr/bin/env bash
# Builds, on a machine with cargo (no GPU or CUDA needed), everything the GPU check runs on a
# GPU machine that has no Rust toolchain: the `lazarus` and `lazarus-bench` binaries with the
# `cuda` feature and the test executables of the crates with GPU tests, stripped, in one folder.
#
#   scripts/gpu-bundle.sh [OUT_DIR]        (default: gpu-bundle; ignored by git)
#
# Then, on the GPU machine, from the repository root: scripts/gpu-check.sh OUT_DIR RESULTS_DIR
set -euo pipefail
out="${1:-gpu-bundle}"
rm -rf "$out"
mkdir -p "$out/bin" "$out/tests"
cargo build --release -p lazarus -p lazarus-bench --features lazarus/cuda
cp target/release/lazarus target/release/lazarus-bench "$out/bin/"
# The test executables: cargo prints each one's path as a JSON "executable" field.
cargo test --release --no-run --message-format=json \
  -p lazarus-kernels -p lazarus-comm -p lazarus-trainer --features lazarus-trainer/cuda |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe and m.get("profile", {}).get("test"):
        print(m["target"]["name"], exe)
' | while read -r name exe; do
  cp "$exe" "$out/tests/$name-$(basename "$exe")"
done
strip "$out"/bin/* "$out"/tests/*
du -sh "$out"
ls -l "$out/bin" "$out/tests"
