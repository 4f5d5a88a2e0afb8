#!/usr/bin/env bash
# Install megamoe into ./.venv (created if missing), torch first.
#   bash tools/install.sh          the library and its core dependencies
#   bash tools/install.sh dev      + test tools (also: hf, mpi; several: dev,hf)
# Environment: PYTHON (default python3.11); TORCH_SPEC (default torch==2.13.0); TORCH_INDEX_URL, e.g.
# https://download.pytorch.org/whl/cpu for the CPU build where PyPI's default would be a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch before DeepSpeed: with no torch present, deepspeed's bare `torch` requirement resolves to the newest
# CUDA build (~3 GB of nvidia-* wheels). A torch that is already there is kept (e.g. a cluster's CUDA build).
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
extras=${1:-}
python -m pip install -q -e ".${extras:+[$extras]}"
python - <<'PY'
import deepspeed, megatron.core, torch
import megatron.core.datasets.helpers_cpp  # noqa: F401  (compiled sample-index builder shipped in the wheel)
print(f"megamoe environment ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"deepspeed {deepspeed.__version__}, CUDA {torch.cuda.is_available()}")
PY
