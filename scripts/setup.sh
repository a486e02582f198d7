#!/usr/bin/env bash
# Create .venv and install LEGO with its dev tools. Idempotent: re-installs only when pyproject.toml changed.
# torch is pinned to 2.13.0 first (the CPU build; an unpinned torch would pull a multi-GB CUDA build),
# while pyproject.toml keeps a range so users on other machines get what fits them.
# Prints one line per step (on a terminal, its seconds ticking) and keeps pip's output for a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${LEGO_TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.lego-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup: .venv is up to date"
    exit 0
fi

log=$(mktemp)
ticker=
trap 'if [ -n "$ticker" ]; then kill "$ticker" 2>/dev/null; fi; rm -f "$log"' EXIT

step() {  # step WHAT COMMAND...: run COMMAND with its output in $log, shown only if it fails
    local what=$1 start=$SECONDS
    shift
    if [ -t 1 ]; then
        (while :; do printf '\rsetup: %s ... %d s' "$what" $((SECONDS - start)); sleep 1; done) &
        ticker=$!
    else
        echo "setup: $what ..."
    fi
    local status=0
    "$@" >"$log" 2>&1 || status=$?
    if [ -n "$ticker" ]; then
        kill "$ticker" 2>/dev/null
        wait "$ticker" 2>/dev/null || true
        ticker=
        printf '\r\033[K'
    fi
    if [ "$status" -ne 0 ]; then
        cat "$log" >&2
        echo "setup: failed while $what (its output above)" >&2
        exit "$status"
    fi
    echo "setup: $what: $((SECONDS - start)) s"
}

if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $PYTHON" "$PYTHON" -m venv .venv
fi
step "upgrading pip" .venv/bin/python -m pip install --upgrade pip
step "installing $TORCH_SPEC (CPU build, about a minute)" .venv/bin/python -m pip install "$TORCH_SPEC"
step "installing LEGO and its dev tools (pip install -e '.[dev]', about a minute)" \
    .venv/bin/python -m pip install -e '.[dev]'
echo "$want" >"$stamp"
echo "setup: done in $SECONDS s; run tools from .venv/bin/ or 'source .venv/bin/activate'"
