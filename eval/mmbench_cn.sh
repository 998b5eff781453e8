#!/usr/bin/env bash
# MMBench-CN dev (official mmbench_cn.sh): the Chinese instruction, each TSV row answered once,
# then circular accuracy over the TSV's copies and the submission table.
#   usage: eval/mmbench_cn.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
parse_args "$@"
D=$ROOT/mmbench
SPLIT=${SPLIT:-mmbench_dev_cn_20231003}
answer_chunks "$D/answers/$SPLIT/$NAME.jsonl" answer-mmbench --model "$MODEL" --question-file "$D/$SPLIT.tsv" \
  --lang cn --temperature 0 --conv-mode vicuna_v1
mkdir -p "$D/answers_upload/$SPLIT"
llava-sgg score mmbench_cn --questions "$D/$SPLIT.tsv" --answers "$D/answers/$SPLIT/$NAME.jsonl" \
  --submission "$D/answers_upload/$SPLIT/$NAME.tsv"
