#!/bin/bash
# A SLURM batch job that survives preemption: examples/slurm_preempt.py on every node of its
# allocation, stopping at a checkpoint when preempted, requeued, and resuming there.
#
# Submit from the repository root, with the Python environment you want active (the job inherits
# your environment, PATH included):
#
#     sbatch examples/slurm_preempt.sh
#     sbatch --partition=preemptible examples/slurm_preempt.sh --steps 5000
#     scancel --signal=USR1 <job id>     # the time limit's warning, now: it stops and is requeued
#
# SLURM signals the processes of the job's steps, and every node's agent is one (this node's
# too: agents start as `srun --overlap` steps inside an allocation): SIGTERM when a job of a
# higher-priority partition preempts this one, SIGUSR1 120 s before the time limit (below).
# Either is the launcher's notice: training stops at a step every rank agrees on, rank 0 saves
# it, the launcher requeues the job (requeue=True; SLURM would requeue a job it preempted when
# its GraceTime ends) and the script exits 0. The same holds with --nodes=1. Each attempt
# appends to slurm-<job id>.out and prints its SLURM_RESTART_COUNT. A requeued job may wait
# (BeginTime) before its next attempt starts; `scontrol update JobId=<job id> StartTime=now`
# starts it at once.
#
#SBATCH --job-name=torchrunx-preempt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120

set -euo pipefail
echo "job $SLURM_JOB_ID, attempt ${SLURM_RESTART_COUNT:-0}, on $SLURM_JOB_NODELIST"
exec python examples/slurm_preempt.py "$@"
