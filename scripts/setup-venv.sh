#!/usr/bin/env bash
# Create (or complete) a virtual environment with PyTorch and the package's extras.
#
#   scripts/setup-venv.sh VENV EXTRAS [locked|latest]
#
#   locked (default)  every version pinned by requirements/constraints.txt (what CI and `make demo`,
#                     `make test` use), so a dependency's new release cannot change the set-up
#   latest            nothing pinned: the newest releases the package's own ranges allow
#                     (`make test-latest`, `make lock`)
#
# Installer: uv when it can be had (it installs in seconds from its cache), else pip. uv is taken from
# PATH, or installed into the new environment with pip. RBANK_INSTALLER=pip (or =uv) forces one.
#
# PyTorch comes first, so that resolving `torch` never pulls a multi-GB CUDA build onto a machine
# without an NVIDIA driver: with nvidia-smi present the default (CUDA) build, otherwise the CPU build
# (a local wheel when pip's find-links holds one, else PyTorch's CPU index).
set -euo pipefail

VENV=${1:?usage: setup-venv.sh VENV EXTRAS [locked|latest]}
EXTRAS=${2:?usage: setup-venv.sh VENV EXTRAS [locked|latest]}
MODE=${3:-locked}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOCK="$ROOT/requirements/constraints.txt"
INSTALLER=${RBANK_INSTALLER:-auto}
PYTHON=${PYTHON:-python3}

case "$MODE" in
  locked) PIN=(-c "$LOCK") ;;
  latest) PIN=() ;;
  *) echo "setup-venv.sh: mode must be 'locked' or 'latest', got '$MODE'" >&2; exit 2 ;;
esac
case "$INSTALLER" in auto|uv|pip) ;; *) echo "setup-venv.sh: RBANK_INSTALLER must be auto, uv or pip" >&2; exit 2 ;; esac

# The torch version: the lock's pin, else (latest) whatever the package's range allows.
TORCH_SPEC=torch
if [ "$MODE" = locked ]; then
  TORCH_SPEC=$(grep -E '^torch==' "$LOCK" | head -n1 | sed -E 's/[[:space:]]*;.*$//')
fi
TORCH_VERSION=${TORCH_SPEC#torch==}

# Local wheel folders pip is configured with (PIP_FIND_LINKS or pip.conf), passed on to uv as well.
FIND_LINKS=()
for d in ${PIP_FIND_LINKS:-$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)}; do
  d=${d#file://}
  [ -d "$d" ] && FIND_LINKS+=(--find-links "$d")
done

UV=""
if [ "$INSTALLER" != pip ]; then
  UV=$(command -v uv || true)
fi

# 1. The environment.
if [ ! -x "$VENV/bin/python" ]; then
  if [ -n "$UV" ]; then
    "$UV" venv -q --python "$PYTHON" "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
if [ "$INSTALLER" != pip ] && [ -z "$UV" ]; then
  # uv into the environment itself (a few seconds), so nothing outside it changes
  if "$PY" -m pip --version >/dev/null 2>&1 && "$PY" -m pip install -q uv >/dev/null 2>&1; then
    UV="$VENV/bin/uv"
  elif [ "$INSTALLER" = uv ]; then
    echo "setup-venv.sh: RBANK_INSTALLER=uv but uv could not be installed" >&2; exit 1
  fi
fi

install() {  # install ARGS... with the chosen installer
  if [ -n "$UV" ]; then
    "$UV" pip install -q --python "$PY" "${FIND_LINKS[@]}" "$@"
  else
    "$PY" -m pip install -q "$@"
  fi
}

echo "setup-venv.sh: $VENV [$EXTRAS] ($MODE) with $([ -n "$UV" ] && echo uv || echo pip)"

# 2. PyTorch.
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    install "${PIN[@]}" "$TORCH_SPEC"
  else
    # the newest local CPU wheel for this Python (locked: the pinned version's, if there is one)
    tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    pattern="torch-*+cpu-$tag-*.whl"
    [ "$MODE" = locked ] && pattern="torch-$TORCH_VERSION+cpu-$tag-*.whl"
    wheel=""
    for ((i = 1; i < ${#FIND_LINKS[@]}; i += 2)); do
      for w in "${FIND_LINKS[$i]}"/$pattern; do [ -f "$w" ] && wheel=$w; done
    done
    if [ -n "$wheel" ]; then
      v=$(basename "$wheel" | cut -d- -f2)
      install "${PIN[@]}" "torch==${v%%+*}"
    else
      install "${PIN[@]}" "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi

# 3. The package, editable, with its extras.
install "${PIN[@]}" -e "$ROOT[$EXTRAS]"
