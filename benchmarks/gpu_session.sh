#!/usr/bin/env bash
# One prepared run on a lent GPU: environment, golden checks on the device, throughput.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import flax, jax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())
PY
python3 -c "import flax,sys; v=tuple(int(x) for x in flax.__version__.split('.')[:3]); sys.exit(v < (0,12,8))" || {
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.; }
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_model.py -k "float32 or bfloat16 or float64_matches" 2>&1 | tail -3
python3 benchmarks/model_throughput.py "$@"
