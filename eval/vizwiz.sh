#!/usr/bin/env bash
# VizWiz test (official vizwiz.sh): answer, then the upload file (submission only).
#   usage: eval/vizwiz.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
parse_args "$@"
D=$ROOT/vizwiz
answer_chunks "$D/answers/$NAME.jsonl" answer --model "$MODEL" --question-file "$D/llava_test.jsonl" \
  --image-folder "$D/test" --temperature 0 --conv-mode vicuna_v1
mkdir -p "$D/answers_upload"
llava-sgg score vizwiz --answers "$D/answers/$NAME.jsonl" --questions "$D/llava_test.jsonl" \
  --upload "$D/answers_upload/$NAME.json"
