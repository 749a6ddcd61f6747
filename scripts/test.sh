#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, the end-to-end test on the real default
# model included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q --durations=15 "$@"  # the slowest tests, to keep the suite well inside CI's time
