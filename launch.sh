#!/usr/bin/env bash
# resumable's entry point.
#
#   ./launch.sh [--retries N] [training flags]     train (the built-in demo with no flags)
#   NUM_PROCESSES=2 ./launch.sh [flags]            N processes (GPUs, or CPU ranks over gloo)
#   ./launch.sh status [--output_dir DIR] [--json] [--plot]
#   ./launch.sh setup                              only create .venv/
#
# The first run creates .venv/ beside this script and installs requirements.txt into it.
# Training runs through `accelerate launch` with accelerate_config.yaml. Run the same
# command again after any interruption and training continues where it stopped.
#
# Exit codes: 0 done · 2 bad input (retrying cannot help) · 75 stopped early with a fresh
# checkpoint, run again · 130 aborted by a second Ctrl+C · anything else: failed.
# With --retries N, the run is started again after 75 or a crash, up to N times.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${RESUMABLE_VENV:-$HERE/.venv}

ensure_environment() {
    # Reinstall only when requirements.txt changed since the last install.
    local wanted stamp="$VENV/.requirements.sha256"
    wanted=$(sha256sum "$HERE/requirements.txt" "$HERE/tests/requirements.txt" | sha256sum | cut -d' ' -f1)
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
        return
    fi
    echo "📦 Setting up $VENV (first run only; a few minutes)..." >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet -r "$HERE/tests/requirements.txt" >&2
    echo "$wanted" > "$stamp"
}

ensure_environment
export PATH="$VENV/bin:$PATH"

if [[ "${1:-}" == "setup" ]]; then
    exit 0  # the environment is ready: used by tests/run.sh
fi
if [[ "${1:-}" == "status" ]]; then
    shift
    exec python "$HERE/status.py" "$@"
fi

retries=0
if [[ "${1:-}" == "--retries" ]]; then
    [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "error: --retries takes a whole number (got '${2:-}')" >&2; exit 2; }
    retries=$2
    shift 2
fi

num_processes=${NUM_PROCESSES:-1}
# Threads per process. Unless the config says use_cpu, `accelerate launch` sets OMP_NUM_THREADS=1
# when it is unset (accelerate/commands/launch.py, _validate_launch_command), so on a CPU-only
# machine one process computed on one core of all of them: 0.80x a plain `python` loop on 2 cores.
# Give each process its share of the cores we may use (nproc honours taskset and SLURM's
# allocation), as torch would for one process; a user's own OMP_NUM_THREADS wins.
# (Stand-in until launch.sh's supervision moves to Python, issue 12, which does the same.)
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    export OMP_NUM_THREADS=$(( $(nproc) / num_processes > 0 ? $(nproc) / num_processes : 1 ))
fi
launcher=(accelerate launch --quiet --config_file "$HERE/accelerate_config.yaml" --num_processes "$num_processes")
if (( num_processes > 1 )); then
    launcher+=(--multi_gpu)
fi

# accelerate launch turns every failure of the training into exit 1, so the training
# writes its own exit code where we can read it.
exit_code_file=$(mktemp "${TMPDIR:-/tmp}/resumable-exit.XXXXXX")
trap 'rm -f "$exit_code_file"' EXIT

interrupted=""
training_pid=""
forward() {
    # The launcher runs in its own session, so a Ctrl+C reaches only this script; pass the
    # signal to the training processes (the launcher's children) exactly once.
    interrupted=$1
    if [[ -n "$training_pid" ]]; then
        pkill "-$1" -P "$training_pid" 2>/dev/null || true
    fi
}
trap 'forward INT' INT
trap 'forward TERM' TERM
trap 'forward USR1' USR1

attempt=0
while true; do
    : > "$exit_code_file"
    setsid "${launcher[@]}" "$HERE/train_loop.py" --exit_code_file "$exit_code_file" "$@" &
    training_pid=$!
    # `wait` returns early when a trapped signal arrives; keep waiting for the real end.
    status=0
    while true; do
        wait "$training_pid" && status=0 || status=$?
        kill -0 "$training_pid" 2>/dev/null || break
    done
    training_pid=""
    code=$(cat "$exit_code_file")
    code=${code:-$status}

    case "$code" in
        0|2|130) exit "$code" ;;
    esac
    if [[ -n "$interrupted" ]]; then
        echo "launch.sh: stopped by SIG$interrupted (exit $code); run the same command again to continue." >&2
        exit "$code"
    fi
    if (( attempt >= retries )); then
        exit "$code"
    fi
    attempt=$((attempt + 1))
    pause=${RESUMABLE_RETRY_PAUSE:-5}
    echo "🔁 launch.sh: training exited with $code; retry $attempt of $retries in ${pause} s..." >&2
    sleep "$pause"
done
