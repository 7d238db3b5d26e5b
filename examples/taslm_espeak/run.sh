#!/usr/bin/env bash
# TASLM on the espeak-ng corpus, after examples/stage1_espeak/run.sh (its corpus, units and stage 1-3 model):
# TASTE codes of every utterance, a tiny spoken LM trained from scratch on them (the whole 2-layer backbone,
# lora_r 0: a random backbone has nothing for adapters to adapt), held-out metrics, batched generation and a
# speech continuation of a spoken prompt to a wav. Needs espeak-ng and the installed package (the `taste` command).
set -euo pipefail
cd "$(dirname "$0")"
s1=../stage1_espeak
taste encode "$s1/espeak/manifest.jsonl" --model "$s1/runs/vq/final/tokenizer" -o codes.jsonl --quiet
taste train-lm lm.json --quiet             # latent head (TASLM_emb), about 4 min
taste train-lm lm_classifier.json --quiet  # classifier head (TASLM_token), about 4 min
head -14 runs/lm/final/eval.json runs/lm_classifier/final/eval.json
taste generate runs/lm --num 4 --extra-words 6 -o generated.jsonl
# the prompt: the first words of a sentence, spoken by espeak-ng (any wav and its transcript will do)
espeak-ng -v en-us -w prompt.wav "The busy chef"
taste continue prompt.wav --text "The busy chef" --lm runs/lm --tokenizer-model "$s1/runs/vq" \
  --centroids "$s1/espeak/unit_centroids.safetensors" --extra-words 4 -o continuation.wav
