#!/usr/bin/env bash
# Set up (first time only), lint, and run the whole test suite (pytest). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "test: ruff check ."
.venv/bin/ruff check .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_SILENT=true
if [ $# -eq 0 ]; then
    echo "test: pytest, the whole suite: about 12 minutes on 2 quiet cores, far longer on a busy machine"
else
    echo "test: pytest $*"
fi
exec .venv/bin/python -m pytest "$@"
