#!/usr/bin/env bash
# LLaVA-v1.5-7B stage 1 (official scripts/v1_5/pretrain.sh: the connector alone on LCS-558K, lr 1e-3, global batch 256, 1 epoch) with any optimizer.
#   usage: scripts/pretrain.sh OPTIM_CONFIG [--config FILE ...] [--set section.key=value ...]
#   e.g.   scripts/pretrain.sh configs/optim/adamw.yaml   (the official recipe)
# Writes checkpoints/llava-v1.5-7b-pretrain/mm_projector.safetensors, which the finetune scripts then load.
set -euo pipefail
source "$(dirname "$0")/_launch.sh"
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
PER_DEVICE=${PER_DEVICE:-32}
launch pretrain --set optimizer.lr=1.0e-3 -- "$@"
