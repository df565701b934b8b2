#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the launch tests (tests/launch/test_slurm_local.py):
#   scripts/slurm_local.sh start DIR   write DIR/slurm.conf, start munged, slurmctld and slurmd (pids in DIR)
#   scripts/slurm_local.sh stop DIR    stop the daemons this script started (by their pids), nothing else
# Needs Debian's slurm-wlm and munge (`apt-get update && apt-get install -y slurm-wlm munge`) and root
# (slurmd runs jobs as their owner). sbatch/squeue/scontrol then need SLURM_CONF=DIR/slurm.conf.
set -euo pipefail

cmd=${1:?usage: slurm_local.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: slurm_local.sh start|stop DIR}")

stop() {
    for name in slurmd slurmctld munged; do
        if [[ -f "$dir/$name.pid" ]]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/$name.pid"
        fi
    done
}

if [[ "$cmd" == stop ]]; then
    stop
    exit 0
fi
[[ "$cmd" == start ]] || { echo "slurm_local.sh: unknown command $cmd (start|stop)" >&2; exit 2; }
for bin in munged slurmctld slurmd sbatch; do
    command -v "$bin" >/dev/null || { echo "slurm_local.sh: $bin not found; apt-get install -y slurm-wlm munge" >&2; exit 3; }
done

mkdir -p "$dir"/{state,spool,log,munge}
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

# munge: its own key, socket and pid file in DIR (no system-wide state touched)
if [[ ! -f "$dir/munge/munge.key" ]]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
fi
chmod 700 "$dir/munge"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"

cat > "$dir/slurm.conf" <<EOF
ClusterName=mopd-local
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SlurmctldPort=$(( 16817 + RANDOM % 1000 ))
SlurmdPort=$(( 17818 + RANDOM % 1000 ))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmUser=root
SlurmdUser=root
MpiDefault=none
KillWait=30
MinJobAge=3600
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$dir/slurm.conf"
slurmd -f "$dir/slurm.conf"
for _ in $(seq 100); do
    if sinfo -h -o %t 2>/dev/null | grep -q idle; then
        echo "local SLURM up: SLURM_CONF=$dir/slurm.conf (node $host, $cpus CPUs)"
        exit 0
    fi
    sleep 0.2
done
echo "slurm_local.sh: the node did not become idle; see $dir/log" >&2
stop
exit 1
