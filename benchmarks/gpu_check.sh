#!/usr/bin/env bash
# The first run of zaya_hf on a GPU, prepared to take under 8 minutes on one CUDA or ROCm GPU; writes one JSON file.
#
#   1. the Triton kernels' tests on the GPU (modeling_tests/test_kernels.py, compiled kernels, not the interpreter);
#   2. benchmarks/bench_kernels.py: each kernel at ZAYA1-8B layer sizes in bf16 against the model's torch forward
#      (relative difference, router choices that agree) and its speed, then a 4-layer ZAYA1-8B-sized model per backend;
#   3. benchmarks/bench_decode.py --device cuda (bf16; static cache + compiled step): zaya_hf against transformers'
#      own ZAYA on bench-small.
#
#   bash benchmarks/gpu_check.sh [OUTPUT]     # default OUTPUT: benchmarks/results/gpu_check.json
#   bash benchmarks/gpu_check.sh --smoke      # tiny shapes on the CPU (Triton interpreter): checks the script only
#
# Every step has its own time limit; a step that fails or runs out of time is recorded as such, and the others run.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
    smoke=1
    shift
fi
output=${1:-benchmarks/results/gpu_check.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if (( smoke )); then
    export TRITON_INTERPRET=1
    kernels_args=(--smoke)
    decode_args=(--device cpu --dtype float32 --repeats 1 --prompt-tokens 8 --new-tokens 4 --prefill-tokens 16)
    tests=(-k "moe_top1 and 1-dtype0")
    limit=600  # the interpreter is slow: no time limit that means anything
else
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA or ROCm GPU (or --smoke).')" || exit 1
    kernels_args=(--repeats 20)
    decode_args=(--device cuda --dtype bfloat16 --compile --repeats 3)
    tests=()
    limit=0
fi

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit (SECONDS; --smoke: $limit); its stdout goes to $work/NAME.out, its status to NAME.rc
step() {
    local name=$1 seconds=$(( limit ? limit : $2 ))
    shift 2
    echo "== $name (limit ${seconds} s): $*" >&2
    local start=$SECONDS
    timeout "$seconds" "$@" >"$work/$name.out" 2>"$work/$name.err"
    echo $? >"$work/$name.rc"
    echo $((SECONDS - start)) >"$work/$name.seconds"
    tail -n 3 "$work/$name.err" >&2
}

step kernel_tests 140 python -m pytest -q -p no:cacheprovider modeling_tests/test_kernels.py "${tests[@]}"
step bench_kernels 170 python benchmarks/bench_kernels.py "${kernels_args[@]}"
step bench_decode 140 python benchmarks/bench_decode.py "${decode_args[@]}"

python - "$work" "$output" "$smoke" <<'EOF'
"""Gather the steps into one JSON file: each step's status and seconds, and its own JSON line where it printed one."""
import json
import sys
from pathlib import Path

import torch

work, output, smoke = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
result = {
    "smoke": smoke,
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "hip": torch.version.hip,
}
for name in ("kernel_tests", "bench_kernels", "bench_decode"):
    rc = int((work / f"{name}.rc").read_text())
    lines = (work / f"{name}.out").read_text().splitlines()
    step = {"exit_status": rc, "timed_out": rc == 124, "seconds": int((work / f"{name}.seconds").read_text())}
    if name == "kernel_tests":
        step["summary"] = lines[-1] if lines else ""
    else:
        json_lines = [line for line in lines if line.startswith("{")]
        step["result"] = json.loads(json_lines[-1]) if json_lines else None
        if step["result"] is None:
            step["stderr_tail"] = (work / f"{name}.err").read_text().splitlines()[-5:]
    result[name] = step
result["all_passed"] = all(result[name]["exit_status"] == 0 for name in ("kernel_tests", "bench_kernels", "bench_decode"))
kernels = result["bench_kernels"]["result"]
result["kernels_correct"] = None if kernels is None else kernels["kernels_correct"]
output.parent.mkdir(parents=True, exist_ok=True)
output.write_text(json.dumps(result, indent=1) + "\n")
print(f"gpu_check: wrote {output} (all steps passed: {result['all_passed']}; kernels correct: {result['kernels_correct']})")
EOF
