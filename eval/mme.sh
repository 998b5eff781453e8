#!/usr/bin/env bash
# MME (official mme.sh): answer, convert to the eval_tool files, acc/acc+/score per subtask.
#   usage: eval/mme.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
parse_args "$@"
D=$ROOT/MME
answer_chunks "$D/answers/$NAME.jsonl" answer --model "$MODEL" --question-file "$D/llava_mme.jsonl" \
  --image-folder "$D/MME_Benchmark_release_version" --temperature 0 --conv-mode vicuna_v1
llava-sgg score mme --answers "$D/answers/$NAME.jsonl" --mme-root "$D/MME_Benchmark_release_version" \
  --results-dir "$D/eval_tool/answers/$NAME"
