#!/usr/bin/env bash
# LLaVA-v1.5-7B full fine-tuning (official scripts/v1_5/finetune.sh) with any optimizer.
#   usage: scripts/finetune_full.sh OPTIM_CONFIG [--config FILE ...] [--set section.key=value ...]
#   e.g.   scripts/finetune_full.sh configs/optim/lamb_sgg.yaml
# Keeps the official global batch of 128: gradient accumulation = 128 / (16 per device x GPUs),
# unless GLOBAL_BATCH or a --set says otherwise. Uses every visible GPU through accelerate.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OPTIM=${1:?usage: $0 OPTIM_CONFIG [--config FILE ...] [--set section.key=value ...]}
shift
NGPUS=${NGPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
PER_DEVICE=${PER_DEVICE:-16}
ACCUM=$(( GLOBAL_BATCH / (PER_DEVICE * (NGPUS > 0 ? NGPUS : 1)) ))
ACCUM=$(( ACCUM > 0 ? ACCUM : 1 ))
ARGS=(train --config "$ROOT/configs/llava_v1_5_7b_full.yaml" --optim "$OPTIM"
      --set train.per_device_train_batch_size=$PER_DEVICE --set train.gradient_accumulation_steps=$ACCUM "$@")
if [ "$NGPUS" -gt 1 ]; then
  exec accelerate launch --num_processes "$NGPUS" -m llava_sgg.cli "${ARGS[@]}"
fi
exec python -m llava_sgg.cli "${ARGS[@]}"
