#!/usr/bin/env bash
# VQAv2 test-dev (official vqav2.sh): answer, then the EvalAI upload file (submission only).
#   usage: eval/vqav2.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
parse_args "$@"
D=$ROOT/vqav2
answer_chunks "$D/answers/$NAME.jsonl" answer --model "$MODEL" --question-file "$D/llava_vqav2_mscoco_test-dev2015.jsonl" \
  --image-folder "$D/test2015" --temperature 0 --conv-mode vicuna_v1
mkdir -p "$D/answers_upload"
llava-sgg score vqav2 --answers "$D/answers/$NAME.jsonl" --questions "$D/llava_vqav2_mscoco_test-dev2015.jsonl" \
  --test-questions "$D/llava_vqav2_mscoco_test2015.jsonl" --upload "$D/answers_upload/$NAME.json"
