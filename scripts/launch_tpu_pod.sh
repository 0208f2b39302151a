#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: copy this checkout to every worker (host), install it with
# jax[tpu], and start the same command on all of them. With --config.trainer.distributed=True
# each process calls jax.distributed.initialize(), which finds the other workers by itself;
# together they form one mesh over all chips.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b bash scripts/launch_tpu_pod.sh configs/qwen25_7b.py \
#       --config.model.path=/mnt/shared/Qwen2.5-7B-Instruct \
#       --config.trainer.output_dir=/mnt/shared/runs/qwen7b
#
# Environment: TPU_NAME and ZONE (required); PROJECT (default: gcloud's); MESH (data, fsdp, tensor;
# default "(1,-1,1)": every chip on fsdp); DTYPE (compute and parameter dtype, default bfloat16);
# REMOTE_DIR (default lorarl_jax, under each worker's home); SKIP_INSTALL=1 reuses an install.
# model.path and trainer.output_dir must be the same path on every worker (an NFS / Filestore or
# gcsfuse mount): every worker reads the base weights and writes its checkpoint shards there;
# only worker 0 writes metrics and the exported adapter.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${1:?usage: TPU_NAME=... ZONE=... $0 configs/<name>.py [--config.key=value ...]}
shift
MESH=${MESH:-"(1,-1,1)"}
DTYPE=${DTYPE:-bfloat16}
REMOTE_DIR=${REMOTE_DIR:-lorarl_jax}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE" --worker=all ${PROJECT:+--project "$PROJECT"})
cd "$(dirname "$0")/.."

on_all_workers() { "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command "$1"; }

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  tarball=$(mktemp -t lorarl_jax.XXXXXX.tgz)
  tar --exclude=.git --exclude=.venv --exclude=runs -czf "$tarball" .
  "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME":lorarl_jax.tgz "${WHERE[@]}"
  rm -f "$tarball"
  on_all_workers "set -e; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/lorarl_jax.tgz -C ~/$REMOTE_DIR
    cd ~/$REMOTE_DIR; python3 -m venv .venv; .venv/bin/pip install -q -U pip
    .venv/bin/pip install -q -e . 'jax[tpu]'"
fi

# every argument quoted for the workers' shell
args=$(printf ' %q' --config "$CONFIG" --config.trainer.distributed=True \
  "--config.trainer.mesh=$MESH" "--config.model.dtype=$DTYPE" "--config.model.param_dtype=$DTYPE" \
  "$@")
on_all_workers "cd ~/$REMOTE_DIR && .venv/bin/python -m lorarl_jax.main$args"
