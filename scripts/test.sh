#!/usr/bin/env bash
# Set up (first time only), lint, and run the whole test suite (pytest). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_SILENT=true
exec .venv/bin/python -m pytest "$@"
