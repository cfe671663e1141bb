#!/usr/bin/env bash
# Install and start a real single-node SLURM cluster (munged + slurmctld + slurmd)
# on this machine, for the SLURM integration tests.  Debian/Ubuntu, run as root.
# No systemd is assumed: the daemons are started directly and daemonize themselves.
# Idempotent: if the node already answers `sinfo` as idle, nothing is done.
set -euo pipefail

HOST=$(hostname -s)          # slurmd identifies itself by the short hostname
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
export DEBIAN_FRONTEND=noninteractive

die() {
    echo "start_cluster.sh: ERROR: $*" >&2
    for f in /var/log/munge/munged.log "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmd.log; do
        [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}
# Node state as sinfo prints it; a suffix such as "idle*" means slurmd is not responding.
node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1 || true; }
# A live (non-zombie) process with this exact name?  Daemonizing leaves zombies
# behind when PID 1 is not a real init (containers), which plain pgrep would count.
alive() { ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'; }
up_msg() { echo "slurm cluster up: node $HOST, $(sinfo -h -n "$HOST" -o %c | head -n1) cpus"; }

[ "$(id -u)" = 0 ] || die "must run as root"

# Fast path: already running (a busy node counts as up too).
# (check processes first: sinfo against a dead controller retries for ~10 s.)
if alive slurmctld && alive slurmd &&
   [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; then
    up_msg; exit 0
fi

# 1. Packages (skipped when already installed; apt is the slow part, ~10 s).
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# 2. munge: shared-secret auth between the SLURM daemons and clients.
install -d -o munge -g munge -m 700 /etc/munge /var/log/munge /var/lib/munge
install -d -o munge -g munge -m 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then   # test the daemon rather than pgrep: it may be dying or a zombie
    runuser -u munge -- munged --force || die "munged failed to start"
    for _ in $(seq 20); do munge_ok && break; sleep 0.5; done
    munge_ok || die "munge round-trip failed"
fi

# 3. slurm.conf, sized from what slurmd itself detects (CPUs, sockets, RealMemory)
#    so the node never gets drained for "Low socket*core*thread count"/"Low RealMemory".
HW=$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *UpTime=.*//')
[ -n "$HW" ] || die "slurmd -C could not detect the hardware"
install -d -m 755 /etc/slurm "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd /run/slurm
cat >"$CONF" <<EOF
# Written by tests/slurm/start_cluster.sh -- single-node test cluster.
ClusterName=resumable
# NodeAddr/SlurmctldHost pinned to loopback: works even if the hostname is unresolvable.
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No cgroups needed (and often unusable in containers/CI).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# Cores only: with memory as a consumable, a job without --mem would grab all RAM
# and jobs would run one at a time.
SelectTypeParameters=CR_Core
MpiDefault=none
# No mail on this box (silences 'Configured MailProg is invalid').
MailProg=/bin/true
SwitchType=switch/none
# No accounting daemon.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Requeue support (scontrol requeue, --requeue) is what the tests exercise.
JobRequeue=1
# A requeued job may only start again cred_expire+1 s later (default 120 s);
# 10 s keeps requeue tests fast and is ample for launching a step on this host.
AuthInfo=cred_expire=10
# A node that was down comes back by itself once slurmd registers with a valid config.
ReturnToService=2
# Finished jobs stay visible to 'scontrol show job' for 5 min (no sacct here).
MinJobAge=300
# Grace between SIGTERM and SIGKILL at time limit / scancel.
KillWait=30
# Schedule quickly: main loop every 2 s, backfill every 5 s, no batching delay.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5,sched_min_interval=0
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 $HW State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=UNLIMITED State=UP
EOF

# 4. Daemons (they fork into the background on their own; slurmctld keeps saved jobs).
alive slurmctld || slurmctld || die "slurmctld failed to start"
alive slurmd || slurmd || die "slurmd failed to start"

# 5. Wait for the node to become schedulable; un-drain it if a previous run left it down.
for i in $(seq 60); do
    state=$(node_state)
    case "$state" in
        idle|mixed|allocated|completing)
            # slurmctld may report the node state it saved last run before slurmd has
            # re-registered, so prove the cluster end to end with a tiny real job.
            timeout 60 srun --quiet -N1 -n1 -t 1 -J start_cluster_check true ||
                die "node $HOST is $state but a test job failed"
            up_msg; exit 0 ;;
        down*|drain*|fail*)
            scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
die "node $HOST not idle after 60 s (state: '${state:-no answer}')"
