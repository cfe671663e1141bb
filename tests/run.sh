#!/usr/bin/env bash
# Run the tests: ./tests/run.sh [--quick] [pytest args, e.g. -x or tests/test_state.py]
#   --quick   the quick lane (marker `quick`): each feature's main path once, ~3 min; run it before every commit
# Sets up .venv/ with the test requirements on top of the product's (launch.sh's installer), then runs
# pytest twice: the tests that may share the machine on every core (pytest-xdist, a file's tests on one
# worker so they share its reference runs; RESUMABLE_TEST_WORKERS=N to choose), then the `serial` ones
# (they measure time or pin cores; tests/conftest.py SERIAL) alone.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$HERE/launch.sh" setup-tests
cd "$HERE"
lane="" arguments=()
for argument in "$@"; do
    if [[ "$argument" == "--quick" ]]; then lane="quick and "; else arguments+=("$argument"); fi
done
# Paths among the arguments (tests/test_state.py, tests/test_state.py::name) select those tests;
# without any, the whole suite runs.
targets=(tests)
for argument in "${arguments[@]}"; do
    if [[ -e "${argument%%::*}" ]]; then targets=(); fi
done
python="${RESUMABLE_VENV:-$HERE/.venv}/bin/python"
set +e
"$python" -m pytest "${targets[@]}" -m "${lane}not serial" -n "${RESUMABLE_TEST_WORKERS:-auto}" --dist loadfile "${arguments[@]}"
parallel=$?
"$python" -m pytest "${targets[@]}" -m "${lane}serial" -p no:xdist "${arguments[@]}"
alone=$?
# 5 is pytest's "no test selected": fine for one of the two runs, not for both.
if [[ $parallel == 5 && $alone == 5 ]]; then exit 5; fi
if [[ $parallel != 0 && $parallel != 5 ]]; then exit "$parallel"; fi
if [[ $alone != 5 ]]; then exit "$alone"; fi
exit 0
