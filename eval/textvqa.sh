#!/usr/bin/env bash
# TextVQA val (official textvqa.sh): answer with the OCR-token prompts, then accuracy.
#   usage: eval/textvqa.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
parse_args "$@"
D=$ROOT/textvqa
answer_chunks "$D/answers/$NAME.jsonl" answer --model "$MODEL" --question-file "$D/llava_textvqa_val_v051_ocr.jsonl" \
  --image-folder "$D/train_images" --temperature 0 --conv-mode vicuna_v1
llava-sgg score textvqa --answers "$D/answers/$NAME.jsonl" --annotations "$D/TextVQA_0.5.1_val.json"
