#!/usr/bin/env bash
# Set up (first time only) and run an experiment; with no arguments, the main one: +experiment=small.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- +experiment=small; fi
exec .venv/bin/python train.py "$@"
