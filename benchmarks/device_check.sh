#!/usr/bin/env bash
# The CUDA-graph checks on a machine with a GPU, in one run (well under 10 minutes on one
# H200): the CUDA tests of the cuda_graph setting, the solver tests on CUDA, and the
# benchmark. Run from the repository root:
#
#     bash benchmarks/device_check.sh [RESULTS_DIR]
#
# Results (logs, cuda_graphs.json/.md) go to RESULTS_DIR (default benchmarks/results/cuda/);
# when $OUT is set (a machine whose $OUT folder comes back), they are copied there too.
set -u -o pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-benchmarks/results/cuda}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
# the project's own dependencies, without touching the installed torch
python -c "import pytest, hypothesis, scipy" 2>/dev/null || pip install -q pytest hypothesis scipy

status=0
echo "== tests/test_cuda_graphs.py (CUDA) =="
timeout 240 python -m pytest -q -p no:cacheprovider -rs tests/test_cuda_graphs.py 2>&1 \
    | tee "$RESULTS/test_cuda_graphs.log" || status=1
echo "== solver tests on CUDA (IL_TEST_DEVICE=cuda) =="
IL_TEST_DEVICE=cuda timeout 150 python -m pytest -q -p no:cacheprovider -x \
    tests/test_adaptive.py tests/test_linear.py 2>&1 | tail -n 30 \
    | tee "$RESULTS/test_solvers_cuda.log" || status=1
echo "== benchmark =="
timeout 150 python -m benchmarks.cuda_graphs --out "$RESULTS" 2>&1 \
    | tee "$RESULTS/cuda_graphs.log" || status=1

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$RESULTS"/test_cuda_graphs.log "$RESULTS"/test_solvers_cuda.log "$RESULTS"/cuda_graphs.* \
        "$OUT"/ 2>/dev/null || true
fi
exit $status
