#!/usr/bin/env bash
# The GPU benchmark in one call (make gpu-bench): benchmarks/gpu_bench.py's steps on a GPU
# machine with no network, from the bundle that `make gpu-bundle` packs here (.gpu_bundle/:
# tritonserver, tritonclient, numpy < 2, the bench model's tokenizer; docs/GPU.md).
#
#   benchmarks/gpu_bench.sh --dry-run        here: checks the bundle and the plan, no GPU
#   benchmarks/gpu_bench.sh [options]        there: the whole run (gpu_bench.py --help)
#
# There, the bundle's packages go into a virtual environment in /tmp whose site-packages
# come before the machine's own (its PyTorch, Transformers, CUDA libraries): the Triton
# Python backend stub runs the first python3 on PATH and needs numpy < 2, where the
# machine's environment has numpy 2. Results go to $OUT (the device tool's folder) or
# artifacts/gpu_bench.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-.gpu_bundle}
dry_run=0
for arg in "$@"; do [[ $arg == --dry-run || $arg == -h || $arg == --help ]] && dry_run=1; done

if (( dry_run )); then  # (and --help: the machine's set-up below is no place for it)
  PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
  exec "$PY" -m benchmarks.gpu_bench --bundle "$BUNDLE" "$@"
fi

PY=${PYTHON:-python3}  # the machine's Python with PyTorch (3.12 on the lent GPU machines)
ENV_DIR=${GPU_BENCH_ENV:-/tmp/gpu_bench_env}
version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || exit 1
PYTHONPATH="$PWD/src" "$PY" -m benchmarks.gpu_bench --bundle "$BUNDLE" --dry-run \
  --bundle-python "$version" "$@" >/dev/null || {
  echo "error: the bundle or the options are not in order (run with --dry-run to see)" >&2
  exit 2
}
if [[ ! -f $ENV_DIR/.complete ]]; then  # written last: a half-made one is made again
  rm -rf "$ENV_DIR"
  "$PY" -m venv --without-pip "$ENV_DIR" || exit 1
  site=$("$ENV_DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  tar -xJf "$BUNDLE/site.tar.xz" -C "$site" || exit 1
  # Beside the bundle's packages, the machine's, linked one by one: all but those built
  # for numpy 2, which would fail to import beside numpy 1.26 (transformers imports scipy
  # and scikit-learn when they are there), and those the bundle brings itself.
  while read -r machine_site; do
    for entry in "$machine_site"/*; do
      name=$(basename "$entry")
      case ${name,,} in
        numpy* | scipy* | sklearn* | scikit_learn* | pandas* | numba*) continue ;;
      esac
      [[ -e $site/$name ]] || ln -s "$entry" "$site/$name"
    done
  done < <("$PY" -c 'import site; print("\n".join(site.getsitepackages()))')
  printf '%s\n%s\n' "$PWD" "$PWD/src" >"$site/gpt2_triton.pth"  # this checkout's packages
  "$ENV_DIR/bin/python" -c 'import numpy, torch' || {
    rm -rf "$ENV_DIR"  # not reused by the next run
    echo "error: the bundle's packages do not import beside this machine's (see above)" >&2
    exit 1
  }
  touch "$ENV_DIR/.complete"
fi
export PATH="$ENV_DIR/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export GPT2_TRITON_ARTIFACTS=${GPT2_TRITON_ARTIFACTS:-artifacts}
echo "== machine"
nvidia-smi -L || echo "warning: nvidia-smi did not answer"
python -c 'import numpy, torch; print("numpy", numpy.__version__, "torch", torch.__version__,
  "cuda", torch.cuda.is_available())' || exit 1
# the Python backend stub links libpython3.X.so.1.0 (the runtime library, INSTSONAME)
python -c 'import sysconfig, pathlib; d = pathlib.Path(sysconfig.get_config_var("LIBDIR"));
name = sysconfig.get_config_var("INSTSONAME"); print("libpython for the stub:", d / name,
"found" if (d / name).exists() else "MISSING: the Python backend cannot start")'
exec python -m benchmarks.gpu_bench --bundle "$BUNDLE" "$@"
