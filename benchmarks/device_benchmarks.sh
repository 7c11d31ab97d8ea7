#!/usr/bin/env bash
# The accelerator benchmarks, as one run: the digits metrics' seed spread up to 32,768 samples
# (benchmarks/digits_metric_noise.py), CIFAR-10 FP and QAT steps/s at batch 64 and DDIM sampling
# throughput (FP teacher, fake-quant W1A4 student, int8 export), JSON and logs into OUT. Each part
# is cut off after RUN_LIMIT_S seconds (default 240) so that a slow one leaves time for the rest.
#
#   benchmarks/device_benchmarks.sh OUT_DIR
#
# Runs with the machine's own jax/flax/optax/orbax (a GPU image's, say). Pure-Python requirements
# it lacks are installed from wheels in .whl/ when that folder exists (ml_collections, clu). Where
# TensorFlow / tensorflow-datasets are absent, import-only stand-ins are put on the path: clu and
# the input pipeline import them at module level, and none of these benchmarks calls them (CIFAR
# steps are timed on noise images with --noise_data; no TensorBoard writer is made).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
out=${1:?usage: benchmarks/device_benchmarks.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
site=$(mktemp -d)
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
fi
for module in tensorflow tensorflow_datasets; do
  if ! "$py" -c "import $module" 2>/dev/null; then
    mkdir -p "$site/$module"
    cat >"$site/$module/__init__.py" <<'EOF'
"""Import-only stand-in (benchmarks/device_benchmarks.sh): every attribute and call is inert."""


class _AbsentType(type):
  def __getattr__(cls, name):
    return cls()


class _Absent(metaclass=_AbsentType):
  def __getattr__(self, name):
    return self

  def __call__(self, *args, **kwargs):
    return self

  def __mro_entries__(self, bases):
    return (object,)


def __getattr__(name):
  return _Absent()
EOF
  fi
done

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$py" -c 'import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, jax.devices())'
} 2>&1 | tee "$out/environment.txt"

status=0
run() {  # NAME COMMAND...: logs to OUT/NAME.log; a failure is reported and the next one runs.
  local name=$1
  shift
  echo "== $name: $*"
  local started=$SECONDS
  timeout "${RUN_LIMIT_S:-240}" "$@" 2>&1 | grep -v -E '^[IW][0-9]{4} ' | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - started)) s"
  [ "$rc" -eq 0 ] || status=1
}

run digits_noise "$py" -m benchmarks.digits_metric_noise --seeds=0,1,2 \
  --counts=2048,4096,8192,16384,32768 --batch_size=4096
run cifar_steps "$py" -m benchmarks.qat_step_cost --config=configs/cifar.py --batch_size=64 \
  --noise_data --repeats=3 --steps_per_repeat=20 --json="$out/cifar_steps.json"
run cifar_sampling "$py" -m benchmarks.sampling_throughput --config=configs/cifar.py --batch=256 \
  --steps=20 --repeats=3 --json="$out/cifar_sampling.json"
run digits_sampling "$py" -m benchmarks.sampling_throughput --config=configs/digits.py --batch=256 \
  --steps=20 --repeats=3 --json="$out/digits_sampling.json"
exit "$status"
