#!/usr/bin/env bash
# The stage-1 experiment of the README, from nothing: an espeak-ng corpus of 2400 utterances, 128 k-means units,
# a tiny TASTE trained from scratch (stage 0 asr, then 1-1 text-only, 1-2 no VQ, 1-3 VQ), a text-only model
# trained as many decoder steps as the TASTE one (500 + 400 + 400), and the evaluation of all on the last 96
# utterances. Needs espeak-ng and the package installed (the `taste` command); about 45 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
../stage1_pipeline.sh
