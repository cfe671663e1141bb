#!/usr/bin/env bash
# Run the tests: ./tests/run.sh [--quick] [pytest args, e.g. -x or tests/test_state.py]
#   --quick   the quick lane (marker `quick`): each feature's main path once, ~3 min; run it before every commit
# Sets up .venv/ with the test requirements on top of the product's (launch.sh's installer), then runs
# pytest in three lanes:
#   - the tests that may share the machine, on every core (pytest-xdist, work-stealing: a worker that runs out
#     takes tests from the other's queue, so the lane does not end with one core idle; reference and killed runs
#     are shared across workers by tests/conftest.py computed_once; RESUMABLE_TEST_WORKERS=N to choose);
#   - beside them, the `slurm` tests one at a time (they share the cluster's node; tests/conftest.py
#     SLURM); their output is printed when the parallel lane is done;
#   - then the `serial` ones alone (they measure time or pin cores; tests/conftest.py SERIAL).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$HERE/launch.sh" setup-tests
cd "$HERE"
lane="" arguments=()
for argument in "$@"; do
    if [[ "$argument" == "--quick" ]]; then lane="quick and "; else arguments+=("$argument"); fi
done
# The SLURM and serial lanes run without pytest-xdist: its options (-n 2, --dist ...) go to the parallel lane only.
one_at_a_time=() skip_value=0
for argument in "${arguments[@]}"; do
    if ((skip_value)); then skip_value=0; continue; fi
    case "$argument" in
        -n | --numprocesses | --dist | --maxprocesses) skip_value=1 ;;
        -n* | --numprocesses=* | --dist=* | --maxprocesses=*) ;;
        *) one_at_a_time+=("$argument") ;;
    esac
done
# Paths among the arguments (tests/test_state.py, tests/test_state.py::name) select those tests;
# without any, the whole suite runs.
targets=(tests)
for argument in "${arguments[@]}"; do
    if [[ -e "${argument%%::*}" ]]; then targets=(); fi
done
python="${RESUMABLE_VENV:-$HERE/.venv}/bin/python"
cluster_log=$(mktemp /tmp/resumable-slurm-lane.XXXXXX)
set +e
"$python" -m pytest "${targets[@]}" -m "${lane}slurm and not serial" -p no:xdist "${one_at_a_time[@]}" >"$cluster_log" 2>&1 &
cluster_pid=$!
trap 'kill "$cluster_pid" 2>/dev/null' EXIT
"$python" -m pytest "${targets[@]}" -m "${lane}not serial and not slurm" -n "${RESUMABLE_TEST_WORKERS:-auto}" --dist worksteal "${arguments[@]}"
parallel=$?
wait "$cluster_pid"
cluster=$?
echo "---- the slurm lane (run beside the parallel one) ----"
cat "$cluster_log"
rm -f "$cluster_log"
"$python" -m pytest "${targets[@]}" -m "${lane}serial" -p no:xdist "${one_at_a_time[@]}"
alone=$?
# 5 is pytest's "no test selected": fine for some of the runs, not for all of them.
codes=("$parallel" "$cluster" "$alone")
if [[ " ${codes[*]} " == " 5 5 5 " ]]; then exit 5; fi
for code in "${codes[@]}"; do
    if [[ $code != 0 && $code != 5 ]]; then exit "$code"; fi
done
exit 0
