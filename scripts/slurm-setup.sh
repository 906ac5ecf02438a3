#!/usr/bin/env bash
# Starts a single-node SLURM cluster on this machine, for the tests of the srun and sbatch paths:
# munge, slurmctld and slurmd, with one partition `debug` holding this host. Needs root and
# Debian's slurm-wlm and munge (installed by .ci/run). Open MPI must be installed before slurmd
# starts: slurmd loads the pmix plugin (for `srun --mpi=pmix`) when it starts.
#
# Idempotent: when the node already answers as idle or mixed, it does nothing.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "slurm-setup: must run as root (it writes /etc/slurm and starts daemons)" >&2
  exit 1
fi
for b in munged slurmctld slurmd sinfo; do
  command -v "$b" >/dev/null || {
    echo "slurm-setup: $b not found; install Debian's slurm-wlm and munge" >&2
    exit 1
  }
done

state() { sinfo -h -N -o '%T' 2>/dev/null | head -1; }
case "$(state)" in idle | mixed | allocated) echo "slurm-setup: already running"; exit 0 ;; esac

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 512))

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat >/etc/slurm/slurm.conf <<EOF
ClusterName=lazarus
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=20
MinJobAge=600
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

# munge: a key readable only by its user, then the daemon as that user.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key /run/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || {
  echo "slurm-setup: munge does not work" >&2
  exit 1
}

pgrep -x slurmctld >/dev/null || slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 300); do
  case "$(state)" in
  idle | mixed | allocated)
    echo "slurm-setup: node $host up ($cpus CPUs, $mem_mb MB)"
    exit 0
    ;;
  esac
  sleep 0.1
done
echo "slurm-setup: node $host did not come up; last state '$(state)'" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
