#!/usr/bin/env bash
# LLaVA-v1.5-7B LoRA fine-tuning (official scripts/v1_5/finetune_lora.sh: lr 2e-4, r 128, alpha 256, projector 2e-5) with any optimizer.
#   usage: scripts/finetune_lora.sh OPTIM_CONFIG [--config FILE ...] [--set section.key=value ...]
#   e.g.   scripts/finetune_lora.sh configs/optim/lamb_sgg.yaml
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
launch lora --set optimizer.lr=2.0e-4 -- "$@"
