# Shared by scripts/pretrain.sh and scripts/finetune_{full,lora,qlora}.sh; source it, then call
#   launch MODE [RECIPE_ARGS ...] -- OPTIM_CONFIG [USER_ARGS ...]
# RECIPE_ARGS (e.g. the LoRA learning rate) come before USER_ARGS, so the user's --set wins.
# Keeps the official global batch (128 by default; pretrain.sh sets 256, 32 per device):
# gradient accumulation = GLOBAL_BATCH / (PER_DEVICE x GPUs x NNODES).
# Uses every visible GPU; NGPUS (per node), GLOBAL_BATCH and PER_DEVICE override.
# Launcher (README "Multi-GPU / multi-node"):
#   LAUNCHER=accelerate (default)  accelerate launch [--config_file $ACCELERATE_CONFIG] --num_processes ...
#   LAUNCHER=torchrun              torchrun --nproc_per_node NGPUS [--nnodes NNODES --node_rank NODE_RANK
#                                           --master_addr MASTER_ADDR --master_port MASTER_PORT]
#   LAUNCHER=python                one process (also what runs when there is one GPU or none)
# ACCELERATE_CONFIG: e.g. configs/accelerate/fsdp2_1node.yaml; DISTRIBUTED=fsdp2 sets train.distributed.
launch() {
  local mode=$1 root recipe=() ngpus accum
  shift
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do recipe+=("$1"); shift; done
  shift
  local optim=${1:?usage: $(basename "$0") OPTIM_CONFIG [--config FILE ...] [--set section.key=value ...]}
  shift
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  ngpus=${NGPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
  local nnodes=${NNODES:-1} launcher=${LAUNCHER:-accelerate}
  local global=${GLOBAL_BATCH:-128} per_device=${PER_DEVICE:-16}
  accum=$(( global / (per_device * (ngpus > 0 ? ngpus : 1) * nnodes) ))
  accum=$(( accum > 0 ? accum : 1 ))
  local args=(train --config "$root/configs/llava_v1_5_7b_$mode.yaml" --optim "$optim" "${recipe[@]}"
              --set "train.per_device_train_batch_size=$per_device" --set "train.gradient_accumulation_steps=$accum")
  [ -n "${DISTRIBUTED:-}" ] && args+=(--set "train.distributed=$DISTRIBUTED")
  args+=("$@")
  if [ "$launcher" = python ] || [ $(( ngpus * nnodes )) -le 1 ]; then
    exec python -m llava_sgg.cli "${args[@]}"
  fi
  case "$launcher" in
    accelerate)
      local config=()
      [ -n "${ACCELERATE_CONFIG:-}" ] && config=(--config_file "$ACCELERATE_CONFIG")
      local nodes=()
      [ "$nnodes" -gt 1 ] && nodes=(--num_machines "$nnodes" --machine_rank "${NODE_RANK:?NODE_RANK is required with NNODES > 1}"
                                    --main_process_ip "${MASTER_ADDR:?}" --main_process_port "${MASTER_PORT:-29500}")
      exec accelerate launch "${config[@]}" "${nodes[@]}" --num_processes $(( ngpus * nnodes )) \
        -m llava_sgg.cli "${args[@]}" ;;
    torchrun)
      local nodes=(--standalone)
      [ "$nnodes" -gt 1 ] && nodes=(--nnodes "$nnodes" --node_rank "${NODE_RANK:?NODE_RANK is required with NNODES > 1}"
                                    --master_addr "${MASTER_ADDR:?}" --master_port "${MASTER_PORT:-29500}")
      exec torchrun "${nodes[@]}" --nproc_per_node "$ngpus" -m llava_sgg.cli "${args[@]}" ;;
    *)
      echo "LAUNCHER must be accelerate, torchrun or python; got $launcher" >&2
      exit 2 ;;
  esac
}
