#!/usr/bin/env bash
# The GPU checks, ready for the day a GPU is at hand: ./bench/gpu_check.sh [--quick]
#
# Runs what this machine can (on CPU: the bf16 kill/resume and the 1.2 GB save), says what it
# skipped and why, and prints one table (bench/gpu_check.py has the list). Needs no network:
# the data is generated, the model and tokenizer are local. Exit 1 if a check failed.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$HERE/launch.sh" setup  # .venv/ (or $RESUMABLE_VENV), as launch.sh and tests/run.sh use it
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${RESUMABLE_VENV:-$HERE/.venv}/bin/python" "$HERE/bench/gpu_check.py" "$@"
