#!/usr/bin/env bash
# Stop the single-node test cluster started by start_cluster.sh (slurmctld + slurmd).
# munged is left running (harmless, and reused by the next start).  Idempotent.
set -uo pipefail

# Live (non-zombie) daemons; without a real init, exited daemons linger as zombies.
alive() { ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'; }
running() { alive slurmctld || alive slurmd; }

# Preferred: the controller shuts down itself and every slurmd, saving job state.
# (Only if it is alive: scontrol retries a dead controller for ~10 s.)
if alive slurmctld; then
    scontrol shutdown >/dev/null 2>&1
    for _ in $(seq 20); do running || break; sleep 0.5; done
fi
# Fallback (controller unreachable): TERM, then KILL, the daemons by pid file / exact name.
if running; then
    for d in slurmd slurmctld; do
        pf=/run/slurm/$d.pid
        if [ -s "$pf" ]; then kill "$(cat "$pf")" 2>/dev/null; else pkill -x "$d"; fi
    done
    sleep 3
    running && { pkill -KILL -x slurmd; pkill -KILL -x slurmctld; sleep 1; }
fi
running && { echo "stop_cluster.sh: ERROR: slurm daemons still running" >&2; exit 1; }
echo "slurm cluster stopped"
