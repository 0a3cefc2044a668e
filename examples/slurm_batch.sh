#!/bin/bash
# A SLURM batch job that launches examples/multihost.py on every node of its allocation.
#
# Submit from the repository root, with the Python environment you want active (the job inherits
# your environment, PATH included):
#
#     sbatch examples/slurm_batch.sh
#     sbatch --nodes=4 --partition=gpu --gpus-per-node=8 examples/slurm_batch.sh
#
# This script runs once, on the allocation's first node: it is the launcher. With
# --hostnames slurm it takes the allocation's nodes, and starts one agent per node as an srun job
# step (no SSH between nodes needed); each agent starts --workers-per-host workers ("auto": one
# per GPU, or 1 without GPUs). Output goes to slurm-<job id>.out.
#
#SBATCH --job-name=torchrunx-example
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=00:10:00

set -euo pipefail
exec python examples/multihost.py --hostnames slurm --workers-per-host auto
