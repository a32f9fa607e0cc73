#!/usr/bin/env bash
# The one GPU check: run it on a machine with one CUDA GPU, torch, triton, pytest and pybind11
# already installed (it installs nothing from the network). It builds the project, runs the
# GPU tests, then every GPU benchmark, prints one table and appends it - with the card, date
# and commit - to bench/RESULTS.md (and to $OUT/gpu_results.md when $OUT is set).
# Budget: well under 8 minutes on one H100/H200; the two pytest runs are interrupted (SIGINT,
# so pytest still prints what it measured) after 150 s and 330 s, inside the device's 600 s.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
table=$(mktemp)
status=0

pip install --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "build failed"; pip install --no-deps --no-build-isolation -e .; exit 1; }
if ! python -c "import pytest_benchmark" 2>/dev/null; then
  # The device has no network: carry the two wheels in an untracked folder, made with
  #   pip download --no-deps -d bench/wheels pytest-benchmark py-cpuinfo
  if ls bench/wheels/pytest_benchmark-*.whl >/dev/null 2>&1; then
    pip install --no-index --no-deps bench/wheels/pytest_benchmark-*.whl bench/wheels/py_cpuinfo-*.whl >/dev/null
  else
    echo "pytest-benchmark is missing: put its wheel (and py-cpuinfo's) in bench/wheels/"; exit 1
  fi
fi

card=$(python -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo "no GPU")
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "GPU check on ${card}, commit ${commit}"

echo "== GPU tests"
timeout -s INT -k 10 150 python -m pytest tests/test_kernels.py tests/test_models.py tests/test_data_loaders.py -q -x -p no:cacheprovider || status=1

echo "== GPU benchmarks"
export CXRFAST_BENCH_MD="$table"
timeout -s INT -k 10 330 python -m pytest bench/test_bench_kernels.py bench/test_bench_train.py bench/test_bench_gpu_loader.py \
    --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds || status=1

{
  echo
  echo "## GPU check: ${card}, $(date -u +%Y-%m-%d), commit ${commit}"
  echo
  echo "Command: \`bash bench/gpu_check.sh\` (tests exit status ${status}); medians in ms, ratios to the cxrfast entry of each group."
  echo
  cat "$table"
} > "${table}.md"
cat "${table}.md"
cat "${table}.md" >> bench/RESULTS.md
if [ -n "${OUT:-}" ]; then cp "${table}.md" "$OUT/gpu_results.md"; fi
echo "GPU check finished in $(( $(date +%s) - start )) s, status ${status}"
exit $status
