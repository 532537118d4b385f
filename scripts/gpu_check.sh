#!/usr/bin/env bash
# The GPU path in one call on a CUDA machine, in under 8 minutes: what it is, the CUDA tests, the benchmark's
# CUDA rows (eager and as a CUDA graph), and experiment=mnist_fast_gpu over 5 seeds. Everything goes to the
# console and to the results file (default: gpu_check.txt in the current directory). docs/development.md says
# how to read it.
#
#   bash scripts/gpu_check.sh                      # results in ./gpu_check.txt
#   bash scripts/gpu_check.sh results/gpu.txt      # elsewhere (a path relative to the repository root)
#   MIRROR=/data/mnist-mirror bash scripts/gpu_check.sh   # MNIST's raw files from a local mirror (offline)
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). Each part has its own time
# limit and the script goes on after a part fails; its exit status says whether every part passed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=$(realpath -m "${1:-gpu_check.txt}")
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "error: gpu_check.sh needs a CUDA GPU, and $PY's torch sees none (torch.cuda.is_available() is false)" >&2
    exit 1
fi
failed=()

part() {  # part NAME SECONDS COMMAND...: run one part under a time limit, note it if it fails
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local status=$?
    echo "== $name: exit $status after $((SECONDS - start))s"
    [ "$status" -eq 0 ] || failed+=("$name (exit $status)")
}

{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    part machine 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        $PY -c 'import torch, sys; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"CUDA build\",
            torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version(), \"device\", torch.cuda.get_device_name(),
            \"capability\", torch.cuda.get_device_capability())'"
    part data 60 "$PY" scripts/provision_data.py ${MIRROR:+--mirror "$MIRROR"}  # MNIST and FashionMNIST (the real-data fixture)
    # FORKSERVER=0: each train.py a test starts is a fresh process, never a fork of one that may have touched CUDA
    part cuda-tests 200 env FORKSERVER=0 "$PY" -m pytest -m cuda -n 8 -p no:cacheprovider -q -rA --tb=short \
        --durations=10 tests/test_cuda.py
    part mnist-fast-gpu 90 "$PY" scripts/benchmark.py --mnist-fast 5 --experiment mnist_fast_gpu
    part benchmark-eager 120 "$PY" scripts/benchmark.py --devices cuda --reps 3 --samples 20480
    part benchmark-graphs 90 "$PY" scripts/benchmark.py --devices cuda --reps 3 --no-tutorial --models logistic mlp cnn \
        --set trainer.cuda_graphs=true scheduler.cycle_momentum=false
    part mnist-fast-gpu-eager 60 "$PY" scripts/benchmark.py --mnist-fast 3 --experiment mnist_fast_gpu \
        --set trainer.cuda_graphs=false
    echo
    if [ ${#failed[@]} -eq 0 ]; then echo "gpu_check: every part passed"; else echo "gpu_check: FAILED: ${failed[*]}"; fi
} 2>&1 | tee "$RESULTS"
grep -q "every part passed" "$RESULTS"
