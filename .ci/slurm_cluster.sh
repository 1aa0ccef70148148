#!/usr/bin/env bash
# Starts a real four-node SLURM cluster on this machine for tests/launch/: one slurmctld and four
# slurmd daemons (nodes n1..n4, all 127.0.0.1 on ports 17001-17004, per-node spool/log/pid files),
# with n1..n4 resolvable (/etc/hosts) as a cluster's DNS would make them: `scontrol show hostnames`
# yields names that torchrun's rendezvous must resolve. Each node offers the machine's CPUs (the
# four share them), so a one-node job sees what a one-node cluster gave it. Installs Debian's
# slurm-wlm and munge when they are missing (needs root and apt). Idempotent: does nothing when
# `sinfo` already answers with this configuration, and reconfigures (saying what differs)
# otherwise. When it cannot start a cluster it says why; under CI=true that is a failure (exit 1:
# CI must not go green with the real-SLURM tests skipped), elsewhere the real-SLURM tests skip.
set -uo pipefail

give_up() {
  echo "[slurm] $1"
  if [[ ${CI:-} == true ]]; then echo "[slurm] CI=true: a cluster that does not start fails CI"; exit 1; fi
  echo "[slurm] the real-SLURM tests will skip"; exit 0
}

NODES=4
# the CPUs this machine gives us (affinity, cgroups), not what the caller's OMP_NUM_THREADS or
# OMP_THREAD_LIMIT say: plain `nproc` honours those; `nproc --all` would count a host's every CPU
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
up=$(timeout 5 sinfo -h -N -o '%N %c' 2>/dev/null | sort -u)
if [[ $(echo -n "$up" | grep -c .) -ge $NODES ]]; then
  offered=$(echo "$up" | awk '{print $2}' | sort -u | tr '\n' ' ')
  if [[ $offered == "$CPUS " ]]; then
    echo "[slurm] cluster already up ($NODES nodes, $CPUS CPUs each)"; exit 0
  fi
  echo "[slurm] a cluster is up but its nodes offer ${offered}CPUs, this machine has $CPUS: reconfiguring"
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    give_up "slurm-wlm/munge missing and cannot apt-get install them (not root or no apt)"
  fi
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/tmp/slurm-apt.log 2>&1 \
    || give_up "apt-get install failed: $(tail -n 3 /tmp/slurm-apt.log | tr '\n' ' ')"
fi

host=$(hostname -s)
conf_dir=/etc/slurm
mkdir -p "$conf_dir" /var/spool/slurmctld /var/log/slurm /run/munge /var/lib/munge /var/log/munge
for n in $(seq 1 $NODES); do
  mkdir -p "/var/spool/slurmd/n$n"
  grep -qE "^127\.0\.0\.1[[:space:]].*\bn$n\b" /etc/hosts 2>/dev/null || echo "127.0.0.1 n$n" >>/etc/hosts \
    || give_up "cannot make n$n resolvable (/etc/hosts not writable)"
done
cat >"$conf_dir/slurm.conf" <<CONF
ClusterName=opsdci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# short job credentials: a requeued job is held until its old credential expires (default 120 s)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
MinJobAge=3600
# a node whose slurmd stops answering is marked down after this long (the node-loss test)
SlurmdTimeout=30
NodeName=n[1-${NODES}] NodeHostname=${host} NodeAddr=127.0.0.1 Port=[17001-1700${NODES}] CPUs=${CPUS} State=UNKNOWN
PartitionName=debug Nodes=n[1-${NODES}] Default=YES MaxTime=INFINITE State=UP
CONF

[[ -s /etc/munge/munge.key ]] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || { runuser -u munge -- munged 2>/dev/null || munged --force; }
pkill -x slurmd 2>/dev/null; pkill -x slurmctld 2>/dev/null; sleep 1  # an older one-node setup
slurmctld
for n in $(seq 1 $NODES); do slurmd -N "n$n"; done
for _ in $(seq 1 30); do
  if [[ $(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle') -ge $NODES ]]; then
    echo "[slurm] ${NODES}-node cluster up on ${host} (n1..n${NODES})"; exit 0
  fi
  sleep 1
done
sinfo 2>&1 | head -5
give_up "cluster did not come up in 30 s: $(tail -n 3 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-n1.log 2>/dev/null | tr '\n' ' ')"
