#!/usr/bin/env bash
# The one GPU check: run it on a machine with one CUDA GPU, torch, triton, pytest and pybind11
# already installed (it installs nothing from the network). It builds the project, runs the
# GPU tests, the static report of the Triton launches for this card, the step model's
# prediction beside the measured training step (ViT-B/16 and ViT-L/16, batch 256), then every
# GPU benchmark, prints one table and appends it - with the card, date and commit - to
# bench/RESULTS.md (and to $OUT/gpu_results.md when $OUT is set).
# Budget: under 9 minutes on one H100/H200, each part under its own timeout (SIGINT for
# pytest, so it still prints what it measured): tests 100 s, static report 45 s, predictions
# 2 x 85 s, benchmarks 200 s: about 560 s with the build, inside the device's 600 s.
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
timeout -s INT -k 10 100 python -m pytest tests/test_kernels.py tests/test_models.py tests/test_data_loaders.py -q -x -p no:cacheprovider || status=1

arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'sm_{m}{n}')" 2>/dev/null || echo sm_90)
echo "== static report of the Triton launches for ${arch} (compiled, not run)"
static=$(mktemp)
if timeout -k 5 45 python bench/gpu_static.py --arch "$arch" --model vit_b16,vit_l16 --dtype bf16 \
    --workload pretrain:224,finetune:224 --no-varlen > "$static" 2>&1; then
  { echo; echo "### Static report, ${arch}, bf16, MAE pretraining and fine-tuning at 224"; echo; tail -n +1 "$static"; } >> "$table"
else
  echo "static report failed or timed out (it needs Triton's bundled ptxas):"; tail -5 "$static"; status=1
fi

echo "== step model prediction vs measured step"
for model in vit_base vit_large; do
  timeout -s INT -k 10 85 python bench/predict_vs_measured.py --model "$model" --batch 256 --steps 5 --md "$table" \
    || { echo "prediction vs measured for ${model} failed or timed out"; status=1; }
done

echo "== GPU benchmarks"
export CXRFAST_BENCH_MD="$table"
timeout -s INT -k 10 200 python -m pytest bench/test_bench_kernels.py bench/test_bench_train.py bench/test_bench_gpu_loader.py \
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
