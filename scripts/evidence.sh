#!/usr/bin/env bash
# The studies of docs/evidence.md on one GPU, then their reports.
#   usage: scripts/evidence.sh [DIR] [PART ...]     (DIR default runs/evidence)
#   parts: demo-1 .. demo-4, the grids of configs/study/demo_evidence.yaml; demo, all four in one pool (in plan
#          order, so no GPU slot idles between grids); lm, configs/study/lm_pretrain.yaml;
#          default: all of them. JOBS runs share the GPU at a time (default 12). MPS=1 runs them under a CUDA
#          MPS daemon of its own (started here, stopped at exit), so they share the GPU instead of taking turns.
# A study resumes where it stopped (finished runs are skipped), so parts can be run on different days
# and machines into one DIR. The reports: DIR/demo/report.md and DIR/lm/report.md.
set -euo pipefail
dir=${1:-runs/evidence}
shift || true
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(demo lm)
jobs=${JOBS:-12}
# Many small runs share the GPU; their CPU work is one thread each.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
mkdir -p "$dir/demo" "$dir/lm"
if [ -n "${MPS:-}" ]; then
  command -v nvidia-cuda-mps-control >/dev/null || { echo "MPS=1, but nvidia-cuda-mps-control is not installed"; exit 2; }
  export CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d) CUDA_MPS_LOG_DIRECTORY=$(mktemp -d)
  nvidia-cuda-mps-control -d
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
  # A daemon that starts but serves no client would fail every run; find out with one small one first.
  python -c "import torch; torch.ones(1, device='cuda').sum().item()" ||
    { echo "MPS=1: a CUDA process cannot run under the MPS daemon (see $CUDA_MPS_LOG_DIRECTORY)"; exit 2; }
fi
for part in "${parts[@]}"; do
  case $part in
    demo|demo-[1-4])
      # Each seed's start (data, tower, decoder, connector), built once and shared read-only by its runs.
      for seed in 0 1 2; do
        llava-sgg demo --prepare-only --seed "$seed" --cache "$dir/demo/cache/seed$seed" \
          --output "$dir/demo/prepare-$seed" > "$dir/demo/prepare-$seed.log" 2>&1 &
      done
      for job in $(jobs -p); do wait "$job" || { echo "preparing a seed failed: see $dir/demo/prepare-*.log"; exit 1; }; done
      grid=(); [ "$part" = demo ] || grid=(--part "${part#demo-}")
      llava-sgg study configs/study/demo_evidence.yaml --output "$dir/demo" --jobs "$jobs" "${grid[@]}"
      ;;
    lm)
      [ -f "$dir/lm/corpus/corpus.json" ] ||
        python -m llava_sgg.study.lm corpus --package transformers --output "$dir/lm/corpus"
      llava-sgg study configs/study/lm_pretrain.yaml --output "$dir/lm" --jobs "$jobs"
      ;;
    *) echo "unknown part $part (demo, demo-1 .. demo-4, lm)"; exit 2 ;;
  esac
done
for study in demo lm; do
  [ -f "$dir/$study/plan.yaml" ] && llava-sgg report "$dir/$study"
done
exit 0
