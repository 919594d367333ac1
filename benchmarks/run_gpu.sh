#!/usr/bin/env bash
# Run the two GPU benchmarks of benchmarks/README.md (section "GPU") in one go, and keep their
# summaries and logs in RESULTS_DIR: gpu_train.json/.log, gpu_extract.json/.log, device.txt.
#
# Usage: bash benchmarks/run_gpu.sh RESULTS_DIR [IMAGES_DIR]
#   IMAGES_DIR   folder of JPEGs to extract, all of them (default: bench_extract.py's default,
#                1,024 of the mini_uned images)
#   PYTHON       interpreter with the requirements installed (default: python3)
#   DEVICE       device of both runs (default: cuda; cpu only to check this script on a small run)
#   TRAIN_ARGS, EXTRACT_ARGS
#                extra flags appended to each command; a repeated flag overrides the one before
#
# Both runs start even when the first fails, and the script exits with the first failure.
# A missing or empty RESULTS_DIR prints the usage and exits with status 2.
set -uo pipefail
# no file-name expansion: TRAIN_ARGS and EXTRACT_ARGS are split into words on purpose, never globbed
set -f

# Print $1 as an absolute path resolved against the caller's working directory, because the script
# changes to the repository root. An empty $1 stays empty.
absolute() {
    case $1 in
        "" | /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

# checked here, because a failed ${1:?} inside $(...) would end only that subshell
if [ -z "${1:-}" ]; then
    echo "usage: bash benchmarks/run_gpu.sh RESULTS_DIR [IMAGES_DIR]" >&2
    exit 2
fi
results=$(absolute "$1")
images=$(absolute "${2:-}")
python=${PYTHON:-python3}
# a name without a slash is looked up in PATH, and a relative path is resolved like RESULTS_DIR
case $python in
    */*) python=$(absolute "$python") ;;
esac
device=${DEVICE:-cuda}
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
mkdir -p "$results" || exit 1

# the device first, so a machine without CUDA stops here with a clear line
"$python" - "$device" >"$results/device.txt" 2>&1 <<'EOF'
import sys

import torch

device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("DEVICE is cuda but torch finds no CUDA device; run this on a GPU machine")
    print(torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
EOF
code=$?
cat "$results/device.txt"
if [ "$code" -ne 0 ]; then
    exit "$code"
fi

status=0

# word splitting of the *_ARGS variables is wanted: they hold several flags
# shellcheck disable=SC2086
"$python" benchmarks/bench_train.py --preset gpu --device "$device" --amp bf16 \
    --json "$results/gpu_train.json" ${TRAIN_ARGS:-} 2>&1 | tee "$results/gpu_train.log"
code=${PIPESTATUS[0]}
[ "$status" -eq 0 ] && status=$code

# The positional parameters hold the image flags, because bash before 4.4 stops with "unbound
# variable" on an empty array under set -u, and an empty "$@" expands to nothing in every version.
set --
if [ -n "$images" ]; then
    set -- --dataset_dir "$images" --num_images 0
fi
# shellcheck disable=SC2086
"$python" benchmarks/bench_extract.py --device "$device" --framework timm --model vit_base_patch16_384 \
    --resolution 384 --num_workers 8 --comp_fp16 true --amp_dtype bfloat16 "$@" \
    --json "$results/gpu_extract.json" ${EXTRACT_ARGS:-} 2>&1 | tee "$results/gpu_extract.log"
code=${PIPESTATUS[0]}
[ "$status" -eq 0 ] && status=$code

exit "$status"
