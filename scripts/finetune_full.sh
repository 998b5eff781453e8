#!/usr/bin/env bash
# LLaVA-v1.5-7B full fine-tuning (official scripts/v1_5/finetune.sh: lr 2e-5, global batch 128, 1 epoch) with any optimizer.
#   usage: scripts/finetune_full.sh OPTIM_CONFIG [--config FILE ...] [--set section.key=value ...]
#   e.g.   scripts/finetune_full.sh configs/optim/lamb_sgg.yaml
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
launch full -- "$@"
