#!/usr/bin/env bash
# GQA testdev-balanced (official gqa.sh): answer, the official evaluator's predictions file, accuracy.
#   usage: eval/gqa.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
parse_args "$@"
D=$ROOT/gqa
answer_chunks "$D/answers/$NAME.jsonl" answer --model "$MODEL" --question-file "$D/llava_gqa_testdev_balanced.jsonl" \
  --image-folder "$D/data/images" --temperature 0 --conv-mode vicuna_v1
llava-sgg score gqa --answers "$D/answers/$NAME.jsonl" --questions "$D/data/testdev_balanced_questions.json" \
  --predictions "$D/data/testdev_balanced_predictions.json"
