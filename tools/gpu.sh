#!/usr/bin/env bash
# Every GPU check, benchmark and run this project needs, as the device calls of one session.
# Each stage fits one 10-minute call; a session has 15 device minutes, start-up included, so
# run `classify` (issue 18) in one session's first call and `checks` (issues 15-16) next, or in
# the next session lent a GPU. Nothing here needs the network or a venv (the device machine has
# its own PyTorch): data travels in .data/ (ignored by git, named in the call's carry).
#
# Once, here, before the first call:
#   mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
#   grep -qx '/.data/' .git/info/exclude || echo /.data/ >> .git/info/exclude
# Then one device call per stage (timeout_s=600, carry=[".data"]). The copy of the tree on the
# device has no .git: expand the commit HERE and paste it into the command as a literal, e.g.
# COMMIT=<the output of git rev-parse HEAD here>:
#   COMMIT=<sha> bash tools/gpu.sh classify "$OUT"   # ~7 min by its plan
#   COMMIT=<sha> bash tools/gpu.sh timing "$OUT"     # ~3-4 min (estimate)
#   COMMIT=<sha> bash tools/gpu.sh checks "$OUT"     # <= 9 min: CUDA tests (<= 120 s) + bench
# Each stage writes at most 5 files under OUT (logs, one .tgz or the bench's own files), within
# the device's limits; the bench writes bench.json after every row, straight into OUT.
# Back here: tar xzf the .tgz into results/ (classify-gpu, classify-gpu-timing) or copy
# OUT/bench/cuda/bench.json to results/bench/cuda/, then regenerate the reports:
#   python -m experiments.report results/classify-gpu --out results/classify-gpu/report
#   (add --at-epoch N if the time limit stopped the runs: they are then compared at epoch N)
#   python -m bench.report results/bench/cuda/bench.json && python -m bench.report --summary results/bench
#   python tools/readme.py
set -uo pipefail
usage="usage: bash tools/gpu.sh classify|timing|checks OUT_DIR [options of the stage's command]"
stage=${1:?$usage}
out=${2:?$usage}
shift 2  # the rest goes to the stage's python command (the tests run it on a CPU at tiny sizes)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export EXPERIMENTS_GIT_COMMIT=${COMMIT:-} BENCH_GIT_COMMIT=${COMMIT:-}
if [ -z "${COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "gpu.sh: warning: no .git here and COMMIT is empty: the results will name no commit" \
       "(expand git rev-parse HEAD where the repository is, and pass COMMIT=<sha>)" >&2
fi
py=${PYTHON:-python3}
# the classify stage runs several processes at once: each one's Inductor compile pool gets a
# share of the cores, not all of them
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
data=${DATA:-.data/fashion-mnist}
work=$(mktemp -d)

case "$stage" in
  classify)  # issue 18: 5 variants x 3 seeds x 30 epochs, full width, all of Fashion-MNIST
    { nvidia-smi || echo "nvidia-smi: not found"; } >"$out/nvidia-smi.txt" 2>&1
    timeout -k 10 560 "$py" -m experiments.classify_gpu --data-dir "$data" \
      --out "$work/classify-gpu" "$@" >"$out/classify-gpu.log" 2>&1
    status=$?
    tar czf "$out/classify-gpu.tgz" -C "$work" classify-gpu
    tail -25 "$out/classify-gpu.log"
    if [ "$status" = 124 ]; then  # every run writes each epoch: what they all reached is kept
      echo "classify: stopped by its time limit; compare the runs at an epoch all of them" \
        "reached: python -m experiments.report results/classify-gpu --at-epoch N --out ..."
    fi
    ;;
  timing)  # issue 18: seconds per epoch per variant relative to normal, eager and compiled
    timeout -k 10 500 "$py" -m experiments.classify_gpu --timing --data-dir "$data" \
      --out "$work/classify-gpu-timing" "$@" >"$out/timing.log" 2>&1
    status=$?
    tar czf "$out/classify-gpu-timing.tgz" -C "$work" classify-gpu-timing
    tail -25 "$out/timing.log"
    ;;
  checks)  # issues 15-16: the CUDA tests (CUDA graphs, autocast, syncs), then the benchmark
    # the two limits sum to under the call's 600 s, start-up included
    # no -x: a compile test that differs on the device's torch must not stop the CUDA tests
    timeout -k 5 110 "$py" -m pytest -q -p no:cacheprovider tests/test_engines.py \
      tests/test_amp.py tests/test_weight_norm.py tests/test_edits.py tests/test_mean_only_bn.py \
      tests/test_data_init.py::test_a_model_split_across_devices_is_initialized_as_on_one \
      >"$out/cuda-tests.log" 2>&1
    status=$?
    tail -5 "$out/cuda-tests.log"
    # straight into OUT: every finished row comes back even if the call is cut short
    BENCH_TIMEOUT=420 bash bench/gpu.sh "$out/bench" "$@" || status=$?
    tail -40 "$out/bench/cuda/bench.md" 2>/dev/null
    ;;
  *)
    echo "unknown stage '$stage': expected classify, timing or checks" >&2
    exit 2
    ;;
esac
rm -rf "$work"
exit "$status"
