#!/usr/bin/env bash
# The main job on the embedded default, on a fresh machine: set up the environment, then evaluate.
#
# configs/quickstart.yaml builds the demo MoE once (cached), starts two servers of our runtime on CPU (W4AFP8
# candidate, FP8 baseline), runs generative MMLU (64 questions) and the divergence probe on the baseline's MATH-500
# and AIME24 answers, gates, updates results/leaderboard.{md,html} and exits with the verdict (0 pass,
# 1 regression, 2 input error, 3 infrastructure). One environment variable picks each scenario (README):
#   EVALPIPE_FAULT=clip_act_scale:29:64 bash scripts/quickstart.sh    a planted fault: fails, by accuracy and divergence
#   EVALPIPE_CANDIDATE_VARIANT=fp8 bash scripts/quickstart.sh         A/A: the baseline against itself, passes
#   usage: bash scripts/quickstart.sh [extra evalpipe run options, e.g. --dry-run]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
exec evalpipe run configs/quickstart.yaml "$@"
