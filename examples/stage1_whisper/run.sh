#!/usr/bin/env bash
# Stage 1 as the official recipe runs it (spec 3.1), from a local Whisper checkpoint: distil-whisper's
# distil-large-v3 for the released shapes. The seed tokenizer keeps Whisper's encoder (frozen) and builds the
# aggregator from its decoder (cross-attention v_proj = I, a fresh RVQ); stages 1-1 text-only (a fresh unit decoder
# of the official shapes), 1-2 without VQ and 1-3 with VQ follow, each from the one before. The configs hold the
# official HF recipe's optimiser settings (AdamW, lr 2e-4, 100 warm-up steps, cosine, clip 1.0, no weight decay,
# batch 256 = 128 x 2, seed 8747); set `steps` for your corpus (the recipe runs 2, 10 and 10 epochs).
#
#   run.sh WHISPER_DIR [MANIFEST]
#
# MANIFEST (default data/manifest.units.jsonl): a `taste units` manifest, rows with audio, text and units. The
# official targets and speaker input, from the release's ONNX files: `taste s3-units data/manifest.jsonl --model
# RELEASE --speaker-model RELEASE -o data/manifest.units.jsonl` (S3 units and each row's CAM++ vector).
# `taste init-tokenizer --language de` seeds another language; `--asr-tokenizer llama3`, queries in Llama 3's tokens.
set -euo pipefail
whisper=$(realpath "$1")
manifest=$(realpath "${2:-data/manifest.units.jsonl}")
cd "$(dirname "$0")"
taste init-tokenizer runs/seed --whisper "$whisper" --value-layer 6
for stage in text no_vq vq; do
  taste train-tokenizer "$stage.json" --set manifest="$manifest"
done
taste eval-tokenizer runs/vq "$manifest" --eval-size 500 --json runs/vq/eval.json
