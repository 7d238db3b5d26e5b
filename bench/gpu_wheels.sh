#!/usr/bin/env bash
# Run on a machine with a package index, before bench/gpu_check.sh on a GPU machine without one: downloads the
# pure-Python wheels that the tests and benchmarks need and the GPU image lacks into .gpu_wheels/ (an ignored
# folder; carry it to the GPU machine, where gpu_check.sh installs them). Exits non-zero if any is missing.
# (llama-models: only its llama3/tokenizer.model is read, by the Llama-3 tokenizer of bench/generate.py.)
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(peft==0.21.2 accelerate==1.15.0 vector-quantize-pytorch==1.32.0 einx==0.4.3 frozendict==2.5.1 loguru==0.7.3
        torch-einops-utils==0.2.0 llama-models==0.3.0)
mkdir -p .gpu_wheels
pip download -q --no-deps --only-binary=:all: -d .gpu_wheels "${wheels[@]}"
# openai-whisper is published as a source archive only: build its pure-Python wheel here. taste reads its assets
# (mel_filters.npz, multilingual.tiktoken) without importing it, so its own dependencies are not needed there.
pip wheel -q --no-deps -w .gpu_wheels openai-whisper==20250625
ls .gpu_wheels
