#!/usr/bin/env bash
# A SLURM cluster on this one machine, for tests and CI: a controller and two emulated nodes,
# n1 and n2 (two slurmd processes on different ports), authenticated by a private munged.
#
#   bash .ci/slurm/cluster.sh start    # install SLURM if missing (root + apt-get), start, wait for idle nodes
#   bash .ci/slurm/cluster.sh status   # the daemons and sinfo
#   bash .ci/slurm/cluster.sh stop     # stop the daemons this script started
#
# Clients need the configuration: export SLURM_CONF=$LP_SLURM_DIR/slurm.conf (start prints it).
# Everything lives in $LP_SLURM_DIR (default /tmp/lp-slurm); no systemd is involved.
# Exit status: 0 up, 1 failed to start (the logs' tails are printed), 3 SLURM cannot run here.
set -euo pipefail

DIR=${LP_SLURM_DIR:-/tmp/lp-slurm}
CONF=$DIR/slurm.conf
NODES=(n1 n2)
CPUS_PER_NODE=4          # declared, not real: one node of the cluster may run 4 tasks
WAIT_SECONDS=${LP_SLURM_WAIT:-60}
PACKAGES=(slurmctld slurmd slurm-client munge)
export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin

say() { echo "cluster.sh: $*" >&2; }
cannot() { say "cannot run SLURM here: $*"; exit 3; }

# --------------------------------------------------------------------------- install

installed() {
    local cmd
    for cmd in slurmctld slurmd sinfo sbatch munged; do
        command -v "$cmd" >/dev/null || return 1
    done
}

install_slurm() {
    installed && return 0
    [[ $EUID -eq 0 ]] || cannot "SLURM is not installed and installing it needs root (apt-get install ${PACKAGES[*]})"
    command -v apt-get >/dev/null || cannot "SLURM is not installed and there is no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || cannot "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >&2 || cannot "apt-get install ${PACKAGES[*]} failed"
    installed || cannot "apt-get installed ${PACKAGES[*]} but slurmctld/slurmd/sinfo/sbatch/munged are still missing"
}

# --------------------------------------------------------------------------- configuration

write_munge_files() {
    mkdir -p "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge: "$DIR/munge"
    chmod 0755 "$DIR/munge"  # clients (any user) reach the socket through it
    chmod 0400 "$DIR/munge/munge.key"
}

write_slurm_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
    chmod 0755 "$DIR"
    # slurmctld refuses to run unless SlurmctldHost names this host.
    cat >"$CONF" <<EOF
ClusterName=lp
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[6818-6819] CPUs=$CPUS_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
}

# --------------------------------------------------------------------------- daemons

# Prints the pid in $1 if that process is alive and is the program $2 (a pid can be reused).
running_pid() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    echo "$pid"
}

pid_files() {
    echo "$DIR/munge/munged.pid munged"
    echo "$DIR/run/slurmctld.pid slurmctld"
    local node
    for node in "${NODES[@]}"; do echo "$DIR/run/slurmd.$node.pid slurmd"; done
}

start_munged() {
    running_pid "$DIR/munge/munged.pid" munged >/dev/null && return 0
    runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
}

start_slurm_daemons() {
    # -c: forget the jobs of an earlier run; they died with its daemons.
    running_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null || slurmctld -c -f "$CONF"
    local node
    for node in "${NODES[@]}"; do
        running_pid "$DIR/run/slurmd.$node.pid" slurmd >/dev/null || slurmd -f "$CONF" -N "$node"
    done
}

# The nodes that sinfo reports idle (or mixed/allocated: up and running jobs), one a line.
nodes_up() {
    sinfo -h -N -o "%N %t" 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc)$/ {print $1}' | sort -u
}

# Asks sinfo only when the controller runs: without one, sinfo retries for about 10 seconds.
all_nodes_up() {
    running_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null || return 1
    [[ $(nodes_up | tr '\n' ' ') == "${NODES[*]} " ]]
}

wait_for_nodes() {
    local deadline=$((SECONDS + WAIT_SECONDS))
    until all_nodes_up; do
        if ((SECONDS >= deadline)); then
            say "the nodes ${NODES[*]} were not up after ${WAIT_SECONDS}s (LP_SLURM_WAIT). sinfo:"
            sinfo -N >&2 || true
            print_log_tails
            return 1
        fi
        sleep 0.5
    done
}

print_log_tails() {
    local log
    for log in "$DIR"/munge/munged.log "$DIR"/log/*.log; do
        [[ -f $log ]] || continue
        say "--- last lines of $log"
        tail -n 15 "$log" >&2
    done
}

# --------------------------------------------------------------------------- subcommands

start() {
    install_slurm
    if ! all_nodes_up; then
        [[ $EUID -eq 0 ]] || cannot "starting munged and the SLURM daemons needs root"
        id munge >/dev/null 2>&1 || cannot "there is no munge user (the munge package creates it)"
        write_munge_files
        write_slurm_conf
        start_munged || { print_log_tails; say "munged did not start"; exit 1; }
        start_slurm_daemons || { print_log_tails; say "a SLURM daemon did not start"; exit 1; }
        wait_for_nodes || exit 1
    fi
    sinfo -N >&2
    echo "export SLURM_CONF=$CONF"
}

any_alive() {
    local pid
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
    return 1
}

# Stops the daemons of the pid files on stdin (lines "file program") together: TERM, then KILL
# after 5 seconds. Each takes about 2 seconds to shut down.
stop_daemons() {
    local file name pid pids=()
    while read -r file name; do
        pid=$(running_pid "$file" "$name") || continue
        kill "$pid"
        pids+=("$pid")
        say "stopping $name ($pid)"
    done
    for _ in $(seq 50); do any_alive "${pids[@]}" || return 0; sleep 0.1; done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

stop() {
    # The SLURM daemons first, munged (the first pid file) last: they talk to it until they exit.
    pid_files | tail -n +2 | stop_daemons
    pid_files | head -n 1 | stop_daemons
}

status() {
    local file name pid
    while read -r file name; do
        pid=$(running_pid "$file" "$name") || pid="not running"
        echo "$name ($file): $pid"
    done < <(pid_files)
    sinfo -N || true
    all_nodes_up
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
