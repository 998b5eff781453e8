#!/usr/bin/env bash
# MMBench-CN dev (official mmbench_cn.sh): eval/mmbench.sh with the Chinese instruction.
#   usage: eval/mmbench_cn.sh MODEL_FOLDER [EVAL_ROOT]   (EVAL_ROOT defaults to playground/data/eval)
exec bash "$(dirname "$0")/mmbench.sh" --lang cn "$@"
