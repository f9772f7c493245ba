#!/usr/bin/env bash
# The GPU check in one call to a lent GPU machine: the `gpu`-marked tests (tests/test_gpu.py) and
# benchmarks/bench_gpu.py. Those machines have no network; their python3 holds CUDA torch and transformers.
# The engine runs from this checkout (no install); the one package it needs that they lack, platformdirs,
# travels as a wheel. From the repository root, here:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl platformdirs
#
# then one device call: command `bash benchmarks/gpu_check.sh`, carry [".whl"], timeout 600. It writes
# gpu.txt, gpu_tests.log and bench_gpu.log under $OUT. A dry run on a machine without a GPU, with the
# project's virtual environment first on PATH:
#
#   BLIPSEARCH_GPU_TEST_DEVICE=cpu BENCH_GPU_ARGS="--device cpu --images 8 --batch 8 --queries 2" \
#       PATH=$PWD/.venv/bin:$PATH bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
site=$(mktemp -d /tmp/blipsearch-site.XXXX)
trap 'rm -rf "$site"' EXIT
mkdir -p "$site/blipsearch"
for package in retrieval indexer training; do ln -s "$PWD/$package" "$site/blipsearch/$package"; done
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
# what the checks need, before any device time goes to them
python3 - <<'CHECK' || exit 1
import os, sys
missing = []
for name in ("pytest", "PIL", "yaml", "tqdm", "platformdirs", "safetensors", "tokenizers"):
    try:
        __import__(name)
    except ImportError:
        missing.append(name)
import torch, transformers
if int(transformers.__version__.split(".")[0]) != 5:
    missing.append(f"transformers 5 (found {transformers.__version__})")
if os.environ.get("BLIPSEARCH_GPU_TEST_DEVICE", "cuda") == "cuda" and not torch.cuda.is_available():
    missing.append("a CUDA device that torch sees")
if missing:
    sys.exit("gpu_check.sh: missing " + ", ".join(missing))
CHECK
{
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
tests=${PIPESTATUS[0]}
# shellcheck disable=SC2086  # BENCH_GPU_ARGS holds several arguments
timeout 300 python3 benchmarks/bench_gpu.py --workdir "$site/bench" ${BENCH_GPU_ARGS:-} 2>&1 | tee "$OUT/bench_gpu.log"
bench=${PIPESTATUS[0]}
echo "gpu tests: exit $tests; bench_gpu.py: exit $bench"
exit $((tests != 0 || bench != 0))
