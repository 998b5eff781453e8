# Shared by scripts/finetune_{full,lora,qlora}.sh; source it, then call
#   launch MODE [RECIPE_ARGS ...] -- OPTIM_CONFIG [USER_ARGS ...]
# RECIPE_ARGS (e.g. the LoRA learning rate) come before USER_ARGS, so the user's --set wins.
# Keeps the official global batch of 128: gradient accumulation = GLOBAL_BATCH / (PER_DEVICE x GPUs).
# Uses every visible GPU through accelerate; NGPUS, GLOBAL_BATCH and PER_DEVICE override.
launch() {
  local mode=$1 root recipe=() ngpus accum
  shift
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do recipe+=("$1"); shift; done
  shift
  local optim=${1:?usage: finetune_$mode.sh OPTIM_CONFIG [--config FILE ...] [--set section.key=value ...]}
  shift
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  ngpus=${NGPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
  local global=${GLOBAL_BATCH:-128} per_device=${PER_DEVICE:-16}
  accum=$(( global / (per_device * (ngpus > 0 ? ngpus : 1)) ))
  accum=$(( accum > 0 ? accum : 1 ))
  local args=(train --config "$root/configs/llava_v1_5_7b_$mode.yaml" --optim "$optim" "${recipe[@]}"
              --set "train.per_device_train_batch_size=$per_device" --set "train.gradient_accumulation_steps=$accum"
              "$@")
  if [ "$ngpus" -gt 1 ]; then
    exec accelerate launch --num_processes "$ngpus" -m llava_sgg.cli "${args[@]}"
  fi
  exec python -m llava_sgg.cli "${args[@]}"
}
