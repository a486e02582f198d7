#!/usr/bin/env bash
# The GPU check (issue 23), on a bare machine with torch (CUDA), numpy and safetensors: the model-level checks
# on CUDA in bfloat16 (experiments/gpu_check.py), then the GPU benchmark (experiments/bench_gpu.py), at most
# 8 minutes on one H100/H200. Everything lands in OUTDIR: checks.json, bench_gpu.json, bench_gpu.md and the
# logs. --smoke runs two of the checks and the benchmark at a tiny shape on the CPU, in seconds: that the
# runner works on a bare machine (the tests' run; pytest runs every check on the CPU), not a measurement.
#   bash scripts/gpu_check.sh OUTDIR [--smoke]
set -uo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ] || { [ $# -eq 2 ] && [ "$2" != "--smoke" ]; }; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR [--smoke]" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${2:-}" = "--smoke" ]; then
    checks_args=(--device cpu --checks check_ops_match_formulas check_moe_grouped_equals_loop) bench_args=(--smoke)
else
    checks_args=(--device cuda) bench_args=(--budget-s 240)
fi

echo "gpu_check: model checks (at most 150 s), then the benchmark (at most 320 s); results in $OUT"
timeout 150 "$PY" experiments/gpu_check.py "${checks_args[@]}" --out "$OUT" 2>&1 | tee "$OUT/checks.log"
checks=${PIPESTATUS[0]}
timeout 320 "$PY" experiments/bench_gpu.py "${bench_args[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}

echo "gpu_check summary:"
grep -h "checks passed" "$OUT/checks.log" || echo "  the checks did not finish (exit $checks)"
grep -h "^targets met" "$OUT/bench.log" || echo "  the benchmark did not finish (exit $bench); partial results in $OUT"
[ "$checks" -eq 0 ] && [ "$bench" -eq 0 ]
