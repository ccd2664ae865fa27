#!/usr/bin/env bash
# Build the CUDA-capable binaries of the GPU check (scripts/gpu/check.sh) on a machine without a
# GPU, and put them, stripped, into .gpu/bin (ignored through .git/info/exclude; name `.gpu` in
# the device tool's `carry`).
#
# libtorch comes from a PyTorch CUDA wheel in a virtual environment outside the clone
# (PROTODINO_CUDA_VENV, default $XDG_CACHE_HOME or ~/.cache, then protodino/cuda-venv; made once with
# `python3 -m venv DIR && DIR/bin/pip install torch==2.11.0`). torch-sys reads it through
# LIBTORCH_USE_PYTORCH=1, which it prefers to the LIBTORCH default of .cargo/config.toml, and
# protodino-torch-rpath then links libtorch_cuda with --no-as-needed. The build has its own target
# directory (target/cuda) so the CPU build in target/ is left alone.
#
# It also copies this machine's libstdc++ to .gpu/lib (check.sh uses it only where the GPU
# machine's is too old) and makes the step fixtures in .gpu/fixtures with the CPU build
# (target/release; libtorch from .cargo/config.toml) from scripts/gpu/replay-fixture.toml.
#
#   scripts/gpu/build.sh            build + strip + copy + fixtures
#   scripts/gpu/build.sh --check    only verify what .gpu/bin holds (ldd, sizes)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${PROTODINO_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/protodino/cuda-venv}
TARGET=${CARGO_TARGET_DIR_CUDA:-$ROOT/target/cuda}
BIN=$ROOT/.gpu/bin

[ -x "$VENV/bin/python" ] || { echo "no virtual environment at $VENV" >&2; exit 1; }
TORCH_LIB=$("$VENV/bin/python" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))' 2>/dev/null)
[ -f "$TORCH_LIB/libtorch_cuda.so" ] || { echo "$VENV has no CUDA torch" >&2; exit 1; }

if [ "${1:-}" != "--check" ]; then
    export VIRTUAL_ENV=$VENV PATH=$VENV/bin:$PATH LIBTORCH_USE_PYTORCH=1 PYTHON=$VENV/bin/python3
    unset LIBTORCH LIBTORCH_INCLUDE LIBTORCH_LIB
    export CARGO_TARGET_DIR=$TARGET
    cargo build --release -p protodino-collectives --example nccl_check
    cargo build --release -p protodino-dino --example step_time --example replay_check
    if ! cargo build --release -p protodino-worker --bin protodino; then
        echo "warning: the worker did not build; .gpu/bin will lack protodino" >&2
    fi
    mkdir -p "$BIN"
    for f in examples/nccl_check examples/step_time examples/replay_check protodino; do
        [ -f "$TARGET/release/$f" ] || continue
        strip -o "$BIN/$(basename "$f")" "$TARGET/release/$f"
    done
    mkdir -p "$ROOT/.gpu/lib"
    cp -L "$(g++ -print-file-name=libstdc++.so.6)" "$ROOT/.gpu/lib/libstdc++.so.6"
    # Fixtures and their CPU reference: the CPU build, in a clean environment.
    (
        unset VIRTUAL_ENV LIBTORCH_USE_PYTORCH PYTHON CARGO_TARGET_DIR
        export PATH=${PATH#"$VENV/bin:"}
        cargo build --release -p protodino-dino --example replay_check
        rm -rf "$ROOT/.gpu/fixtures"
        "$ROOT/target/release/examples/replay_check" prepare \
            --config "$ROOT/scripts/gpu/replay-fixture.toml" --out "$ROOT/.gpu/fixtures"
    )
fi

# Every libtorch binary must need libtorch_cuda (else CUDA never registers).
status=0
for b in step_time replay_check protodino; do
    [ -f "$BIN/$b" ] || continue
    deps=$(LD_LIBRARY_PATH=$TORCH_LIB ldd "$BIN/$b")
    if grep -q 'libtorch_cuda.so' <<<"$deps"; then
        echo "$b: links libtorch_cuda.so"
    else
        echo "$b: does NOT link libtorch_cuda.so" >&2
        status=1
    fi
done
# Newest glibc / libstdc++ symbol versions the binaries need (the device image must have them).
for b in "$BIN"/*; do
    syms=$(objdump -T "$b")
    g=$(grep -o 'GLIBC_[0-9.]*' <<<"$syms" | sort -uV | tail -1 || true)
    x=$(grep -o 'GLIBCXX_[0-9.]*' <<<"$syms" | sort -uV | tail -1 || true)
    echo "$(basename "$b"): $(stat -c %s "$b") bytes, needs ${g:-no glibc} ${x:-no libstdc++}"
done
du -sh "$ROOT/.gpu"
exit $status
