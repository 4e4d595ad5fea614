#!/usr/bin/env bash
# Stage 1 of a pipeline with torchrun (ranks from torchrun's environment, gloo on CPU or GPU
# hosts alike), then stage 2 on the first machine.
#
# One machine, 4 workers:
#   pipelines/torchrun.sh pipelines/digits.toml 4
# Several machines sharing a file system or bucket (run on each, same endpoint and id):
#   NNODES=4 NODE_RANK=$i RDZV=head-node:29400 RUN_ID=digits-1 pipelines/torchrun.sh pipelines/digits.toml 8
# Arguments after the worker count go to `softcache run` (e.g. --set cache.url=s3://bucket/c.zarr).
set -euo pipefail

pipeline=${1:?usage: torchrun.sh PIPELINE.toml [WORKERS_PER_MACHINE] [softcache run options...]}
nproc=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
# SOFTCACHE may name another launcher, e.g. "python -m softcache"; PYTHON runs torchrun.
read -r -a softcache <<< "${SOFTCACHE:-softcache}"
python=${PYTHON:-python}

if [ "$node_rank" = 0 ]; then  # the teacher once, before any worker needs it (skipped when present)
    "${softcache[@]}" run "$pipeline" --only teacher "$@"
fi
if [ "$nnodes" = 1 ]; then
    launch=(--standalone --nproc_per_node "$nproc")
else
    launch=(--nnodes "$nnodes" --nproc_per_node "$nproc" --rdzv_backend c10d
            --rdzv_endpoint "${RDZV:?set RDZV=host:port}" --rdzv_id "${RUN_ID:?set RUN_ID}")
fi
"$python" -m torch.distributed.run "${launch[@]}" -m softcache run "$pipeline" --only build --quiet "$@"
# torchrun returns once every machine's workers are done (its exit barrier), so the last worker
# has finalized the cache by now and only the students are left.
if [ "$node_rank" = 0 ]; then
    "${softcache[@]}" run "$pipeline" "$@"
fi
