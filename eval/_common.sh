# Shared by eval/<benchmark>.sh (source it). The layout is the official LLaVA one:
# EVAL_ROOT (default playground/data/eval) / <benchmark> / question files, images, answers/.
#   parse_args MODEL_FOLDER [EVAL_ROOT]   sets MODEL, NAME (the folder's name) and ROOT
#   answer_chunks OUT.jsonl COMMAND ARGS  runs `llava-sgg COMMAND ARGS` once per visible GPU on its
#                                          chunk of the questions (as the official scripts), then merges
parse_args() {
  MODEL=${1:?usage: $0 MODEL_FOLDER [EVAL_ROOT]}
  ROOT=${2:-${EVAL_ROOT:-playground/data/eval}}
  NAME=$(basename "$MODEL")
}

answer_chunks() {
  local out=$1
  shift
  local gpus ids pids=() parts=()
  gpus=${CUDA_VISIBLE_DEVICES:-$(python -c "import torch; print(','.join(map(str, range(torch.cuda.device_count()))))")}
  IFS=',' read -ra ids <<< "$gpus"
  if [ "${#ids[@]}" -le 1 ]; then
    llava-sgg "$@" --answers-file "$out"
    return
  fi
  for i in "${!ids[@]}"; do
    parts+=("${out%.jsonl}.chunk$i.jsonl")
    CUDA_VISIBLE_DEVICES=${ids[$i]} llava-sgg "$@" --answers-file "${parts[$i]}" \
      --num-chunks "${#ids[@]}" --chunk-idx "$i" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  llava-sgg answer-merge "${parts[@]}" --output "$out"
}
