#!/usr/bin/env bash
# SEED-Bench (official seed.sh): answer every question of llava-seed-bench.jsonl, the video ones from
# their middle frame (extracted beforehand to the image path the file names, as LLaVA's Evaluation.md
# says), then image, video and overall accuracy (overall = LLaVA-1.5's SEED column) and the upload file.
#   usage: eval/seed.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
parse_args "$@"
D=$ROOT/seed_bench
answer_chunks "$D/answers/$NAME.jsonl" answer --model "$MODEL" --question-file "$D/llava-seed-bench.jsonl" \
  --image-folder "$D" --temperature 0 --conv-mode vicuna_v1
mkdir -p "$D/answers_upload"
llava-sgg score seed --annotation "$D/SEED-Bench.json" --answers "$D/answers/$NAME.jsonl" \
  --questions "$D/llava-seed-bench.jsonl" --upload "$D/answers_upload/$NAME.jsonl"
