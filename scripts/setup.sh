#!/usr/bin/env bash
# Create .venv and install mmdc with its test tools. Idempotent: a second run only checks.
# torch is pinned first to the CPU build (2.13.0, on local disk on the dev machines); torchvision is
# deliberately absent (the index's build breaks `import transformers` beside this torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.mmdc-installed
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==${MMDC_TORCH_VERSION:-2.13.0}"
  python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
python -c "import mmdc, torch, ray, transformers; print(f'mmdc {mmdc.__version__} | torch {torch.__version__} | ray {ray.__version__} | transformers {transformers.__version__}')"
