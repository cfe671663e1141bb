#!/usr/bin/env bash
# Run the test suite: ./tests/run.sh [pytest args]
# Sets up .venv/ on first use (launch.sh's installer), then runs pytest.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$HERE/launch.sh" setup
cd "$HERE"
exec "${RESUMABLE_VENV:-$HERE/.venv}/bin/python" -m pytest tests "$@"
