#!/usr/bin/env bash
# TASLM on the espeak-ng corpus, after examples/stage1_espeak/run.sh (its corpus, units and stage 1-3 model):
# TASTE codes of every utterance, a tiny spoken LM trained from scratch on them (the whole 2-layer backbone,
# lora_r 0: a random backbone has nothing for adapters to adapt), held-out metrics, batched generation and a
# speech continuation of a held-out utterance (its audio and transcript) to a wav. Needs espeak-ng and the installed package (the `taste` command).
set -euo pipefail
cd "$(dirname "$0")"
s1=../stage1_espeak
taste encode "$s1/espeak/manifest.jsonl" --model "$s1/runs/vq/final/tokenizer" -o codes.jsonl --quiet
taste train-lm lm.json --quiet
cat runs/lm/final/eval.json | head -12
taste generate runs/lm --num 4 --extra-words 6 -o generated.jsonl
prompt=$(tail -1 "$s1/espeak/manifest.jsonl")
wav=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['path'])" "$prompt")
text=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['text'])" "$prompt")
taste continue "$s1/espeak/$wav" --text "$text" --lm runs/lm --tokenizer-model "$s1/runs/vq" \
  --centroids "$s1/espeak/unit_centroids.safetensors" --extra-words 6 -o continuation.wav
