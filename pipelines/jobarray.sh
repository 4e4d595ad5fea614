#!/usr/bin/env bash
# Stage 1 of a pipeline as a job array: every task labels its share of the shards of one shared
# cache (a shared file system path or s3:// URL); the last task to finish checks the cache and
# marks it complete. A failed or killed task can simply be resubmitted: shards it finished are
# skipped, the one it was writing is redone.
#
# SLURM, from the repository root:
#   softcache run pipelines/digits.toml --only teacher                 # once, before the array
#   jid=$(sbatch --parsable --array=0-7 pipelines/jobarray.sh pipelines/digits.toml)
#   sbatch --dependency=afterok:$jid --wrap "softcache run pipelines/digits.toml"   # students
# Other schedulers: set TASK (0-based) and TASKS. A local try with two tasks:
#   for i in 0 1; do TASK=$i TASKS=2 pipelines/jobarray.sh pipelines/digits.toml & done; wait
# Arguments after the pipeline go to `softcache run`, e.g. --set cache.url=s3://bucket/digits.zarr
# (credentials and endpoint come from the usual AWS_* variables, never from the pipeline file).
#
#SBATCH --job-name=softcache-build
#SBATCH --cpus-per-task=4
#SBATCH --output=softcache-build-%A_%a.log
set -euo pipefail

pipeline=${1:?usage: jobarray.sh PIPELINE.toml [softcache run options...]}
shift
task=${TASK:-$(( ${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0} ))}
tasks=${TASKS:-${SLURM_ARRAY_TASK_COUNT:-1}}
export SOFTCACHE_THREADS=${SOFTCACHE_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# SOFTCACHE may name another launcher, e.g. "python -m softcache".
read -r -a softcache <<< "${SOFTCACHE:-softcache}"

exec "${softcache[@]}" run "$pipeline" --only build --shard "$task/$tasks" --json "$@"
