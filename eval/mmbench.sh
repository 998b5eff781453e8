#!/usr/bin/env bash
# MMBench / MMBench-CN dev (official mmbench.sh, mmbench_cn.sh): each TSV row answered once (the TSV
# holds the circular copies), then circular accuracy over the TSV's copies and the submission table.
# --lang cn asks with the Chinese instruction, on the CN split, scored as mmbench_cn.
#   usage: eval/mmbench.sh [--lang en|cn] MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
LANGUAGE=en
if [ "${1:-}" = "--lang" ]; then
  LANGUAGE=${2:?--lang takes en or cn}
  shift 2
fi
case $LANGUAGE in
  en) SCORER=mmbench SPLIT=${SPLIT:-mmbench_dev_20230712} ;;
  cn) SCORER=mmbench_cn SPLIT=${SPLIT:-mmbench_dev_cn_20231003} ;;
  *) echo "$0: --lang takes en or cn, got '$LANGUAGE'" >&2; exit 2 ;;
esac
parse_args "$@"
D=$ROOT/mmbench
answer_chunks "$D/answers/$SPLIT/$NAME.jsonl" answer-mmbench --model "$MODEL" --question-file "$D/$SPLIT.tsv" \
  --lang "$LANGUAGE" --temperature 0 --conv-mode vicuna_v1
mkdir -p "$D/answers_upload/$SPLIT"
llava-sgg score "$SCORER" --questions "$D/$SPLIT.tsv" --answers "$D/answers/$SPLIT/$NAME.jsonl" \
  --submission "$D/answers_upload/$SPLIT/$NAME.tsv"
