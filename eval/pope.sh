#!/usr/bin/env bash
# POPE (official scripts/v1_5/eval/pope.sh): answer, then accuracy/precision/recall/F1 per category.
#   usage: eval/pope.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
parse_args "$@"
D=$ROOT/pope
answer_chunks "$D/answers/$NAME.jsonl" answer --model "$MODEL" --question-file "$D/llava_pope_test.jsonl" \
  --image-folder "$D/val2014" --temperature 0 --conv-mode vicuna_v1
llava-sgg score pope --answers "$D/answers/$NAME.jsonl" --questions "$D/llava_pope_test.jsonl" --annotation-dir "$D/coco"
