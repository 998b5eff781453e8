#!/usr/bin/env bash
# ScienceQA-IMG (official sqa.sh): single-prediction prompt, then accuracy and IMG accuracy.
#   usage: eval/sqa.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
parse_args "$@"
D=$ROOT/scienceqa
answer_chunks "$D/answers/$NAME.jsonl" answer-sqa --model "$MODEL" --question-file "$D/llava_test_CQM-A.json" \
  --image-folder "$D/images/test" --temperature 0 --conv-mode vicuna_v1
llava-sgg score sqa --answers "$D/answers/$NAME.jsonl" --base-dir "$D" --split test
