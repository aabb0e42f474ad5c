#!/bin/sh
# The Triton pod's init container: builds the model repository into $REPOSITORY (an
# emptyDir that the triton container mounts read-only) with the steps `make repo` runs for
# MODEL, ENGINE, DEVICE, MAX_SEQUENCES, PLACEMENT and OPSET (tests/test_k8s.py compares
# them with `make -n repo`), plus what only a pod needs: the folder to build into, and the
# engine's thread count from the container's CPU limit (os.cpu_count() in a pod is the
# node's: 64 threads on 4 CPUs of quota would spend the quota spinning).
# DRY_RUN=1 prints the commands without running them.
set -eu

PY=${PY:-python3}

run() {
    echo "+ $*"
    if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

case "$ENGINE" in
    onnx | onnx-int8 | torch) ;;
    *)
        # trt needs `make engine` on the GPU first: see docs/SCALING.md
        echo "ENGINE=$ENGINE: this init container builds onnx, onnx-int8 or torch" >&2
        exit 2
        ;;
esac

if [ "$MODEL" = tiny ]; then
    run "$PY" -m build_scripts.build_tiny
fi
if [ "$ENGINE" != torch ]; then
    int8=""
    if [ "$ENGINE" = onnx-int8 ]; then int8=--int8; fi
    # shellcheck disable=SC2086  # $int8 is one flag or nothing
    run "$PY" -m build_scripts.export_onnx --model "$MODEL" $int8 --opset "$OPSET" --skip-existing
fi
# MAX_PREFILL_TOKENS: optional (an overlay may set it); unset, build_repo's default by
# where the engine runs (64 on the CPU, 512 on a GPU), as `make repo` leaves it
prefill=""
if [ -n "${MAX_PREFILL_TOKENS:-}" ]; then prefill="--max-prefill-tokens $MAX_PREFILL_TOKENS"; fi
# BURST_WINDOW_MS: optional too (an overlay may set it; 0 turns the window off); unset,
# build_repo's default by where the engine runs (6 ms on the CPU, off on a GPU)
burst=""
if [ -n "${BURST_WINDOW_MS:-}" ]; then burst="--burst-window-ms $BURST_WINDOW_MS"; fi
# shellcheck disable=SC2086  # $prefill and $burst: a flag and its value, or nothing
run "$PY" -m build_scripts.build_repo --model "$MODEL" --engine "$ENGINE" \
    --max-sequences "$MAX_SEQUENCES" --engine-placement "$PLACEMENT" $prefill $burst \
    --device "$DEVICE" \
    --repository "$REPOSITORY" --engine-threads "$ENGINE_THREADS"
