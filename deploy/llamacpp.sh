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

# ggml is built for this CPU (-march=native). On a CPU with AMX tiles, this llama.cpp's AMX kernels died here with
# SIGILL / a general protection fault on the first batched product (tinygemm_kernel_amx, ldtilecfg: every
# llama-batched-bench run, any prompt), although a plain AMX instruction runs: so on such CPUs llama.cpp is
# built for every instruction set the CPU has (an AMX CPU has all of these) except AMX: its AVX-512 / VNNI
# kernels (one-token decode, llama-bench -p 0, never used AMX). LLAMA_CPP_AMX=1 keeps -march=native.
ISA=(-DGGML_NATIVE=ON)
if grep -q -w amx_tile /proc/cpuinfo 2>/dev/null && [ "${LLAMA_CPP_AMX:-0}" != 1 ]; then
    ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON
         -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON)
fi
BUILT_WITH="$OUT/build/potluck-flags"
if [ ! -x "$OUT/build/bin/llama-bench" ] || [ "$(cat "$BUILT_WITH" 2>/dev/null)" != "flags:${ISA[*]}" ]; then
    echo "building llama.cpp in $OUT/build (${ISA[*]})"
    cmake -S "$SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF "${ISA[@]}" >/dev/null
    # the rpc server's target is ggml-rpc-server in recent llama.cpp, rpc-server before
    cmake --build "$OUT/build" --config Release -j "$(nproc)" --target llama-bench llama-batched-bench ggml-rpc-server \
        || cmake --build "$OUT/build" --config Release -j "$(nproc)" --target llama-bench llama-batched-bench rpc-server
    echo "flags:${ISA[*]}" > "$BUILT_WITH"
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
