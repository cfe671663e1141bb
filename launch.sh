#!/usr/bin/env bash
# resumable's entry point.
#
#   ./launch.sh [--retries N] [training flags]     train (the built-in demo with no flags)
#   NUM_PROCESSES=2 ./launch.sh [flags]            N processes (GPUs, or CPU ranks over gloo)
#   ./launch.sh status [--output_dir DIR] [--json] [--plot]
#   ./launch.sh clean [--output_dir DIR] [--force] [--backup_to DEST]   at the end: keep the final model, delete the checkpoints
#   ./launch.sh setup                              only create .venv/
#   ./launch.sh setup-tests                        also install tests/requirements.txt (tests/run.sh does)
#   ./launch.sh --help                             this usage, then every training flag
#
# The first run creates .venv/ beside this script and installs requirements.txt into it.
# Training runs through `accelerate launch` with accelerate_config.yaml, supervised by
# supervisor.py (signals, waiting, retries). Run the same command again after any
# interruption and training continues where it stopped.
#
# Exit codes: 0 done · 2 bad input (retrying cannot help) · 75 stopped early with a fresh
# checkpoint, run again · 130 aborted by a second Ctrl+C · anything else: failed.
# With --retries N, the run is started again after 75 or a crash, up to N times.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${RESUMABLE_VENV:-$HERE/.venv}

install_requirements() {
    # pip install -r FILE into the venv, only when the contents of FILE and the files it
    # includes changed since the last install. Contents only: worktrees may share one venv.
    local stamp="$VENV/$1" file=$2 wanted
    shift
    wanted=$(cat "$@" | sha256sum | cut -d' ' -f1)
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        return
    fi
    echo "📦 Installing ${file#"$HERE/"} into $VENV (first run only; a few minutes)..." >&2
    if [[ ! -x "$VENV/bin/python" ]]; then
        python3 -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    fi
    "$VENV/bin/python" -m pip install --quiet -r "$file" >&2
    echo "$wanted" > "$stamp"
}

# The user's .venv holds what training needs (requirements.txt); tests/run.sh adds the test
# requirements on top (`./launch.sh setup-tests`), so one venv serves both.
ensure_environment() {
    install_requirements .requirements-product.sha256 "$HERE/requirements.txt"
    if [[ "${1:-}" == "setup-tests" ]]; then  # tests/requirements.txt starts with -r ../requirements.txt
        install_requirements .requirements-tests.sha256 "$HERE/tests/requirements.txt" "$HERE/requirements.txt"
    fi
}

ensure_environment "${1:-}"
export PATH="$VENV/bin:$PATH"

if [[ "${1:-}" == "setup" || "${1:-}" == "setup-tests" ]]; then
    exit 0  # the environment is ready (setup-tests: used by tests/run.sh)
fi
if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
    sed -n '4,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$HERE/launch.sh"  # the usage above, then every training flag
    echo
    exec python "$HERE/train_loop.py" --help
fi
if [[ "${1:-}" == "status" ]]; then
    shift
    exec python "$HERE/status.py" "$@"
fi
if [[ "${1:-}" == "clean" ]]; then
    shift
    exec python "$HERE/cleaning.py" "$@"
fi

# Start, signals, waiting, retries and exit codes: supervisor.py. It is Python because bash cannot
# trap a signal its parent ignored (SIGINT, in any script's background job).
exec python "$HERE/supervisor.py" "$@"
