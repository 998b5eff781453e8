#!/usr/bin/env bash
# MMBench dev (official mmbench.sh): each TSV row answered once (the TSV holds the circular copies),
# then circular accuracy over the TSV's copies and the submission table.
#   usage: eval/mmbench.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
parse_args "$@"
D=$ROOT/mmbench
SPLIT=${SPLIT:-mmbench_dev_20230712}
answer_chunks "$D/answers/$SPLIT/$NAME.jsonl" answer-mmbench --model "$MODEL" --question-file "$D/$SPLIT.tsv" \
  --lang en --temperature 0 --conv-mode vicuna_v1
mkdir -p "$D/answers_upload/$SPLIT"
llava-sgg score mmbench --questions "$D/$SPLIT.tsv" --answers "$D/answers/$SPLIT/$NAME.jsonl" \
  --submission "$D/answers_upload/$SPLIT/$NAME.tsv"
