#!/usr/bin/env bash
# LLaVA-v1.5-7B 8-bit QLoRA fine-tuning (the LoRA recipe on a decoder loaded in 8-bit; model.quantization=4bit for nf4) with any optimizer.
#   usage: scripts/finetune_qlora.sh OPTIM_CONFIG [--config FILE ...] [--set section.key=value ...]
#   e.g.   scripts/finetune_qlora.sh configs/optim/lamb_sgg.yaml
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
launch qlora --set optimizer.lr=2.0e-4 -- "$@"
