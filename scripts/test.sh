#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests (no Ray) and integration tests (a local Ray cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false MMDC_CACHE="${MMDC_CACHE:-$PWD/.mmdc_cache}"
exec .venv/bin/python -m pytest tests "$@"
