#!/usr/bin/env bash
# Create .venv and install everything mimbench needs (make setup).
#
# The only slow part is mmcv: mmsegmentation 1.2 imports mmcv.ops, which needs
# the full mmcv (< 2.2) with compiled ops, and no prebuilt wheel matches
# torch 2.14. We build mmcv 2.1.0 once from its sdist (about 20-30 minutes on
# 2 cores) and keep the wheel in ~/.cache/mimbench/wheels for every later setup.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
CACHE=${MIMBENCH_CACHE:-$HOME/.cache/mimbench}
WHEELS=$CACHE/wheels
MMCV_VERSION=2.1.0
mkdir -p "$WHEELS"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
# This machine's pip config lists local indexes that may be absent; silence the noise.
export PIP_EXTRA_INDEX_URL=""
$PIP install --quiet --upgrade "pip<25" "setuptools<70" wheel

echo "[setup] installing torch 2.14.1 + torchvision 0.29.1"
$PIP install --quiet torch==2.14.1 torchvision==0.29.1

echo "[setup] installing the pure-Python requirements"
$PIP install --quiet -r requirements.txt

mmcv_wheel=$(ls "$WHEELS"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$mmcv_wheel" ]; then
    echo "[setup] building mmcv $MMCV_VERSION with compiled ops (once; about 20-30 minutes on 2 cores)"
    # torch pulls in a recent setuptools; mmcv 2.1's setup.py needs an older one.
    $PIP install --quiet "setuptools<70"
    build=$(mktemp -d)
    $PIP download --quiet --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$build"
    tar -xzf "$build"/mmcv-$MMCV_VERSION.tar.gz -C "$build"
    # torch 2.14's headers need C++20; mmcv's setup.py pins C++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$build"/mmcv-$MMCV_VERSION/setup.py
    (cd "$build"/mmcv-$MMCV_VERSION && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} FORCE_CUDA=0 \
        "$OLDPWD/$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps -w "$WHEELS" .)
    rm -rf "$build"
    mmcv_wheel=$(ls "$WHEELS"/mmcv-$MMCV_VERSION-*.whl | head -n 1)
else
    echo "[setup] reusing cached $mmcv_wheel"
fi
$PIP install --quiet "$mmcv_wheel"

echo "[setup] installing mmsegmentation and the project (editable)"
$PIP install --quiet "mmsegmentation==1.2.2"
$PIP install --quiet --no-deps -e .

$VENV/bin/python -c "import torch, timm, mmcv.ops, mmseg, mmengine; print('[setup] ok: torch', torch.__version__, '| timm', timm.__version__, '| mmcv', mmcv.__version__, '| mmseg', mmseg.__version__)"
