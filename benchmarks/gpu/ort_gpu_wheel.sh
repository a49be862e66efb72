#!/usr/bin/env bash
# Bring onnxruntime-gpu to a GPU machine that has no package index, in chunks.
#
#   here:     benchmarks/gpu/ort_gpu_wheel.sh fetch      # download once, split into .gpu_wheel/<i>/
#   GPU, one device call per chunk i (carry .gpu_wheel/<i>):
#             benchmarks/gpu/ort_gpu_wheel.sh receive    # moves the carried chunk to /tmp
#   GPU, last: benchmarks/gpu/ort_gpu_wheel.sh install   # reassemble, check sha256, pip install
#   GPU:       eval "$(benchmarks/gpu/ort_gpu_wheel.sh env)"   # PYTHONPATH for ORT-GPU + ssmstream
#
# The wheel (255.6 MB, cp312 manylinux_2_28_x86_64) is fetched only when .gpu_wheel/ has none;
# chunks are < 60 MiB so each fits a 64 MiB transfer next to the ~2 MB working tree.
# Wheels and chunks are git-ignored (.gitignore: /.gpu_wheel/, *.whl, *.whl.part*).
set -euo pipefail

VERSION="${ORT_GPU_VERSION:-1.31.1}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${ORT_GPU_DIR:-$ROOT/.gpu_wheel}"          # here: wheel + chunk folders; there: carried
DEST="${ORT_GPU_TMP:-/tmp/ort_gpu_wheel}"       # there: received chunks and the whole wheel
SITE="${ORT_GPU_SITE:-/tmp/ort_site}"           # there: pip --target (shadows the CPU onnxruntime)
SHIM="${SSM_SHIM:-/tmp/ssm_shim}"               # there: `import ssmstream` without installing
CHUNK="${ORT_GPU_CHUNK:-56m}"
PY="${PYTHON:-python3}"

fetch() {
    mkdir -p "$DIR"
    local whl
    whl=$(ls "$DIR"/onnxruntime_gpu-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
    if [[ -z "$whl" ]]; then
        local pip="$ROOT/.venv/bin/pip"; [[ -x "$pip" ]] || pip="$PY -m pip"
        # manylinux_2_28 is the tag PyPI has for 1.31.1 (checked); older tags kept as fallbacks
        $pip download "onnxruntime-gpu==$VERSION" --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR"
        whl=$(ls "$DIR"/onnxruntime_gpu-"$VERSION"-*.whl | head -1)
    else
        echo "reusing $whl (not downloading again)"
    fi
    rm -rf "$DIR"/[0-9]*
    local name; name=$(basename "$whl")
    (cd "$DIR" && sha256sum "$name" > SHA256SUMS && split -b "$CHUNK" -d -a 2 "$name" "$name.part")
    local i=0
    for part in "$DIR/$name".part*; do
        i=$((i + 1)); mkdir -p "$DIR/$i"; mv "$part" "$DIR/$i/"; cp "$DIR/SHA256SUMS" "$DIR/$i/"
    done
    echo "$i chunks in $DIR/1..$i; one device call per chunk, carry .gpu_wheel/<i>, run 'receive'"
    du -sh "$DIR"/[0-9]*
}

receive() {
    mkdir -p "$DEST"
    local n=0
    for f in "$DIR"/[0-9]*/*.part* "$DIR"/[0-9]*/SHA256SUMS; do
        [[ -e "$f" ]] || continue
        cp -f "$f" "$DEST/"; n=$((n + 1))
    done
    echo "received $n file(s); $DEST now holds:"; ls -la "$DEST"
}

install() {
    cd "$DEST"
    local name; name=$(awk '{print $2}' SHA256SUMS)
    if ! sha256sum -c SHA256SUMS >/dev/null 2>&1; then
        cat "$name".part* > "$name"
    fi
    sha256sum -c SHA256SUMS
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$DEST/$name"
    shim
    PYTHONPATH="$SITE" "$PY" - <<'PY'
import onnxruntime as ort
print("onnxruntime", ort.__version__, "from", ort.__file__)
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # CUDA / cuDNN libraries of the nvidia-* pip packages (torch's)
print("available providers:", ort.get_available_providers())
print("device:", ort.get_device())
PY
}

shim() {
    mkdir -p "$SHIM/ssmstream"
    for pkg in model export runtime protos; do ln -sfn "$ROOT/$pkg" "$SHIM/ssmstream/$pkg"; done
}

env_() {
    echo "export PYTHONPATH=$SITE:$SHIM\${PYTHONPATH:+:\$PYTHONPATH}"
}

case "${1:-}" in
    fetch) fetch ;;
    receive) receive ;;
    install) install ;;
    shim) shim ;;
    env) env_ ;;
    *) echo "usage: $0 fetch|receive|install|shim|env" >&2; exit 2 ;;
esac
