#!/usr/bin/env bash
# The GPU set in one go (a borrowed GPU box may start bare each time, and its time is short):
# install what the box lacks, then the SDXL benchmark and the `gpu` tests, most important first, each part
# under its own time limit inside a total budget, so that a slow part costs only itself.
#
#   bash bench/gpu_session.sh            # on the GPU box, from the repository root
#   BUDGET=900 bash bench/gpu_session.sh # seconds for everything (default 540)
#   PARTS="versions compile-cold" bash bench/gpu_session.sh  # only these parts, in this order
#
# Wheels for a box without a package index: `bash bench/gpu_wheels.sh` (run where pip reaches the index)
# puts them in .whl/; they are installed with --no-deps into /tmp/site, first on PYTHONPATH.
# Everything is printed and also written to $OUT/session.log (OUT defaults to ./gpu-out).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
BUDGET=${BUDGET:-540}
START=$SECONDS
PY=${PYTHON:-python3}
CACHE=${IMAGEN_BENCH_CACHE:-/tmp/imagen-compile-cache}
PYTEST_ARGS="-p no:cacheprovider -p no:logging -v --tb=short"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 TOKENIZERS_PARALLELISM=false TORCH_LOGS=${TORCH_LOGS:-recompiles}

say() { echo "$*" | tee -a "$LOG"; }

# part NAME MIN_SECONDS MAX_SECONDS COMMAND...: run it when at least MIN seconds are left, for at most MAX.
part() {
    local name=$1 min=$2 max=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt "$min" ]; then
        say "### $name: skipped, $left s left of the budget"
        return
    fi
    local limit=$((left < max ? left : max)) began=$SECONDS
    say "### $name (limit $limit s): $*"
    timeout -s ABRT -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"  # SIGABRT: faulthandler prints where it was
    say "### $name: exit ${PIPESTATUS[0]} after $((SECONDS - began)) s"
}

if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tail -3 | tee -a "$LOG"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

# PARTS picks and orders the parts (default: all, in this order).
for name in ${PARTS:-versions imports compile-cold compile-warm gpu-tests main gpu-compile-test memory-modes lora-switch max-autotune}; do
    case $name in
        versions) part versions 20 60 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv ;;
        imports) part imports 20 60 $PY -c "import imagen.api.app, imagen.generation.diffusers.engine, compel, peft; print('imports ok')" ;;
        main) part main 90 150 $PY bench/sdxl_speed.py --images 3 --rows plain,eager ;;
        gpu-tests) part gpu-tests 60 200 $PY -m pytest -m gpu tests/test_gpu.py -k "not compile" --timeout 120 $PYTEST_ARGS ;;
        compile-cold) part compile-cold 120 450 $PY bench/sdxl_speed.py --images 3 --rows plain,imagen --compile-mode default --compile-cache-dir "$CACHE" ;;
        compile-warm) part compile-warm 60 150 $PY bench/sdxl_speed.py --images 3 --rows imagen --compile-mode default --compile-cache-dir "$CACHE" ;;
        gpu-compile-test) part gpu-compile-test 60 300 $PY -m pytest -m gpu tests/test_gpu.py -k compile --timeout 280 $PYTEST_ARGS ;;
        memory-modes) part memory-modes 60 200 $PY bench/sdxl_speed.py --skip-main --images 1 --memory-modes --memory-compile off ;;
        lora-switch) part lora-switch 60 300 $PY bench/sdxl_speed.py --skip-main --lora-switch --lora-jobs 5 --compile-mode default --compile-cache-dir "$CACHE" ;;
        max-autotune) part max-autotune 120 600 $PY bench/sdxl_speed.py --images 3 --rows imagen --compile-cache-dir /tmp/imagen-compile-cache-autotune ;;
        *) say "### $name: no such part" ;;
    esac
done
say "### done after $((SECONDS - START)) s"
