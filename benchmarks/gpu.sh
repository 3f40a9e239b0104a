#!/usr/bin/env bash
# The GPU benchmarks in one go, SD-1.5 architecture with random weights (no downloads), each under its own time limit
# so that a slow compile in one cannot cost the others their results:
#
#     bash benchmarks/gpu.sh [OUT_DIR [NAME...]]     # default benchmarks/results, every benchmark
#
# NAMEs: sampling (eager and compiled rows, against diffusers), distill (eager, without and with the latent cache),
# distill-compiled (with the latent cache). Each writes NAME-cuda.json and a log into OUT_DIR; docs/performance.md's
# GPU tables are made from these files. Limits (seconds): LIMIT_SAMPLING, LIMIT_DISTILL, LIMIT_DISTILL_COMPILED.
set -u
out=${1:-benchmarks/results}
shift || true
names=${*:-sampling distill distill-compiled}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" LCM_CACHE=${LCM_CACHE:-/tmp/lcm-cache}
py=${PYTHON:-python3}

run() {  # run NAME SECONDS ARGS...: one benchmark, its log beside its JSON
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$py" "$@" --out "$out/$name-cuda.json" >"$out/$name-cuda.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
    grep -E '^\||ms|samples/s|Error' "$out/$name-cuda.log" | tail -30
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
"$py" -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'

for name in $names; do
    case $name in
        sampling) run sampling "${LIMIT_SAMPLING:-300}" benchmarks/sampling.py --arch sd15 --device cuda --repeats 10 ;;
        distill) run distill "${LIMIT_DISTILL:-150}" benchmarks/distill.py --arch sd15 --device cuda \
            --mixed-precision bf16 --modes eager ;;
        distill-compiled) run distill-compiled "${LIMIT_DISTILL_COMPILED:-300}" benchmarks/distill.py --arch sd15 \
            --device cuda --mixed-precision bf16 --modes compiled --cache yes --steps 12 ;;
        *) echo "unknown benchmark $name (sampling, distill, distill-compiled)" >&2 ;;
    esac
done
