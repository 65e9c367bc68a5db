#!/usr/bin/env bash
# Install the detection stack into the active Python environment:
#   mmcv 2.1.0 (built from source, with compiled ops), mmengine 0.10.7, mmdet 3.3.0.
#
# PyPI has mmcv 2.1.0 only as a source package whose setup.py asks for C++17, while torch 2.14's
# headers need C++20. We build it once with the standard raised and keep the wheel in a cache
# (keyed by Python, torch, architecture and ops flavour), so later runs install in seconds.
#
# Environment:
#   PYTHON           interpreter of the target environment (default: python)
#   KW_CACHE_DIR     wheel cache (default: ${XDG_CACHE_HOME:-~/.cache}/kernelwarehouse)
#   KW_MMCV_OPS      cpu | cuda: flavour of the compiled ops (default: cuda when a GPU is visible
#                    and nvcc is found, else cpu; CPU-only ops cannot run Mask R-CNN on a GPU)
#   MAX_JOBS         parallel compile jobs (default: the number of CPU cores)
set -euo pipefail

MMCV_VERSION=2.1.0
MMENGINE_VERSION=0.10.7
MMDET_VERSION=3.3.0
PYTHON=${PYTHON:-python}

die() { echo "detection/install.sh: $*" >&2; exit 1; }

"$PYTHON" -c 'import torch' 2>/dev/null \
    || die "torch is not importable with '$PYTHON'; activate the project's environment and run 'pip install -e .' first."

# Nothing to do when the exact stack is installed and mmcv's compiled ops load with this torch.
if "$PYTHON" - "$MMCV_VERSION" "$MMENGINE_VERSION" "$MMDET_VERSION" 2>/dev/null <<'EOF'
import sys
from importlib.metadata import version
import mmcv._ext  # fails when the ops are missing or were built against another torch
assert [version(p) for p in ('mmcv', 'mmengine', 'mmdet')] == sys.argv[1:]
EOF
then
    echo "mmcv $MMCV_VERSION, mmengine $MMENGINE_VERSION and mmdet $MMDET_VERSION are already installed."
    exit 0
fi

OPS=${KW_MMCV_OPS:-$("$PYTHON" -c '
import torch
from torch.utils.cpp_extension import CUDA_HOME
print("cuda" if torch.cuda.is_available() and CUDA_HOME else "cpu")')}
case "$OPS" in
    cpu) OPS_TAG=cpu ;;
    cuda) OPS_TAG=$("$PYTHON" -c '
import torch
capabilities = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
print("cuda" + torch.version.cuda + "-sm" + "_".join(capabilities))') ;;
    *) die "KW_MMCV_OPS must be 'cpu' or 'cuda', got '$OPS'." ;;
esac

KEY=$("$PYTHON" -c '
import platform, sys, torch
print(f"py{sys.version_info.major}.{sys.version_info.minor}-torch{torch.__version__}-{platform.machine()}")')-$OPS_TAG
CACHE_DIR=${KW_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kernelwarehouse}/mmcv-$MMCV_VERSION/$KEY
WHEEL=$(ls "$CACHE_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)

if [ -z "$WHEEL" ]; then
    echo "Building mmcv $MMCV_VERSION ($OPS ops) for $KEY; this takes about 7 minutes on 2 idle cores."
    BUILD_DIR=$(mktemp -d)
    trap 'rm -rf "$BUILD_DIR"' EXIT
    # The build runs in this environment (--no-build-isolation): it compiles against its torch.
    # mmcv's setup.py (and mmengine at run time) import pkg_resources, which setuptools 80 deprecates.
    "$PYTHON" -m pip install "setuptools<80" wheel ninja psutil
    "$PYTHON" -m pip download "mmcv==$MMCV_VERSION" --no-deps --no-binary :all: --no-build-isolation \
        -d "$BUILD_DIR"
    tar -xzf "$BUILD_DIR/mmcv-$MMCV_VERSION.tar.gz" -C "$BUILD_DIR"
    SRC=$BUILD_DIR/mmcv-$MMCV_VERSION
    grep -q -- '-std=c++17' "$SRC/setup.py" || die "mmcv's setup.py no longer asks for -std=c++17; update this script."
    sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
    if [ "$OPS" = cuda ]; then
        export FORCE_CUDA=1
    else
        # mmcv compiles CUDA ops whenever torch sees a GPU; hide it for a CPU build.
        export FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=
    fi
    mkdir -p "$CACHE_DIR"
    (cd "$SRC" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} CFLAGS=-g0 \
        "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$BUILD_DIR/wheel" .)
    # Copy then rename, so that an interrupted build never leaves a partial wheel in the cache.
    BUILT=$(ls "$BUILD_DIR"/wheel/mmcv-"$MMCV_VERSION"-*.whl)
    cp "$BUILT" "$CACHE_DIR/.partial"
    WHEEL=$CACHE_DIR/$(basename "$BUILT")
    mv "$CACHE_DIR/.partial" "$WHEEL"
else
    echo "Using the cached mmcv wheel $WHEEL."
fi

# mmcv is never listed in setup.py: pip would try its own isolated build of it and fail.
"$PYTHON" -m pip install "$WHEEL" "mmengine==$MMENGINE_VERSION" "mmdet==$MMDET_VERSION" "setuptools<80"
"$PYTHON" -c 'import mmcv._ext, mmdet; print("mmdet", mmdet.__version__, "with mmcv ops: ready.")'
