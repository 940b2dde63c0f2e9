#!/usr/bin/env bash
# One command for a GPU lease (fits in 8 minutes on an H200, set-up included):
#   bench/gpu.sh [bundle dir]        default: models/mnist/<latest>
# Uses the machine's python3 and its CUDA torch; installs the service's own packages from
# wheels in bench/wheels/ when the machine has no network (pip download -d bench/wheels
# fastapi uvicorn pydantic python-multipart prometheus-client pillow safetensors tqdm httpx mlxtend, beforehand).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
missing=$($PY - <<'PYEOF'
import importlib.util as u
print(" ".join(m for m in ("fastapi", "uvicorn", "pydantic", "multipart", "prometheus_client", "PIL", "safetensors",
                           "tqdm", "httpx", "mlxtend", "onnxruntime") if u.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "installing: $missing"
  $PY -m pip install -q --no-index --find-links bench/wheels fastapi uvicorn pydantic python-multipart \
    prometheus-client pillow safetensors tqdm httpx mlxtend 2>&1 | tail -3 \
    || echo "some wheels are missing from bench/wheels: the rows that need them will say so"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
bundle=${1:-models/mnist/$(ls models/mnist | sort -n | tail -1)}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 450 $PY bench/gpu.py --bundle "$bundle"
