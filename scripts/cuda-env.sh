# Sets, in the calling shell, the environment the CUDA build needs (the folder that
# scripts/cuda-build.sh made), so that `cargo check/build --features cuda` works by hand:
#
#   source scripts/cuda-env.sh
#   cargo check -p ds-cli --features cuda
#
# Sets CUDA_HOME/CUDA_PATH/CUDA_ROOT (cudarc links from $CUDA_HOME/lib64 and lib64/stubs), PATH
# (nvcc), CUDA_COMPUTE_CAP=90 (kernels for sm_90a, H100/H200; no nvidia-smi at build time) and
# CUDARC_CUDA_VERSION=13000 (cudarc's bindings for CUDA 13.0, the wheels' version).
# It does NOT touch LD_LIBRARY_PATH: to run the binary see README, "CUDA build".
# Folder: ${DS_CUDA_HOME:-$HOME/.cache/ds-cuda}.
_ds_cuda_tk=${DS_CUDA_HOME:-$HOME/.cache/ds-cuda}/cuda
if [ ! -x "$_ds_cuda_tk/bin/nvcc" ] ||
  { [ -z "${DS_CUDA_ENV_NO_STUB_CHECK:-}" ] && [ ! -e "$_ds_cuda_tk/lib64/stubs/libcuda.so" ]; }; then
  echo "cuda-env.sh: no CUDA folder at $_ds_cuda_tk (nvcc or the libcuda stub missing)." >&2
  echo "cuda-env.sh: build it first: bash scripts/cuda-build.sh (or set DS_CUDA_HOME)" >&2
  unset _ds_cuda_tk
  # `return` when sourced, `exit` when run as a script
  return 1 2>/dev/null || exit 1
fi
_ds_cuda_tk=$(cd "$_ds_cuda_tk" && pwd)
export CUDA_HOME=$_ds_cuda_tk CUDA_PATH=$_ds_cuda_tk CUDA_ROOT=$_ds_cuda_tk
case ":$PATH:" in
  *":$_ds_cuda_tk/bin:"*) ;;
  *) export PATH=$_ds_cuda_tk/bin:$PATH ;;
esac
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
unset _ds_cuda_tk
