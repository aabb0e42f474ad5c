#!/usr/bin/env bash
# TensorRT's Python bindings for the TensorRT the image already carries.
#
# The Triton image holds TensorRT's libraries (its TensorRT backend runs on them), not
# necessarily their Python bindings. A plan only runs on the TensorRT version that built
# it, so no second TensorRT is installed: the bindings-only wheel (which installs as the
# `tensorrt_bindings` module and loads the libraries it finds) is pinned to the version of
# the image's own libnvinfer, read here.
set -euo pipefail
if python3 -c "import tensorrt" 2>/dev/null; then
  echo "TensorRT Python module present: $(python3 -c 'import tensorrt; print(tensorrt.__version__)')"
  exit 0
fi
lib=$(ldconfig -p | awk '$1 ~ /^libnvinfer\.so\.[0-9]+$/ {print $NF; exit}')
if [ -z "$lib" ]; then
  echo "error: no libnvinfer in this image: TRITON_IMAGE must be a Triton image that" \
    "carries TensorRT (the -py3 flavour)" >&2
  exit 1
fi
version=$(basename "$(readlink -f "$lib")")  # libnvinfer.so.11.4.0
version=${version#libnvinfer.so.}
cuda=${CUDA_VERSION:?is not set in this image: cannot tell which tensorrt-cuXX-bindings fit}
cuda=${cuda%%.*}
# The wheel's version has a fourth (build) number: match the library's three.
python3 -m pip install --no-deps "tensorrt-cu${cuda}-bindings==${version}.*"
python3 -c "import tensorrt_bindings as trt; print('TensorRT Python bindings', trt.__version__)"
