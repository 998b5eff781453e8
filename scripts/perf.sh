#!/usr/bin/env bash
# The measurements behind docs/performance.md's training-throughput targets, on one GPU, each a JSON in DIR.
#   usage: scripts/perf.sh [DIR] [PART ...]     (DIR default runs/perf)
#   parts (default: all, in this order):
#     lora-mix      LLaVA-7B shapes, LoRA r=128, LLaVA-mix-like lengths: the stock loop against llava-sgg padded
#                   and packed, with sdpa and with flex_attention, AdamW and AdamW+SGG (target: >= 1.5x stock)
#     lora-uniform  the same on uniform 876-token samples (target: >= 1.3x stock)
#     full          full fine-tuning, fp32 masters, OpenLLaMA-3B shapes behind the same tower, batch 8 (at 16 the
#                   stock loop runs out of memory on an 80 GB H100), and GaLore's LLaMA-1B at 16 (target: >= 1.3x)
#     levers        train.liger, train.compile, train.checkpoint_layers (16, and auto with Liger, with and without
#                   train.lean_lora_dropout) on 7B LoRA's
#                   flex_attention rows, on the lengths in LEVER_LENGTHS (default "mix"; "mix uniform" for both)
#     sgg-cost      SGG's cost over a whole run, AdamW against AdamW+SGG, A B B A, every run in a new process with
#                   empty compile caches (`llava-sgg bench run --cold`):
#                   the GPU demo's fine-tuning (DEMO_STEPS, default 2500, a re-clustering every 50; DEMO_CACHE,
#                   default ~/.cache/llava-sgg, is built first if missing; DEVICE_PROFILE=N adds torch.profiler's
#                   view of each optimizer's last N steps) and 7B LoRA on packed mixed lengths (target: <= 1.05x on
#                   both)
#     loss          packed against padded loss curves in bf16 and fp32 (`llava-sgg bench loss`): 7B LoRA and 1B full
#                   on mixed lengths (target: packing's difference within bf16's own noise)
# BENCH_ARGS (e.g. "--steps 6 --warmup 2") goes to every bench pipeline run.
# Each part is one or more `llava-sgg bench pipeline`, `bench run` or `bench loss` runs (docs/performance.md says what they time); a
# part's files are named by its settings, so parts can run on different days into one DIR.
set -euo pipefail
dir=${1:-runs/perf}
shift || true
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(lora-mix lora-uniform full levers sgg-cost loss)
mkdir -p "$dir"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
bench() { llava-sgg bench pipeline --output "$dir" ${BENCH_ARGS:-} "$@"; }
for part in "${parts[@]}"; do
  case $part in
    lora-mix)
      bench --size 7b --mode lora --lengths mix --attn sdpa
      bench --size 7b --mode lora --lengths mix --attn flex_attention --optimizers adamw,adamw_sgg
      ;;
    lora-uniform) bench --size 7b --mode lora --lengths uniform --attn flex_attention ;;
    full)
      bench --size 3b --mode full --lengths mix --attn flex_attention --batch 8
      bench --size 1b --mode full --lengths mix --attn flex_attention
      ;;
    levers)
      for lengths in ${LEVER_LENGTHS:-mix}; do
        bench --size 7b --mode lora --lengths "$lengths" --attn flex_attention --liger
        bench --size 7b --mode lora --lengths "$lengths" --attn flex_attention --compile
        bench --size 7b --mode lora --lengths "$lengths" --attn flex_attention --checkpoint-layers 16
        bench --size 7b --mode lora --lengths "$lengths" --attn flex_attention --liger --checkpoint-layers auto
        bench --size 7b --mode lora --lengths "$lengths" --attn flex_attention --liger --checkpoint-layers auto \
          --lean-lora-dropout
      done
      ;;
    sgg-cost)
      llava-sgg bench run --setup demo --steps "${DEMO_STEPS:-2500}" --cold --output "$dir" ${DEMO_CACHE:+--cache "$DEMO_CACHE"} \
        ${DEVICE_PROFILE:+--device-profile "$DEVICE_PROFILE"}
      llava-sgg bench run --setup 7b --mode lora --attn flex_attention --steps 60 --recluster-interval 20 \
        --repeats 1 --cold --output "$dir"
      ;;
    loss)
      llava-sgg bench loss --size 7b --mode lora --lengths mix --attn flex_attention --output "$dir"
      llava-sgg bench loss --size 1b --mode full --lengths mix --attn flex_attention --output "$dir"
      ;;
    *) echo "unknown part $part (lora-mix, lora-uniform, full, levers, sgg-cost, loss)"; exit 2 ;;
  esac
done
