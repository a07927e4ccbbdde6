#!/usr/bin/env bash
# Build llama.cpp (CPU, with its RPC backend) from the llama-cpp-python source package, and convert a model
# folder to an F32 GGUF, for `potluck bench-perf --llama-cpp BUILD [--llama-gguf FILE]` (docs/performance.md):
# bench-perf runs llama.cpp on the GGUF file the folder was made from first (the demo's Q4_1 file), then on FILE.
#
# usage: deploy/llamacpp.sh MODEL_DIR [OUT_DIR]      (OUT_DIR default: ~/.cache/potluck/llama.cpp)
#   PYTHON: a python with torch, transformers and safetensors (the converter's needs); default: python3
#   LLAMA_CPP_PYTHON_VERSION: the source package to build (default 0.3.36; llama.cpp commit 0c1e570)
# Needs cmake and a C++ compiler; the build takes ~11 minutes on 2 cores. Nothing of llama.cpp is committed
# here or installed into the project: it lives in OUT_DIR only.
set -euo pipefail

MODEL=${1:?usage: $0 MODEL_DIR [OUT_DIR]}
OUT=${2:-$HOME/.cache/potluck/llama.cpp}
PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
[ -f "$MODEL/config.json" ] || { echo "$MODEL: not a model folder (no config.json)" >&2; exit 2; }
for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "$tool is needed to build llama.cpp" >&2; exit 2; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [ ! -f "$OUT/src/vendor/llama.cpp/CMakeLists.txt" ]; then
    echo "downloading llama-cpp-python $VERSION (source)"
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT/download"
    rm -rf "$OUT/src" && mkdir -p "$OUT/src"
    tar -xzf "$OUT"/download/llama_cpp_python-"$VERSION".tar.gz -C "$OUT/src" --strip-components=1
fi
SRC="$OUT/src/vendor/llama.cpp"

if [ ! -x "$OUT/build/bin/llama-bench" ]; then
    echo "building llama.cpp in $OUT/build"
    cmake -S "$SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    # the rpc server's target is ggml-rpc-server in recent llama.cpp, rpc-server before
    cmake --build "$OUT/build" --config Release -j "$(nproc)" --target llama-bench llama-batched-bench ggml-rpc-server \
        || cmake --build "$OUT/build" --config Release -j "$(nproc)" --target llama-bench llama-batched-bench rpc-server
fi

GGUF="$OUT/$(basename "$MODEL")-f32.gguf"
if [ ! -f "$GGUF" ]; then
    echo "converting $MODEL to $GGUF"
    # the converter's llama vocabulary code imports sentencepiece even for a tokenizer.json-only model
    "$PY" -m pip install -q --target "$OUT/pylib" sentencepiece
    PYTHONPATH="$SRC/gguf-py:$OUT/pylib" "$PY" "$SRC/convert_hf_to_gguf.py" "$MODEL" --outtype f32 --outfile "$GGUF" \
        >"$OUT/convert.log" 2>&1 || { tail -5 "$OUT/convert.log" >&2; exit 1; }
fi
echo "--llama-cpp $OUT/build --llama-gguf $GGUF"
