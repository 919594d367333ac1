#!/usr/bin/env bash
# End-to-end demo on a small UnED-style dataset: extract EfficientNet-Lite0 embeddings
# of the training and held-out lists, train a linear adaptation layer, and compare
# held-out retrieval without and with it. Runs offline.
#
# Environment: PYTHON (interpreter with the requirements installed), DATA (dataset folder
# with images/, train_paths.txt, heldout_paths.txt), OUT (output folder).
set -euo pipefail

PYTHON=${PYTHON:-python}
DATA=${DATA:-../shared/data/mini_uned}
OUT=${OUT:-outputs/demo}
RESOLUTION=${RESOLUTION:-256}
NUM_WORKERS=${NUM_WORKERS:-2}

for f in "$DATA/images" "$DATA/train_paths.txt" "$DATA/heldout_paths.txt"; do
    if [ ! -e "$f" ]; then
        echo "error: $f not found; set DATA to a folder with images/, train_paths.txt and heldout_paths.txt" >&2
        exit 1
    fi
done
mkdir -p "$OUT"
start=$(date +%s)

# Each step runs in its own process group, and this shell passes SIGINT, SIGTERM and SIGHUP on to it.
# So a signal sent to this shell alone (kill PID, or make passing on its SIGTERM) stops the step too,
# and a Ctrl-C or a signal to this shell's whole group reaches the step once, not twice.
# NOTE: a signal sent to every process at once (a batch scheduler cancelling a whole job) reaches the
# step twice, and the second one ends it at once, without the message on how to resume.
step_pid=
stop_status=
signal_received=

forward_signal() {
    signal_received=1
    stop_status=$2
    if [ -n "$step_pid" ]; then
        kill -s "$1" "$step_pid" 2>/dev/null || true
    fi
}
trap 'forward_signal INT 130' INT
trap 'forward_signal TERM 143' TERM
trap 'forward_signal HUP 129' HUP

run_step() {
    if [ -n "$stop_status" ]; then
        return "$stop_status"
    fi
    # Job control (set -m) puts the background job in a new process group. A job outside the
    # terminal's foreground group stops when it reads the terminal, or writes to it under
    # `stty tostop`, so the step reads /dev/null and ignores SIGTTOU.
    set -m
    (trap '' TTOU; exec "$@") </dev/null &
    step_pid=$!
    set +m

    local status
    while :; do
        signal_received=
        status=0
        wait "$step_pid" || status=$?
        # wait also returns when a trapped signal arrives, while the step is still stopping
        if [ -z "$signal_received" ]; then
            break
        fi
    done
    step_pid=

    # a step that ended with status 0 just as the signal came in still stops the demo
    if [ "$status" -eq 0 ] && [ -n "$stop_status" ]; then
        status=$stop_status
    fi
    return "$status"
}

echo "== 1/5 convert the ImageNet EfficientNet-Lite0 weights to timm key names"
run_step "$PYTHON" misc/convert_efficientnet_lite0.py --output "$OUT/tf_efficientnet_lite0.pth"

for split in train heldout; do
    echo "== $([ $split = train ] && echo 2 || echo 3)/5 extract $split embeddings"
    run_step "$PYTHON" feature_extraction/extract.py \
        --dataset_dir "$DATA/images" --selected_ids "$DATA/${split}_paths.txt" \
        --hdf5_dir "$OUT/features" --hdf5_name "$split" --partition uned \
        --framework timm --model tf_efficientnet_lite0 --checkpoint "$OUT/tf_efficientnet_lite0.pth" \
        --resolution "$RESOLUTION" --num_workers "$NUM_WORKERS"
done

echo "== 4/5 train the linear adaptation layer (5 epochs)"
run_step "$PYTHON" linear_adaptation/train_lin_adapt.py \
    --uned_features_path "$OUT/features/train_uned.hdf5" --uned_info_path "$DATA/train_paths.txt" \
    --val_features_path "$OUT/features/heldout_uned.hdf5" --val_info_path "$DATA/heldout_paths.txt" \
    --num_epochs 5 --save_dir "$OUT/lin_adapt.pth"

echo "== 5/5 evaluate held-out retrieval without and with the layer"
run_step "$PYTHON" linear_adaptation/evaluate.py \
    --features_path "$OUT/features/heldout_uned.hdf5" --info_path "$DATA/heldout_paths.txt" \
    --lin_adapt_path "$OUT/lin_adapt.pth" --save_json "$OUT/heldout_metrics.json"

echo
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $OUT:"
echo "  embeddings:        $OUT/features/train_uned.hdf5, $OUT/features/heldout_uned.hdf5"
echo "  adaptation layer:  $OUT/lin_adapt.pth (+ lin_adapt.json, lin_adapt.png)"
echo "  held-out metrics:  $OUT/heldout_metrics.json"
