#!/usr/bin/env bash
# Create .venv and install everything mimbench needs (make setup). No compiler is needed.
#
# mmsegmentation 1.2 imports mmcv.ops when it is imported, but UperNet (UPerHead, FCNHead, the
# ADE20K pipeline, IoUMetric) calls no compiled op: setup installs the pure-Python mmcv-lite,
# and eval/mmcv_ops.py stands in for its missing compiled extension (a config that needs a
# compiled op fails in one line, naming the fix below).
#
# --full-mmcv (or MMCV_FULL=1): mmcv 2.1.0 with compiled ops instead. No prebuilt wheel
# matches torch 2.14, so it is built once from the sdist (about 20-30 minutes on 2 cores) and
# the wheel kept in ~/.cache/mimbench/wheels for every later setup. A full mmcv already in
# .venv is kept either way.
set -euo pipefail
cd "$(dirname "$0")/.."

FULL_MMCV=${MMCV_FULL:-0}
for arg in "$@"; do
    case $arg in
        --full-mmcv) FULL_MMCV=1 ;;
        *) echo "usage: $0 [--full-mmcv]" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
VENV=.venv
CACHE=${MIMBENCH_CACHE:-$HOME/.cache/mimbench}
WHEELS=$CACHE/wheels
MMCV_VERSION=2.1.0

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi

# This machine's pip config adds local file:// indexes (torch 2.14.1 comes from them) that hold
# only some projects; pip warns "Location 'file:///...' is ignored" once per index for every
# other project it looks up. Those lines are dropped; every other message is kept.
pip() {
    { "$VENV/bin/python" -m pip "$@" 2>&1 1>&3 \
        | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; } >&2; } 3>&1
}

# no setuptools pin here: torch 2.14 needs setuptools >= 77 (only the mmcv build wants an older one)
pip install --quiet --upgrade "pip<25" wheel

echo "[setup] installing torch 2.14.1 + torchvision 0.29.1"
pip install --quiet torch==2.14.1 torchvision==0.29.1

echo "[setup] installing the pure-Python requirements"
pip install --quiet -r requirements.txt

if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mmcv._ext') is None)" \
        2>/dev/null; then
    echo "[setup] keeping the full mmcv (compiled ops) in $VENV"
elif [ "$FULL_MMCV" = 1 ]; then
    mkdir -p "$WHEELS"
    mmcv_wheel=$(ls "$WHEELS"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$mmcv_wheel" ]; then
        echo "[setup] building mmcv $MMCV_VERSION with compiled ops (once; about 20-30 minutes on 2 cores)"
        # torch pulls in a recent setuptools; mmcv 2.1's setup.py needs an older one. ninja
        # compiles the ops in parallel (MAX_JOBS).
        pip install --quiet "setuptools<70" ninja
        build=$(mktemp -d)
        pip download --quiet --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$build"
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
    # both distributions write the mmcv package: the lite one goes first
    pip uninstall --quiet --yes mmcv-lite
    pip install --quiet "$mmcv_wheel"
else
    echo "[setup] installing mmcv-lite $MMCV_VERSION (no compiled ops; bash scripts/setup.sh --full-mmcv builds them)"
    pip install --quiet "mmcv-lite==$MMCV_VERSION"
fi

echo "[setup] installing mmsegmentation and the project (editable)"
pip install --quiet "mmsegmentation==1.2.2"
pip install --quiet --no-deps -e .

# mmseg through the project's guard, as every segmentation imports it
"$VENV/bin/python" -c "from eval import mmseg_vit; import mmseg.models, torch, timm, mmseg
from eval.mmcv_ops import mmcv_in_use
mmcv = mmcv_in_use()
print('[setup] ok: torch', torch.__version__, '| timm', timm.__version__, '| mmcv', mmcv['mmcv'] + ', compiled ops:',
      mmcv['mmcv_ops'], '| mmseg', mmseg.__version__)"
