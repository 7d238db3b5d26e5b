#!/usr/bin/env bash
# The stage-1 pipeline shared by stage1_espeak/run.sh and stage1_prosody/run.sh, run in the directory that holds
# the configs: a 2400-utterance espeak-ng corpus (extra `taste corpus` options as arguments), 128 k-means units,
# stages asr -> text -> no_vq -> vq and text_long, and the evaluation of text, text_long, no_vq and vq on the last
# 96 utterances.
set -euo pipefail
taste corpus espeak --num 2400 --seed 0 "$@"
taste units espeak/manifest.jsonl --k 128
for c in asr text no_vq vq text_long; do
  taste train-tokenizer "$c.json" --quiet
done
for r in text text_long no_vq vq; do
  taste eval-tokenizer "runs/$r" espeak/manifest.units.jsonl --eval-size 96 --json "runs/$r/eval.json"
done
