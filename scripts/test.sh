#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: ruff (format and lint), unit tests (no Ray) and
# integration tests (a local Ray cluster) in .venv, then the CLIP-score filter's tests (`-m clip`) in .venv-clip
# (scripts/setup_clip.sh says why it is a second environment). MMDC_SKIP_CLIP=1 skips the second part.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false MMDC_BUILD_DIR="${MMDC_BUILD_DIR:-$PWD/.mmdc_build}"
status=0
.venv/bin/ruff format --check --quiet . || { echo "ruff format: run '.venv/bin/ruff format .'"; status=1; }
.venv/bin/ruff check --quiet . || status=1
.venv/bin/python -m pytest tests "$@" || status=$?
if [ "${MMDC_SKIP_CLIP:-0}" != 1 ]; then
  bash scripts/setup_clip.sh
  .venv-clip/bin/python -m pytest tests -m clip "$@" || status=$?
fi
exit "$status"
