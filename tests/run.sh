#!/usr/bin/env bash
# Run the test suite: ./tests/run.sh [pytest args, e.g. -x or tests/test_state.py]
# Sets up .venv/ with the test requirements on top of the product's (launch.sh's installer), then runs pytest.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$HERE/launch.sh" setup-tests
cd "$HERE"
# Paths among the arguments (tests/test_state.py, tests/test_state.py::name) select those tests;
# without any, the whole suite runs.
targets=(tests)
for argument in "$@"; do
    if [[ -e "${argument%%::*}" ]]; then targets=(); fi
done
exec "${RESUMABLE_VENV:-$HERE/.venv}/bin/python" -m pytest "${targets[@]}" "$@"
