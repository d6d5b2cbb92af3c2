#!/usr/bin/env bash
# One prepared run on a lent GPU: environment, each benchmark invocation given as a quoted
# argument (optionally prefixed by XLA_FLAGS=...), then the golden checks on the device;
# an argument starting with "profile " runs benchmarks/profile_step.py with the rest, one
# starting with "depthwise" benchmarks/depthwise.py.
#   bash benchmarks/gpu_session.sh "--models b16 --modes train" "XLA_FLAGS=--foo --models b16" \
#     "profile --model b16 --mode inference --batch 64"
# The GPU image lacks ml_collections (the recipe configs) and may hold an older flax: carry
# them as wheels in .whl (git-ignored; name .whl in the run's carry), fetched here beforehand:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp -d .whl ml_collections==1.1.0 flax==0.12.8
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
need=""  # carried wheels, installed only for what the image lacks
python3 -c "import flax,sys; v=tuple(int(x) for x in flax.__version__.split('.')[:3]); sys.exit(v < (0,12,8))" \
  || need="$need .whl/flax-*.whl"
python3 -c "import ml_collections" 2> /dev/null || need="$need .whl/ml_collections-*.whl"
if [ -n "$need" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $need \
    && export PYTHONPATH=/tmp/site:. || echo "warning: could not install$need (see above)"
fi
python3 -c "import flax, jax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
for run in "$@"; do
  case "$run" in profile\ *)
    echo "== $(date +%T) profile_step.py ${run#profile }"
    python3 benchmarks/profile_step.py ${run#profile } 2>&1 | tail -60; continue;; esac
  case "$run" in depthwise*)
    echo "== $(date +%T) depthwise.py ${run#depthwise}"
    python3 benchmarks/depthwise.py ${run#depthwise} 2>&1 | grep -E "^\||^Device"; continue;; esac
  flags=""
  case "$run" in XLA_FLAGS=*) flags="${run%% --*}"; flags="${flags#XLA_FLAGS=}"; run="--${run#* --}";; esac
  echo "== $(date +%T) XLA_FLAGS='$flags' $run"  # rows as they come: a cut run keeps them
  XLA_FLAGS="$flags" python3 benchmarks/model_throughput.py $run 2>&1 | grep -E "^\||^Device|^\{"
done
echo "== $(date +%T) golden tests on the device"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_model.py \
  -k "float32 or bfloat16 or float64_matches" 2>&1 | tail -3
