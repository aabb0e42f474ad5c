#!/usr/bin/env bash
# Refuse, with the reason, a TRITON_IMAGE the pins were not resolved for:
#   check_image.sh <python major.minor> <CUDA major>
# The Python must be the one tests/test_gpu_image.py resolved the dependency set for (an
# older Triton image runs 3.10, for which several pins have no build); torch's wheels are
# built for one CUDA major version, which the image's CUDA must share.
set -euo pipefail
want_python=$1 want_cuda=$2
python=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$python" != "$want_python" ]; then
  echo "error: this image runs Python $python; the pins are resolved for $want_python" \
    "(IMAGE_PYTHON in docker/Dockerfile, tested image in docs/GPU.md)" >&2
  exit 1
fi
# NVIDIA's CUDA-based images set CUDA_VERSION (e.g. 13.4.3.001).
if [ -z "${CUDA_VERSION:-}" ]; then
  echo "warning: CUDA_VERSION is not set in this image: cannot check it is CUDA $want_cuda" >&2
elif [ "${CUDA_VERSION%%.*}" != "$want_cuda" ]; then
  echo "error: this image has CUDA $CUDA_VERSION; torch's wheels are built for CUDA" \
    "$want_cuda (IMAGE_CUDA_MAJOR in docker/Dockerfile, see docs/GPU.md)" >&2
  exit 1
fi
echo "image: Python $python, CUDA ${CUDA_VERSION:-unknown}"
