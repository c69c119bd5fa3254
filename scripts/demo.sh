#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default: tiny models, the synthetic world, CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mmdc.run "$@"
