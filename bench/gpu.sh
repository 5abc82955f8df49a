#!/usr/bin/env bash
# Issue 16's GPU rows in one call that fits a 10-minute device lease (about 4 minutes on an H200).
#
#   bash bench/gpu.sh "$OUT"        # on the CUDA machine, from the repository root or anywhere
#
# writes $OUT/cuda/bench.json, $OUT/cuda/bench.md and $OUT/cuda/log.txt (nvidia-smi's state
# before and after, and the run's output). Where the copy of the tree has no .git, pass the
# commit it was copied from: BENCH_GIT_COMMIT=<sha> bash bench/gpu.sh "$OUT" (the JSON also
# records a sha256 of wnorm/ and bench/, which names the code either way).
# Then, on the machine with the repository:
#   mkdir -p results/bench/cuda && cp OUT/cuda/bench.json results/bench/cuda/
#   python -m bench.report results/bench/cuda/bench.json && python -m bench.report --summary results/bench
# Extra arguments go to python -m bench.run after the defaults below (later ones win), e.g.
# --cases 'hifigan*' or, to test this script without a GPU (tests/test_bench.py does):
#   PYTHON=.venv/bin/python bash bench/gpu.sh /tmp/g --device cpu --rows cuda --quick --no-compile
set -euo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR [python -m bench.run options]}
shift
mkdir -p "$out/cuda"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/cuda/log.txt"
smi() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used,utilization.gpu --format=csv
  else
    echo "nvidia-smi: not found"
  fi
}
{ echo "== nvidia-smi before"; smi; } >"$log" 2>&1
# --time-limit: no row starts after 300 s, so a slow machine still ends inside the lease with
# every finished row written; timeout is the backstop.
status=0
timeout -k 10 "${BENCH_TIMEOUT:-540}" "${PYTHON:-python3}" -m bench.run --device cuda --out "$out/cuda" \
  --time-limit 300 "$@" 2>&1 | tee -a "$log" || status=$?
{ echo "== nvidia-smi after"; smi; } >>"$log" 2>&1
exit "$status"
