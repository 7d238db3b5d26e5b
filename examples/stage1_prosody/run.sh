#!/usr/bin/env bash
# The stage-1 experiment on a corpus with word-level prosody, from nothing: 2400 espeak-ng utterances whose every
# word has its own random rate and pitch, with random pauses (`taste corpus --prosody`), 128 k-means units, a tiny
# TASTE trained from scratch (stage 0 asr, then 1-1 text-only, 1-2 no VQ, 1-3 VQ), a text-only model trained as
# many decoder steps as the TASTE one (500 + 400 + 400), the decoder given the words' true prosody instead of TASTE
# (oracle.py, as many steps as 1-2 and as 1-2 + 1-3), linear probes of what the word embeddings carry (probe.py),
# and the evaluation of all on the last 96 utterances. Needs espeak-ng and the package installed (the `taste`
# command); about two hours on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
../stage1_pipeline.sh --prosody
python oracle.py --steps 400 --out runs/oracle
python oracle.py --steps 800 --out runs/oracle_long
taste eval-tokenizer runs/asr espeak/manifest.units.jsonl --eval-size 96 --json runs/asr/eval.json
python probe.py runs/text runs/no_vq runs/vq
# stage 0 trained on until it reads the speech (1800 more steps, token dropout 0.5), then 1-1, 1-2, 1-3 again
for c in asr_long text2 no_vq2 vq2; do
  taste train-tokenizer "$c.json" --quiet
done
taste eval-tokenizer runs/asr_long espeak/manifest.units.jsonl --eval-size 96 --json runs/asr_long/eval.json
taste eval-tokenizer runs/no_vq2 espeak/manifest.units.jsonl --eval-size 96 --json runs/no_vq2/eval.json
taste eval-tokenizer runs/vq2 espeak/manifest.units.jsonl --eval-size 96 --json runs/vq2/eval.json
python probe.py runs/no_vq2 runs/vq2
