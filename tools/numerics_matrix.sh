#!/usr/bin/env bash
# The tolerance-sensitive tests (`pytest -m numerics`) under the CPU kernel choices that change the
# order of floating-point sums on one machine: ATen's vector width, the thread count, and the ISA caps
# of oneDNN and MKL. .ci/run calls it after the main suite.
#
#   bash tools/numerics_matrix.sh            # prints one "numerics [SETTINGS]: N passed" line per run
#
# The main suite runs with what the machine picks (its widest ISA: avx512 where the CPU has it; every
# core); the runs below cover the other values of each setting once (a covering set, not every
# combination, to keep CI short):
#   ATEN_CPU_CAPABILITY: default (no vector kernels), avx2
#   OMP_NUM_THREADS: 1 and 2 (a reduction split over threads adds in another order)
#   ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS: capped at AVX2 in the avx2 run
# The Triton-interpreter tests are not part of it: numpy computes them, which none of these settings
# change.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"
PYTEST=(uv run pytest -q -m numerics -p no:cacheprovider -p no:randomly)

runs=(
  "ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1"
  "ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
)

status=0
for settings in "${runs[@]}"; do
  log=$(mktemp)
  if env $settings "${PYTEST[@]}" >"$log" 2>&1; then
    echo "numerics [$settings]: $(tail -n 1 "$log")"
  else
    status=1
    echo "numerics [$settings]: FAILED"
    tail -n 60 "$log"
  fi
  rm -f "$log"
done
exit $status
