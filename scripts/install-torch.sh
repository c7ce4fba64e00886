#!/usr/bin/env bash
# Install PyTorch into the active environment before the package itself, so that
# resolving rbank-torch's `torch` requirement never drags in a multi-GB CUDA build
# on a machine without a GPU.
#   - torch already importable            -> nothing to do
#   - NVIDIA driver present (nvidia-smi)  -> the default (CUDA) build from PyPI
#   - no GPU                              -> the CPU build (a local wheel when pip's
#                                            find-links has one, else PyTorch's CPU index)
set -euo pipefail
PY=${PYTHON:-python}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if "$PY" -c "import torch" 2>/dev/null; then
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  exec "$PY" -m pip install "torch==${TORCH_VERSION}"
fi
for d in ${PIP_FIND_LINKS:-}; do
  if ls "${d#file://}"/torch-"${TORCH_VERSION}"+cpu-*.whl >/dev/null 2>&1; then
    exec "$PY" -m pip install "torch==${TORCH_VERSION}"
  fi
done
exec "$PY" -m pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
