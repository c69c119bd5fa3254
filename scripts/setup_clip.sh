#!/usr/bin/env bash
# Create .venv-clip: mmdc with the `clip` extra (open_clip_torch) for the CLIP-score filter's tests.
# Why a second environment: open_clip pulls torchvision, and the index's torchvision breaks
# `import transformers` beside the CPU torch 2.13.0 of .venv. torch 2.14.1 + torchvision 0.29.1
# (CUDA builds that also run on CPU) are a matching pair; they are larger, so the main environment
# keeps the small CPU build. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-clip/bin/python ]; then
  "$PY" -m venv .venv-clip
fi
stamp=.venv-clip/.mmdc-installed
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv-clip/bin/python -m pip install -q --upgrade pip
  .venv-clip/bin/python -m pip install -q "torch==${MMDC_CLIP_TORCH_VERSION:-2.14.1}" "torchvision==${MMDC_CLIP_TORCHVISION_VERSION:-0.29.1}"
  .venv-clip/bin/python -m pip install -q -e ".[dev,clip]"
  echo "$want" > "$stamp"
fi
.venv-clip/bin/python -c "import open_clip, torch, torchvision, transformers; print(f'clip env: open_clip {open_clip.__version__} | torch {torch.__version__} | torchvision {torchvision.__version__}')"
